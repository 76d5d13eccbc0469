"""Data-parallel training under torchrun: which process this is, its device, the DDP wrapper.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `scxnn-train fit` starts the process group. Each
process trains on its share of every epoch; only rank 0 writes files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from training.run_layout import RunError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def distributed_from_env() -> DistInfo:
    """Rank and world size as torchrun sets them; a plain process is rank 0 of 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def process_group(device_preference: str) -> Iterator[DistInfo]:
    """This process's place under torchrun, its process group started for the duration (NCCL
    unless training runs on the CPU, which needs gloo)."""
    dist_info = distributed_from_env()
    if dist_info.distributed:
        dist.init_process_group("nccl" if device_preference != "cpu" else "gloo")
    try:
        yield dist_info
    finally:
        if dist_info.distributed:
            dist.destroy_process_group()


def resolve_device(preference: str, dist_info: DistInfo) -> torch.device:
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(preference)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError(f"training.device {preference!r} but CUDA is not available")
        if dist_info.distributed:
            device = torch.device("cuda", dist_info.local_rank)
    return device


def data_parallel(model: nn.Module, device: torch.device, dist_info: DistInfo) -> nn.Module:
    """`model` wrapped in DistributedDataParallel when this is one of several processes."""
    if not dist_info.distributed:
        return model
    return nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
