"""What one member's stages train and validate on: its images, classes and per-sample tensors.

Stage 2 (hard labels) trains on hard-label training images with reconstruction; stage 3 (weak
labels) on weak-label ones without. Augmentation draws from a generator seeded by (seed, member,
stage, epoch, sample), so a resumed run sees the same samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from scxnn_node.model.result import TARGET
from training.augment import AugmentSpec, augment_pair
from training.cache import CachedImage
from training.config import TrainingConfig
from training.dataset import ManifestEntry
from training.member_targets import member_class, reconstruction_target


@dataclass(frozen=True)
class MemberItem:
    cached: CachedImage
    label: int  # member class


_NO_TARGET = torch.empty(0)


class MemberSamples(Dataset):
    """(image uint8 (1,S,S), class, reconstruction target (1,S,S), has-target weight).

    Without `with_recon` (the weak-label stage: decoder frozen) no mask is read and the target
    is an empty tensor: nothing would use it.
    """

    def __init__(
        self,
        items: Sequence[MemberItem],
        finding: str,
        size: int,
        dilation_px: int,
        augment: AugmentSpec | None,
        seed_parts: Sequence[int],
        with_recon: bool = True,
    ) -> None:
        self.items = list(items)
        self.finding = finding
        self.size = size
        self.dilation_px = dilation_px
        self.with_recon = with_recon
        self.augment = augment
        self.seed_parts = list(seed_parts)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor, float]:
        item = self.items[index]
        image = item.cached.load_image()
        mask = item.cached.load_mask(self.finding, self.size) if self.with_recon else None
        if self.augment is not None:
            rng = np.random.default_rng([*self.seed_parts, self.epoch, index])
            image, mask = augment_pair(image, mask, rng, self.augment)
        if not self.with_recon:
            return torch.from_numpy(np.ascontiguousarray(image))[None], item.label, _NO_TARGET, 0.0
        target = reconstruction_target(image, mask, self.dilation_px)
        known = item.label != TARGET or mask is not None
        return (
            torch.from_numpy(np.ascontiguousarray(image))[None],
            item.label,
            torch.from_numpy(target)[None],
            1.0 if known else 0.0,
        )


@dataclass
class StagePlan:
    name: str
    train: list[MemberItem]
    val: list[MemberItem]
    max_epochs: int
    with_recon: bool
    train_encoder: bool


def build_plans(
    config: TrainingConfig,
    finding: str,
    train: Sequence[ManifestEntry],
    val: Sequence[ManifestEntry],
    cached: dict[int, CachedImage],
) -> list[StagePlan]:
    """Stage 2 on hard-label training images, stage 3 on weak-label ones; both validate on the
    validation split. Images whose member class is unknown are left out of this member."""

    def items(
        entries: Sequence[ManifestEntry], keep: Callable[[ManifestEntry], bool]
    ) -> list[MemberItem]:
        out = []
        for e in entries:
            label = member_class(e, finding)
            if label is not None and keep(e):
                out.append(MemberItem(cached[e.row], label))
        return out

    val_items = items(val, lambda e: True)

    def stage(kind: str, max_epochs: int, with_recon: bool, train_encoder: bool) -> StagePlan:
        """The stage named after, and training on, the images of one label kind."""
        train_items = items(train, lambda e: e.label_kind == kind)
        return StagePlan(kind, train_items, val_items, max_epochs, with_recon, train_encoder)

    tc = config.training
    return [
        stage("hard", tc.hard.max_epochs, with_recon=True, train_encoder=True),
        stage("weak", tc.weak.max_epochs, with_recon=False, train_encoder=tc.weak.train_encoder),
    ]
