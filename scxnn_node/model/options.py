"""How an engine runs (device, batch, precision, backend): defined and checked here, no torch.

config.yaml's model section and `EngineOptions` check their values with the same functions, so
a value the config accepts is one the engine accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# auto = onnx on the CPU at fp32, compile on CUDA (each measured fastest there: README,
# "Speed"), eager otherwise.
# compile = torch.compile (mode: compile_mode); on CUDA, in modes without Inductor's own graphs,
# its kernels are captured and replayed by model/cuda_graph.py. About 80 s to start at 1024 px on
# an H200 and 2x cuda_graph there (Inductor fuses DenseNet's elementwise ops: BN multiply-add +
# ReLU, convolution bias + ReLU, measured as 57 % of an eager member's GPU time); measured no
# faster than eager on a 2-core CPU. cuda_graph = the eager ensemble pass captured once per batch
# shape and replayed (CUDA only). onnx = ONNX Runtime, CPU and fp32 only
# (model/onnx_backend.py). Not offered: TorchScript + oneDNN Graph (measured no faster on the
# CPU); TensorRT (torch-tensorrt needs TensorRT's ~1.5 GB of libraries, which could not reach the
# lent GPU machine: README, "Speed").
BACKENDS = ("auto", "eager", "compile", "cuda_graph", "onnx")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# On CUDA these compiled passes are captured and replayed by model/cuda_graph.py; the other two
# modes replay through Inductor's own CUDA graphs.
COMPILE_MODES_WITHOUT_GRAPHS = ("default", "max-autotune-no-cudagraphs")


def check_device(value: str) -> str:
    if not (value == "cpu" or value.startswith("cuda")):
        raise ValueError(f"device {value!r} must be 'cpu' or 'cuda:N'")
    return value


def check_precision(value: str) -> str:
    if value not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}")
    return value


def check_backend(value: str) -> str:
    if value not in BACKENDS:
        raise ValueError(f"backend must be one of {list(BACKENDS)}")
    return value


def check_compile_mode(value: str) -> str:
    if value not in COMPILE_MODES:
        raise ValueError(f"compile_mode must be one of {list(COMPILE_MODES)}")
    return value


def resolve_backend(backend: str, device: str, precision: str) -> str:
    """The backend an engine runs: `auto` made concrete for this device and precision."""
    if backend != "auto":
        return backend
    if device == "cpu":
        return "onnx" if precision in ("auto", "fp32") else "eager"
    return "compile"


@dataclass(frozen=True)
class EngineOptions:
    device: str = "cpu"
    batch_size: int | None = None  # None: engine.default_batch_size()
    precision: str = "auto"  # auto: bf16 (or fp16) on CUDA, fp32 on CPU
    channels_last: bool = True
    fused: bool = True  # BN folded, no re-concatenation (model/fused.py); same outputs
    backend: str = "auto"
    # Where the onnx backend keeps exported members; None: export at every engine start.
    onnx_cache_dir: Path | None = None
    compile_mode: str = "default"  # torch.compile's mode, for backend "compile"
    # Where backend compile keeps compiled graphs and kernels (Inductor's caches), so that a
    # restarted worker loads them instead of compiling for minutes; None: Inductor's default.
    compile_cache_dir: Path | None = None
    # CUDA streams the members are spread over (1: one after another on the current stream).
    member_streams: int = 1

    def __post_init__(self) -> None:
        check_precision(self.precision)
        check_backend(self.backend)
        check_compile_mode(self.compile_mode)
        if self.member_streams < 1:
            raise ValueError("EngineOptions.member_streams must be at least 1")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("EngineOptions.batch_size must be at least 1")
        check_device(self.device)
        if self.backend == "onnx" and (
            self.device != "cpu" or self.precision not in ("auto", "fp32")
        ):
            raise ValueError("backend 'onnx' runs on device 'cpu' at fp32 precision only")
        if self.device == "cpu" and (self.backend == "cuda_graph" or self.member_streams > 1):
            raise ValueError("backend 'cuda_graph' and member_streams > 1 need a CUDA device")
