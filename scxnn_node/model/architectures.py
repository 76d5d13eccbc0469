"""Member architectures as named data: the DenseNet configuration and decoder widths of each.

A bundle's manifest names its architecture; checking that name needs no torch, so the
catalogue lives apart from the networks built from it (model/member.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArchitectureSpec:
    """A DenseNet configuration and the decoder widths that go with it."""

    name: str
    growth_rate: int
    block_config: tuple[int, int, int, int]
    num_init_features: int
    bn_size: int
    decoder_channels: tuple[int, int, int, int, int]  # at strides 16, 8, 4, 2, 1


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    spec.name: spec
    for spec in (
        # The thesis's backbone (torchvision's densenet121 configuration).
        ArchitectureSpec("densenet121", 32, (6, 12, 24, 16), 64, 4, (256, 128, 64, 32, 16)),
        # Same design, a fraction of the width and depth: tests and CPU demos.
        ArchitectureSpec("densenet_small", 8, (2, 3, 4, 3), 16, 2, (32, 24, 16, 8, 8)),
    )
}


def architecture(name: str) -> ArchitectureSpec:
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {sorted(ARCHITECTURES)}") from None
