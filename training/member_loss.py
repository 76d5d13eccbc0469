"""The member's training loss (thesis 3.3.4): cross-entropy + lambda x reconstruction MSE."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from scxnn_node.model.result import MEMBER_CLASSES


def multitask_loss(
    logits: torch.Tensor,
    classes: torch.Tensor,
    reconstruction: torch.Tensor | None,
    target: torch.Tensor | None,
    recon_weights: torch.Tensor | None,
    class_weights: torch.Tensor | None,
    recon_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, CE, MSE): the thesis's CE + lambda x MSE. The MSE averages over the samples
    whose reconstruction target is known (`recon_weights` 1), zero when there are none."""
    ce = F.cross_entropy(logits.float(), classes, weight=class_weights)
    if reconstruction is None or target is None:
        return ce, ce.detach(), torch.zeros((), device=ce.device)
    per_sample = (reconstruction.float() - target).pow(2).flatten(1).mean(dim=1)
    w = torch.ones_like(per_sample) if recon_weights is None else recon_weights.float()
    mse = (per_sample * w).sum() / w.sum().clamp(min=1.0)
    return ce + recon_weight * mse, ce.detach(), mse.detach()


def class_weights_for(classes: np.ndarray) -> torch.Tensor:
    """Inverse-frequency weights, normalised to mean 1; absent classes get weight 1."""
    counts = np.bincount(classes, minlength=len(MEMBER_CLASSES)).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / np.maximum(counts, 1) / len(counts), 1.0)
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)
