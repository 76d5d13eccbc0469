"""What one member learns from an image: its 3-class label and its reconstruction target."""

from __future__ import annotations

import cv2
import numpy as np

from scxnn_node.model.result import NORMAL, OTHERS, TARGET
from training.dataset import ManifestEntry


def member_class(entry: ManifestEntry, finding: str) -> int | None:
    """The member's 3-class label: target if its finding is present, others if only other
    findings (or a disease outside the catalogue) are, normal if none; None when unknown."""
    own = entry.label(finding)
    if own == 1:
        return TARGET
    if own is None:
        return None
    # Its own finding is absent, so the image's status (which honours no_finding) is the rest's.
    others = entry.abnormal
    if others == 1:
        return OTHERS
    if others == 0:
        return NORMAL
    return None


def dilate_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Binary dilation with a (2p+1)^2 elliptical kernel; p = 0 returns the mask as 0/1."""
    binary = (np.asarray(mask) > 0).astype(np.uint8)
    if pixels <= 0:
        return binary
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.dilate(binary, kernel)


def reconstruction_target(
    image: np.ndarray, mask: np.ndarray | None, dilation_px: int
) -> np.ndarray:
    """The image (0..1) inside the dilated mask, zeros elsewhere (all zeros without a mask)."""
    out = np.zeros(image.shape, dtype=np.float32)
    if mask is not None and mask.any():
        region = dilate_mask(mask, dilation_px).astype(bool)
        out[region] = image[region].astype(np.float32) / 255.0
    return out
