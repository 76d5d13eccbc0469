"""A member as an ONNX Runtime session on the CPU, exported once from its verified weights, cached.

Why ONNX Runtime: on the CPU its convolutions (MLAS, batch norms folded at load) run a densenet121
member at 1024 px markedly faster than the fused eager member (README, "Speed"). The graph is
the plain member (encoder + head): `model/fused.py`'s preallocated buffers export as large
constant tensors and gain nothing once ORT plans its own memory.

The cache holds data only: ONNX files are protobuf, nothing is unpickled. A cached file's name
carries a key over everything the graph depends on (the member file's sha256 from the verified
manifest, architecture, image size, opset, torch and onnx versions, the export format) and the
sha256 of its own bytes, which is checked before each use: a file that does not match is
deleted and rebuilt, never trusted. Files appear by atomic rename, so concurrent workers
exporting the same member at once each leave a whole file.
"""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from scxnn_node.atomic_file import write_bytes_atomically
from scxnn_node.model.manifest import sha256_bytes
from scxnn_node.model.member import MemberNet

log = logging.getLogger(__name__)

OPSET = 17
EXPORT_FORMAT = 1  # raise when the exported graph changes for the same weights
INPUT_NAME = "images"
OUTPUT_NAME = "logits"


def cache_key(member_sha256: str, architecture: str, size: int) -> str:
    """A name for the exported graph of one member's weights at one size, with these tools."""
    fields = {
        "export_format": EXPORT_FORMAT,
        "member_sha256": member_sha256,
        "architecture": architecture,
        "size": size,
        "opset": OPSET,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
    }
    return sha256_bytes(json.dumps(fields, sort_keys=True).encode())[:32]


def export_member(member: MemberNet, size: int) -> bytes:
    """The member's encoder + head as ONNX bytes: float (B, 1, size, size) -> logits (B, 3)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter announces its successor (which needs onnxscript); its graph
        # is the one measured and tested here.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            member.eval(),
            (torch.zeros(1, 1, size, size),),
            buffer,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            dynamo=False,
        )
    return buffer.getvalue()


def cached_onnx(cache_dir: Path, key: str, build: Callable[[], bytes]) -> bytes:
    """The verified cached graph for `key`, or else `build()`'s, written to the cache."""
    for path in sorted(cache_dir.glob(f"{key}.*.onnx")):
        data = path.read_bytes()
        if path.name == f"{key}.{sha256_bytes(data)}.onnx":
            return data
        log.warning("ONNX cache file %s does not match its sha256; rebuilding it", path)
        path.unlink(missing_ok=True)
    data = build()
    write_bytes_atomically(cache_dir / f"{key}.{sha256_bytes(data)}.onnx", data)
    return data


_shared_threads: int | None = None  # the process's ORT thread pool size, once it exists


def shared_thread_pool(threads: int) -> int:
    """The one ORT thread pool of this process, made on first use with `threads` threads; its
    size (a later different request gets the first size: ORT cannot replace the pool).

    Why one pool: with a pool per session, each of the 13 members' threads spins after its own
    run (ORT's default, kept: turning spinning off measured 20 % slower at 1024 px) while the
    other members run and while the worker builds outputs. The shared pool measured a 13-member
    pass of densenet_small at 64 px 5x faster (8 ms against 44), spun 4-10x less CPU in the
    200 ms after a pass, and ran densenet121 at 1024 px 1-5 % faster (2026-11-27, 2 cores)."""
    global _shared_threads
    if _shared_threads is None:
        from onnxruntime.capi import _pybind_state

        _pybind_state.set_global_thread_pool_sizes(threads, 1)
        _shared_threads = threads
    elif threads != _shared_threads:
        log.info("ONNX Runtime keeps its %d-thread pool (%d asked)", _shared_threads, threads)
    return _shared_threads


class OnnxMember:
    """One member's ONNX graph in an ORT session on the CPU: float32 NCHW in, logits out. All
    members of a process share one thread pool (shared_thread_pool)."""

    def __init__(self, model: bytes, threads: int) -> None:
        shared_thread_pool(threads)
        options = ort.SessionOptions()
        options.use_per_session_threads = False
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
