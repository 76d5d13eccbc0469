"""The second stage fitted on the "fit" patients and its threshold set on the "calibration"
patients it never saw, so the Neyman-Pearson miss-rate guarantee holds (DESIGN.md rule 8).

Thresholding at an order statistic of abnormal scores bounds the miss rate only when those
scores are exchangeable with future ones; scores of the images the SVM was fitted on are
optimistic (the fit pulls them away from the boundary), so the threshold is chosen on the
calibration part only. The order-statistic rule itself is training.second_stage_fit's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from scxnn_node.model.manifest import OperatingPoint
from scxnn_node.model.second_stage import SvmSecondStage
from training.second_stage_fit import choose_operating_point, fit_second_stage

#: operating_point.validation["threshold_set_on"]: where the threshold's scores came from.
CALIBRATION = "calibration"


@dataclass(frozen=True)
class HeldOutSecondStage:
    """An SVM and the operating point set on data it was not fitted on."""

    stage: SvmSecondStage
    operating_point: OperatingPoint


def held_out_operating_point(
    calibration_scores: np.ndarray,
    calibration_abnormal: np.ndarray,
    n_fit_abnormal: int,
    n_fit_normal: int,
    target_sensitivity: float = 0.99,
    confidence: float = 0.95,
) -> OperatingPoint:
    """The Neyman-Pearson operating point of calibration scores (from a classifier fitted on
    other patients); the validation record says so and how many images fitted it."""
    op = choose_operating_point(
        calibration_scores, calibration_abnormal, target_sensitivity, confidence
    )
    validation = {
        **op.validation,
        "threshold_set_on": CALIBRATION,
        "n_fit_abnormal": int(n_fit_abnormal),
        "n_fit_normal": int(n_fit_normal),
    }
    return replace(op, validation=validation)


def fit_second_stage_held_out(
    logits: np.ndarray,
    abnormal: Sequence[int | None],
    calibration: np.ndarray,
    kernel: str = "rbf",
    c: float = 1.0,
    class_weight: str | dict[int, float] | None = "balanced",
    target_sensitivity: float = 0.99,
    confidence: float = 0.95,
) -> HeldOutSecondStage:
    """SVM on the validation rows outside `calibration` (a boolean mask over rows), threshold
    on the rows inside it. Rows whose abnormal status is unknown (None) take part in neither.
    `logits` is (N, n_members, 3) or already flattened (N, n_features)."""
    x = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1)
    calibration = np.asarray(calibration, dtype=bool)
    if not len(x) == len(abnormal) == len(calibration):
        raise ValueError("logits, abnormal and calibration need one value per image")
    known = np.array([a is not None for a in abnormal], dtype=bool)
    y = np.array([a == 1 for a in abnormal], dtype=int)
    fit_rows = known & ~calibration
    cal_rows = known & calibration
    stage = fit_second_stage(x[fit_rows], y[fit_rows], kernel, c, class_weight)
    op = held_out_operating_point(
        stage.decision_function(x[cal_rows]),
        y[cal_rows],
        n_fit_abnormal=int(y[fit_rows].sum()),
        n_fit_normal=int((1 - y[fit_rows]).sum()),
        target_sensitivity=target_sensitivity,
        confidence=confidence,
    )
    return HeldOutSecondStage(stage, op)
