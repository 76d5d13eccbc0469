"""Training one SCXNN member: multi-task classification + reconstruction (thesis 3.3.4).

Loss = cross-entropy (class-weighted) + lambda x MSE between the decoder's output and the image
inside the dilated mask of the member's own finding (zeros when it is absent). Adam, lr 1e-3,
weight decay 5e-4, lr halved when the loss plateaus.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from scxnn_node.model.member import MEMBER_CLASSES, MemberNet

log = logging.getLogger(__name__)

NORMAL, TARGET, OTHERS = (MEMBER_CLASSES.index(c) for c in ("normal", "target", "others"))


@dataclass(frozen=True)
class MemberTrainingSettings:
    architecture: str = "densenet_small"
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 5e-4
    recon_weight: float = 0.8  # lambda of the thesis
    mask_dilation_px: int = 3
    plateau_patience: int = 2
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("MemberTrainingSettings.epochs and batch_size must be at least 1")
        if self.recon_weight < 0:
            raise ValueError("MemberTrainingSettings.recon_weight must be >= 0")


def member_class_labels(labels: np.ndarray, member_index: int) -> np.ndarray:
    """Per image: target if the member's finding is present, others if only other findings are,
    normal if none. `labels` is (N, n_findings) of 0/1."""
    labels = np.asarray(labels)
    own = labels[:, member_index] == 1
    any_other = (np.delete(labels, member_index, axis=1) == 1).any(axis=1)
    out = np.full(len(labels), NORMAL, dtype=np.int64)
    out[any_other] = OTHERS
    out[own] = TARGET
    return out


def dilate_mask(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Binary dilation with a (2p+1)^2 elliptical kernel; p = 0 returns the mask as 0/1."""
    binary = (np.asarray(mask) > 0).astype(np.uint8)
    if pixels <= 0:
        return binary
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.dilate(binary, kernel)


def reconstruction_targets(images: np.ndarray, masks: np.ndarray, dilation_px: int) -> np.ndarray:
    """The image (0..1) inside the dilated mask, zeros elsewhere; (N, S, S) float32."""
    out = np.zeros(images.shape, dtype=np.float32)
    for i in range(len(images)):
        if masks[i].any():
            region = dilate_mask(masks[i], dilation_px).astype(bool)
            out[i][region] = images[i][region].astype(np.float32) / 255.0
    return out


def multitask_loss(
    logits: torch.Tensor,
    classes: torch.Tensor,
    reconstruction: torch.Tensor,
    target: torch.Tensor,
    class_weights: torch.Tensor | None,
    recon_weight: float,
) -> torch.Tensor:
    """CE + lambda x MSE, the thesis's total loss."""
    ce = F.cross_entropy(logits, classes, weight=class_weights)
    mse = F.mse_loss(reconstruction, target)
    return ce + recon_weight * mse


def class_weights_for(classes: np.ndarray) -> torch.Tensor:
    """Inverse-frequency weights, normalised to mean 1; absent classes get weight 1."""
    counts = np.bincount(classes, minlength=len(MEMBER_CLASSES)).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(counts), 1.0)
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


def train_member(
    images: np.ndarray,
    labels: np.ndarray,
    own_masks: np.ndarray,
    member_index: int,
    settings: MemberTrainingSettings,
) -> MemberNet:
    """Train one member on preprocessed uint8 images (N, S, S), labels (N, F) and the masks of
    the member's own finding (N, S, S; zeros where absent)."""
    torch.manual_seed(settings.seed + member_index)
    rng = np.random.default_rng(settings.seed + member_index)
    device = torch.device(settings.device)
    classes = member_class_labels(labels, member_index)
    recon = reconstruction_targets(images, own_masks, settings.mask_dilation_px)
    weights = class_weights_for(classes).to(device)
    model = MemberNet(settings.architecture, with_decoder=True).to(device)
    optimiser = torch.optim.Adam(
        model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimiser, mode="min", factor=0.5, patience=settings.plateau_patience
    )
    x_all = torch.from_numpy(images).unsqueeze(1)
    y_all = torch.from_numpy(classes)
    r_all = torch.from_numpy(recon).unsqueeze(1)
    for epoch in range(settings.epochs):
        model.train()
        order = rng.permutation(len(images))
        total = 0.0
        for start in range(0, len(order), settings.batch_size):
            idx = torch.from_numpy(order[start : start + settings.batch_size])
            x = x_all[idx].to(device).float() / 255.0
            logits, reconstruction = model.forward_multitask(x)
            loss = multitask_loss(
                logits,
                y_all[idx].to(device),
                reconstruction,
                r_all[idx].to(device),
                weights,
                settings.recon_weight,
            )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            total += loss.item() * len(idx)
        mean_loss = total / len(order)
        scheduler.step(mean_loss)
        log.debug("member %d epoch %d loss %.4f", member_index, epoch, mean_loss)
    return model.eval()


@torch.no_grad()
def member_logits(model: MemberNet, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N, 3) logits of one trained member on uint8 images (N, S, S)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        x = torch.from_numpy(images[start : start + batch_size]).unsqueeze(1).to(device).float()
        out.append(model(x / 255.0).cpu().numpy())
    return np.concatenate(out).astype(np.float32)
