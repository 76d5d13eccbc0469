"""How an engine runs (device, batch, precision, backend): defined and checked here, no torch.

config.yaml's model section and `EngineOptions` check their values with the same functions, so
a value the config accepts is one the engine accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# auto = onnx on the CPU at fp32 (measured faster there: README, "Speed"), eager otherwise.
# compile = torch.compile: minutes to start at 1024 px and measured no faster than eager on a
# 2-core CPU; for GPUs. onnx = ONNX Runtime, CPU and fp32 only (model/onnx_backend.py).
# (TorchScript + oneDNN Graph fusion was measured too: no faster than eager, not offered.)
BACKENDS = ("auto", "eager", "compile", "onnx")


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


def resolve_backend(backend: str, device: str, precision: str) -> str:
    """The backend an engine runs: `auto` made concrete for this device and precision."""
    if backend != "auto":
        return backend
    return "onnx" if device == "cpu" and precision in ("auto", "fp32") else "eager"


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

    def __post_init__(self) -> None:
        check_precision(self.precision)
        check_backend(self.backend)
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError("EngineOptions.batch_size must be at least 1")
        check_device(self.device)
        if self.backend == "onnx" and (
            self.device != "cpu" or self.precision not in ("auto", "fp32")
        ):
            raise ValueError("backend 'onnx' runs on device 'cpu' at fp32 precision only")
