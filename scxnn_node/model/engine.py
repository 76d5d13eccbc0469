"""Batched inference: a bundle's members (encoder + head) on one device, from images to logits.

The engine is loaded once and reused: members run over batches of preprocessed images in
inference mode, channels_last, weights cast to bf16/fp16 on CUDA, with a choice of backend (eager,
torch.compile, CUDA graphs: model/cuda_graph.py, or ONNX Runtime on the CPU:
model/onnx_backend.py), optionally with the members spread over CUDA streams. What the 13 x 3
logits of a study mean (second stage, operating point, the `StudyResult`) is decided in
model/decision.py, with numpy only.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from scxnn_node.logs import exception_line
from scxnn_node.model.bundle import Bundle
from scxnn_node.model.compile_cache import CompileCache
from scxnn_node.model.cuda_graph import GraphedEnsemble
from scxnn_node.model.decision import abnormality_scores, not_analysed_result, result_from_logits
from scxnn_node.model.fused import FusedMember
from scxnn_node.model.manifest import member_file
from scxnn_node.model.member import MemberNet
from scxnn_node.model.options import (
    COMPILE_MODES_WITHOUT_GRAPHS,
    EngineOptions,
    resolve_backend,
)
from scxnn_node.model.result import StudyResult

if TYPE_CHECKING:
    from scxnn_node.model.onnx_backend import OnnxMember

log = logging.getLogger(__name__)

# Peak activation memory of one image relative to its pixel count, measured for densenet121 in
# inference mode (about 200 bytes per input pixel, with a margin).
_ACTIVATION_BYTES_PER_PIXEL = {"densenet121": 320, "densenet_small": 64}


def _available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def max_batch_for_memory(arch: str, size: int, available_bytes: int, cap: int = 16) -> int:
    """Largest batch whose activations fit in half of the available memory."""
    per_image = _ACTIVATION_BYTES_PER_PIXEL.get(arch, 320) * size * size
    return max(1, min(cap, int(available_bytes * 0.5 // per_image)))


def default_batch_size(device: torch.device, arch: str, size: int) -> int:
    """Memory-bound on a GPU, at most 32. On a CPU, batches beyond 512 x 512 pixels run slower
    (measured at 1024 px: batch 2 is about 15 % slower per image than batch 1, the caches
    overflow)."""
    by_memory = max_batch_for_memory(arch, size, _available_memory_bytes(device))
    if device.type == "cpu":
        return max(1, min(by_memory, (512 * 512) // (size * size)))
    # Measured on an H200 at 1024 px (README, "Speed"): 32 a little faster than 16, 64 no
    # faster than 32 for twice the memory.
    return max_batch_for_memory(arch, size, _available_memory_bytes(device), cap=32)


_PRECISION_NAME = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """torch on one CPU thread for a while, its thread count restored after.

    Building members is thousands of tiny tensor operations (BN folding, copies, layout), for
    which waking a pool of threads costs more than the work: densenet121, 13 members, on the
    2-core CPU, 11.4 s with 2 threads and 3.9 s this way; three engines built at once (a node's
    workers starting) 20 s each before, 11-13 s this way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class InferenceEngine:
    """Runs a bundle's ensemble on preprocessed uint8 images of the bundle's size."""

    def __init__(self, bundle: Bundle, options: EngineOptions | None = None) -> None:
        started = time.monotonic()
        self.bundle = bundle
        self.manifest = bundle.manifest
        self.options = options or EngineOptions()
        self.device = torch.device(self.options.device)
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError(
                    f"device {self.options.device} requested but CUDA is not available"
                )
            # Shapes are fixed per engine: let cuDNN time its algorithms once and keep the best.
            torch.backends.cudnn.benchmark = True
        self.half_dtype = self._half_dtype()
        self.precision = _PRECISION_NAME[self.half_dtype]
        if self.manifest.precision not in (None, self.precision):
            # The thresholds' guarantee was measured on scores at the bundle's precision.
            log.warning(
                "bundle %s %s: its thresholds were set at %s precision; serving at %s moves the "
                "scores, so the bundle's sensitivity guarantee is not measured for this engine",
                self.manifest.name,
                self.manifest.version,
                self.manifest.precision,
                self.precision,
            )
        self.backend = resolve_backend(
            self.options.backend, self.options.device, self.options.precision
        )
        size = self.manifest.preprocessing.size
        self.batch_size = self.options.batch_size or default_batch_size(
            self.device, self.manifest.architecture, size
        )
        self.streams = (
            [torch.cuda.Stream(self.device) for _ in range(self.options.member_streams)]
            if self.options.member_streams > 1
            else []
        )
        built = time.monotonic()
        try:
            self._build_and_warm_up()
        except Exception as exc:
            if not (self.backend == "compile" and self.options.backend == "auto"):
                raise  # a backend asked for by name stands or fails
            # auto's choice on CUDA; Inductor needs Triton and a C compiler on the machine.
            self.backend = "cuda_graph" if self.device.type == "cuda" else "eager"
            log.warning(
                "torch.compile failed at engine start (%s); serving with backend %s",
                exception_line(exc),
                self.backend,
            )
            self._build_and_warm_up()
        self.start_seconds = time.monotonic() - started
        log.info(
            "engine ready in %.1f s (%.1f s compiling or capturing graphs): bundle %s %s, "
            "%d members, %s, "
            "batch %d, precision %s, backend %s",
            self.start_seconds,
            time.monotonic() - built,
            self.manifest.name,
            self.manifest.version,
            len(self.members),
            self.device,
            self.batch_size,
            self.precision,
            self.backend,
        )

    def _build_and_warm_up(self) -> None:
        cache = (
            CompileCache(self.options.compile_cache_dir)
            if self.backend == "compile" and self.options.compile_cache_dir is not None
            else None
        )
        if cache is None:
            self._build_members()
            self._warm_up()
            return
        cache.use()
        self._build_members()
        with cache.warming():
            try:
                self._warm_up()
            except Exception as exc:
                if not cache.entries():
                    raise
                # An entry that fails to load would fail every start after this one.
                log.warning(
                    "compile cache %s unusable (%s); cleared, compiling again",
                    cache.directory,
                    exception_line(exc),
                )
                cache.clear()
                self._build_members()
                self._warm_up()

    def _build_members(self) -> None:
        self.members = [self._build_member(name) for name in self.manifest.findings.names]
        self.graphed = (
            GraphedEnsemble(
                self._ensemble_pass, self.batch_size, self.manifest.preprocessing.size, self.device
            )
            if self._replays_graphs()
            else None
        )

    def _warm_up(self) -> None:
        """Capture the graphs, or compile, now: no study waits for either."""
        with torch.inference_mode():
            if self.graphed is not None:
                self.graphed.capture_all()
            elif self.backend == "compile":
                size = self.manifest.preprocessing.size
                self._batch_logits(np.zeros((self.batch_size, size, size), dtype=np.uint8))

    def _replays_graphs(self) -> bool:
        """Our CUDA graphs replay the pass: backend cuda_graph, or compiled members on CUDA in a
        mode without Inductor's own graphs (its kernels captured like eager ones)."""
        if self.device.type != "cuda":
            return False
        return self.backend == "cuda_graph" or (
            self.backend == "compile" and self.options.compile_mode in COMPILE_MODES_WITHOUT_GRAPHS
        )

    def _half_dtype(self) -> torch.dtype | None:
        """The dtype weights and activations run in, None for fp32."""
        precision = self.options.precision
        if precision == "auto":
            if self.device.type != "cuda":
                return None
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

    def _plain_member(self, name: str) -> MemberNet:
        # Built without storage and given the bundle's tensors: no random initialisation to
        # throw away and no copies (measured: about 1 s a densenet121 member at start).
        with _one_torch_thread():
            with torch.device("meta"):
                member = MemberNet(self.manifest.architecture, with_decoder=False)
            missing, unexpected = member.load_state_dict(
                self.bundle.member_weights[name], strict=False, assign=True
            )
        if missing or unexpected:
            raise ValueError(
                f"member {name!r} weights do not fit architecture {self.manifest.architecture!r}: "
                f"missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        return member.eval()

    def _build_member(self, name: str) -> torch.nn.Module | OnnxMember:
        if self.backend == "onnx":
            return self._onnx_member(name)
        member: torch.nn.Module = self._plain_member(name)
        with _one_torch_thread():
            if self.options.fused:
                member = FusedMember(member)  # folds BN in fp32, before any cast
            # Weights cast once, activations kept in that dtype: autocast would re-cast weights
            # every pass and run the fused BN's multiply-add in fp32 over the whole dense buffer.
            member.to(self.device, dtype=self.half_dtype or torch.float32)
            if self.options.channels_last:
                member = member.to(memory_format=torch.channels_last)
        if self.backend == "compile":
            # Every member shares one compiled graph (same code, weights as inputs: measured, one
            # compile for 3 members). dynamic=None: a second batch size makes the batch dimension
            # symbolic, so the captured shapes 1, 2, 4, ... cost about three compiles, not one each.
            return torch.compile(  # type: ignore[return-value]
                member, dynamic=None, mode=self.options.compile_mode
            )
        return member

    def _onnx_member(self, name: str) -> OnnxMember:
        # Imported here: onnxruntime loads only in a process that builds an ONNX engine.
        from scxnn_node.model import onnx_backend

        size = self.manifest.preprocessing.size

        def export() -> bytes:
            return onnx_backend.export_member(self._plain_member(name), size)

        # A bundle built in memory (bench, tests) lists no file hashes: nothing to key a cache on.
        member_sha256 = self.manifest.files.get(member_file(name))
        if member_sha256 is None or self.options.onnx_cache_dir is None:
            model = export()
        else:
            key = onnx_backend.cache_key(member_sha256, self.manifest.architecture, size)
            model = onnx_backend.cached_onnx(self.options.onnx_cache_dir, key, export)
        return onnx_backend.OnnxMember(model, threads=torch.get_num_threads())

    def _ensemble_pass(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, S, S) on the device -> float32 logits (B, n_members, 3) on the device."""
        x = images.unsqueeze(1).float().div_(255.0)
        if self.half_dtype is not None:
            x = x.to(self.half_dtype)
        if self.options.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if not self.streams:
            return torch.stack([member(x).float() for member in self.members], dim=1)
        # Members spread over side streams, forked from and joined back to the current one
        # (also inside a CUDA graph capture, which records the fork and join).
        current = torch.cuda.current_stream(self.device)
        logits: list[torch.Tensor] = []
        for m, member in enumerate(self.members):
            stream = self.streams[m % len(self.streams)]
            if m < len(self.streams):
                stream.wait_stream(current)
            with torch.cuda.stream(stream):
                logits.append(member(x).float())
        for stream in self.streams:
            current.wait_stream(stream)
        return torch.stack(logits, dim=1)

    @torch.inference_mode()
    def member_logits(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, size, size) -> float32 logits (B, n_members, 3)."""
        size = self.manifest.preprocessing.size
        if images.ndim != 3 or images.shape[1:] != (size, size) or images.dtype != np.uint8:
            raise ValueError(
                f"engine expects uint8 images of shape (B, {size}, {size}), got "
                f"{images.dtype} {images.shape}"
            )
        out = np.empty((images.shape[0], len(self.members), 3), dtype=np.float32)
        for start in range(0, images.shape[0], self.batch_size):
            batch = images[start : start + self.batch_size]
            out[start : start + len(batch)] = self._batch_logits(batch)
        return out

    def _batch_logits(self, batch: np.ndarray) -> np.ndarray:
        """float32 (B, n_members, 3) logits for one batch of uint8 images."""
        if self.backend == "onnx":
            x_cpu = batch[:, None].astype(np.float32) / np.float32(255.0)  # as _ensemble_pass
            return np.stack([member(x_cpu) for member in self.members], axis=1)
        if self.graphed is not None:
            return self.graphed(batch)
        images = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
        return self._ensemble_pass(images).cpu().numpy()

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """Second-stage abnormality scores for (B, n_members, 3) logits."""
        return abnormality_scores(self.bundle.second_stage, logits)

    def triage(
        self,
        study_instance_uid: str,
        images: np.ndarray,
        instance_uids: Sequence[str],
        notes: Sequence[str] = (),
    ) -> StudyResult:
        """Triage one study from its analysable, preprocessed images."""
        if len(images) == 0:
            raise ValueError("triage needs at least one image; use not_analysed_result otherwise")
        return result_from_logits(
            self.bundle, study_instance_uid, self.member_logits(images), instance_uids, notes
        )

    def not_analysed_result(self, study_instance_uid: str, reason: str) -> StudyResult:
        return not_analysed_result(self.bundle, study_instance_uid, reason)
