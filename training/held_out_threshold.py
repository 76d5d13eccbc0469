"""The Neyman-Pearson operating point of the second stage, set on the "calibration" patients
its SVM never saw, so the miss-rate guarantee holds (DESIGN.md rule 8); training/calibrate.py
fits the SVM on the "fit" patients and calls this on the calibration studies' scores.

Thresholding at an order statistic of abnormal scores bounds the miss rate only when those
scores are exchangeable with future ones; scores of the images the SVM was fitted on are
optimistic (the fit pulls them away from the boundary), so the threshold is chosen on the
calibration part only. The order-statistic rule itself is training.second_stage_fit's.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from scxnn_node.model.manifest import OperatingPoint
from training.second_stage_fit import choose_operating_point

#: operating_point.validation["threshold_set_on"]: where the threshold's scores came from.
CALIBRATION = "calibration"


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
