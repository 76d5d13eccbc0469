"""The ensemble pass captured as CUDA graphs: one graph per batch shape, replayed per batch.

A member's forward launches a few hundred kernels; 13 members launch thousands per batch, each
with Python and launch overhead. A captured graph replays them all in one call from fixed
input and output buffers. Batches are padded up to the next captured shape (powers of two up to
the engine's batch size), so a few graphs serve every batch; images are independent in
inference (no batch statistics), so the padding rows change nothing and are dropped.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

EnsemblePass = Callable[[torch.Tensor], torch.Tensor]


def graph_shapes(batch_size: int) -> list[int]:
    """The batch sizes that get a graph: powers of two below `batch_size`, and `batch_size`."""
    shapes = []
    size = 1
    while size < batch_size:
        shapes.append(size)
        size *= 2
    return [*shapes, batch_size]


class _CapturedPass:
    """One graph: a fixed uint8 input buffer, a fixed float32 logits buffer."""

    def __init__(
        self, ensemble_pass: EnsemblePass, batch: int, size: int, device: torch.device, pool
    ) -> None:
        self.input = torch.zeros((batch, size, size), dtype=torch.uint8, device=device)
        # Warm-up on a side stream, as capture requires: cuDNN picks its algorithms and the
        # allocator settles before anything is recorded.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(2):
                ensemble_pass(self.input)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = ensemble_pass(self.input)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        n = len(images)
        self.input[:n].copy_(torch.from_numpy(np.ascontiguousarray(images)))
        self.graph.replay()
        return self.output[:n].cpu().numpy()


class GraphedEnsemble:
    """Runs `ensemble_pass` (uint8 (B, S, S) on the device -> float32 (B, M, 3)) through CUDA
    graphs captured on first use of each shape."""

    def __init__(
        self, ensemble_pass: EnsemblePass, batch_size: int, size: int, device: torch.device
    ) -> None:
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, not {device}")
        self.ensemble_pass = ensemble_pass
        self.shapes = graph_shapes(batch_size)
        self.size = size
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()  # one pool: graphs replay one at a time
        self.captured: dict[int, _CapturedPass] = {}

    def capture_all(self) -> None:
        """Capture every shape now (largest first), so that no study waits for a capture."""
        for shape in reversed(self.shapes):
            self._captured(shape)

    def _captured(self, shape: int) -> _CapturedPass:
        if shape not in self.captured:
            self.captured[shape] = _CapturedPass(
                self.ensemble_pass, shape, self.size, self.device, self.pool
            )
        return self.captured[shape]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        """uint8 (n, S, S) with n <= batch_size -> float32 logits (n, M, 3)."""
        return self._captured(next(s for s in self.shapes if s >= len(images)))(images)
