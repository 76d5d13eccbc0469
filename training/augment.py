"""Training augmentation (thesis 3.2): shift, rotation, gamma, sharpening, blur, Gaussian noise.

Geometric changes move the image and its lesion mask together (the mask with nearest-neighbour
sampling, so it stays binary); intensity changes touch the image only. Every random draw comes
from the generator passed in, so a run is reproducible and a resumed run repeats it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class AugmentSpec:
    """Augmentation parameters; validated at construction."""

    # Read by pydantic where a config file holds this spec: unknown keys are refused.
    __pydantic_config__ = {"extra": "forbid"}  # noqa: RUF012

    enabled: bool = True
    shift_fraction: float = 0.05  # of the image side, each axis
    rotation_degrees: float = 10.0
    gamma_range: tuple[float, float] = (0.8, 1.25)
    sharpen_probability: float = 0.25
    sharpen_amount: float = 1.0
    blur_probability: float = 0.25
    blur_sigma_range: tuple[float, float] = (0.5, 1.2)
    noise_probability: float = 0.3
    noise_std: float = 0.02  # in units of the 0..1 intensity range

    def __post_init__(self) -> None:
        if not 0 <= self.shift_fraction < 0.5:
            raise ValueError("augmentation.shift_fraction must be in [0, 0.5)")
        if not 0 <= self.rotation_degrees <= 180:
            raise ValueError("augmentation.rotation_degrees must be in [0, 180]")
        lo, hi = self.gamma_range
        if not 0 < lo <= hi:
            raise ValueError("augmentation.gamma_range must be 0 < low <= high")
        for name in ("sharpen_probability", "blur_probability", "noise_probability"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"augmentation.{name} must be in [0, 1]")
        if self.noise_std < 0 or self.sharpen_amount < 0:
            raise ValueError("augmentation.noise_std and sharpen_amount must be >= 0")


def geometric_transform(rng: np.random.Generator, size: int, spec: AugmentSpec) -> np.ndarray:
    """A 2x3 affine matrix: rotation about the centre, then a shift."""
    angle = rng.uniform(-spec.rotation_degrees, spec.rotation_degrees)
    matrix = cv2.getRotationMatrix2D((size / 2 - 0.5, size / 2 - 0.5), angle, 1.0)
    matrix[:, 2] += rng.uniform(-spec.shift_fraction, spec.shift_fraction, 2) * size
    return matrix


def augment_pair(
    image: np.ndarray,
    mask: np.ndarray | None,
    rng: np.random.Generator,
    spec: AugmentSpec,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Augmented copies of a uint8 (S, S) image and its 0/1 mask (None passes through)."""
    if not spec.enabled:
        return image, mask
    size = image.shape[0]
    matrix = geometric_transform(rng, size, spec)
    out = cv2.warpAffine(
        image, matrix, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
    )
    if mask is not None:
        mask = cv2.warpAffine(
            mask, matrix, (size, size), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT
        )
    x = out.astype(np.float32) / 255.0
    gamma = float(np.exp(rng.uniform(np.log(spec.gamma_range[0]), np.log(spec.gamma_range[1]))))
    x = np.power(x, gamma)
    if rng.random() < spec.sharpen_probability:
        soft = cv2.GaussianBlur(x, (0, 0), 1.0)
        x = x + spec.sharpen_amount * (x - soft)
    if rng.random() < spec.blur_probability:
        x = cv2.GaussianBlur(x, (0, 0), rng.uniform(*spec.blur_sigma_range))
    if rng.random() < spec.noise_probability:
        x = x + rng.normal(0.0, spec.noise_std, x.shape).astype(np.float32)
    out = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
    return out, mask
