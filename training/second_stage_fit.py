"""Fitting the second stage: an SVM on the members' logits, and its operating threshold."""

from __future__ import annotations

import math

import numpy as np
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from scxnn_node.model.bundle import OperatingPoint
from scxnn_node.model.second_stage import SvmSecondStage


def fit_second_stage(
    logits: np.ndarray,
    abnormal: np.ndarray,
    kernel: str = "rbf",
    c: float = 1.0,
    class_weight: str | dict[int, float] | None = "balanced",
) -> SvmSecondStage:
    """SVM separating normal (0) from abnormal (1) on flattened (N, n_members * 3) logits."""
    x = np.asarray(logits, dtype=np.float64).reshape(len(logits), -1)
    y = np.asarray(abnormal).astype(int)
    if set(np.unique(y)) != {0, 1}:
        raise ValueError("the second stage needs both normal and abnormal validation cases")
    scaler = StandardScaler().fit(x)
    svc = SVC(kernel=kernel, C=c, class_weight=class_weight, gamma="scale")
    svc.fit(scaler.transform(x), y)
    return SvmSecondStage.from_sklearn(scaler, svc)


def choose_operating_point(
    scores: np.ndarray, abnormal: np.ndarray, target_sensitivity: float = 0.99
) -> OperatingPoint:
    """The highest threshold whose sensitivity on these cases is at least the target.

    Abnormal iff score >= threshold. With n abnormal cases, at most floor((1 - target) * n)
    of them may fall below the threshold.
    """
    scores = np.asarray(scores, dtype=np.float64)
    abnormal = np.asarray(abnormal).astype(bool)
    positives = np.sort(scores[abnormal])
    negatives = scores[~abnormal]
    if len(positives) == 0 or len(negatives) == 0:
        raise ValueError("choosing an operating point needs normal and abnormal cases")
    allowed_misses = math.floor((1.0 - target_sensitivity) * len(positives) + 1e-9)
    threshold = float(positives[allowed_misses])
    sensitivity = float((positives >= threshold).mean())
    specificity = float((negatives < threshold).mean())
    return OperatingPoint(
        target_sensitivity=float(target_sensitivity),
        threshold=threshold,
        validation={
            "n_abnormal": len(positives),
            "n_normal": len(negatives),
            "sensitivity": sensitivity,
            "specificity": specificity,
        },
    )
