"""Fitting the second stage: an SVM on the members' logits, and its operating threshold."""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy.stats import beta, binom
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from scxnn_node.model.decision import second_stage_features
from scxnn_node.model.manifest import OperatingPoint
from scxnn_node.model.second_stage import SvmSecondStage

log = logging.getLogger(__name__)


def fit_second_stage(
    logits: np.ndarray,
    abnormal: np.ndarray,
    kernel: str = "rbf",
    c: float = 1.0,
    class_weight: str | dict[int, float] | None = "balanced",
) -> SvmSecondStage:
    """SVM separating normal (0) from abnormal (1) on (N, n_members, 3) logits, flattened as
    the node flattens them (or already flattened, (N, n_members * 3))."""
    x = second_stage_features(np.asarray(logits, dtype=np.float64))
    y = np.asarray(abnormal).astype(int)
    if set(np.unique(y)) != {0, 1}:
        raise ValueError("the second stage needs both normal and abnormal validation cases")
    scaler = StandardScaler().fit(x)
    svc = SVC(kernel=kernel, C=c, class_weight=class_weight, gamma="scale")
    svc.fit(scaler.transform(x), y)
    return SvmSecondStage.from_sklearn(scaler, svc)


def np_order_statistic(n: int, miss_rate: float, confidence: float) -> int | None:
    """Largest k (1-based) such that thresholding at the k-th lowest of n abnormal validation
    scores keeps the true miss rate <= `miss_rate` with probability >= `confidence`.

    The miss rate of the k-th order statistic is Beta(k, n - k + 1) distributed, so the rule
    holds when P(Binomial(n, miss_rate) < k) <= 1 - confidence (Tong, Feng and Li 2018,
    Neyman-Pearson umbrella algorithm). None when even k = 1 does not hold (n too small: 299
    abnormal cases are needed for a 1 % miss rate at 95 % confidence).
    """
    if n < 1:
        return None
    ks = np.arange(1, n + 1)
    violation = binom.cdf(ks - 1, n, miss_rate)  # P(Bin(n, a) <= k - 1)
    ok = ks[violation <= 1.0 - confidence + 1e-12]
    return int(ok.max()) if len(ok) else None


def min_abnormal_for_guarantee(miss_rate: float, confidence: float) -> int:
    """Smallest n for which the order-statistic rule exists: (1 - a)^n <= 1 - confidence."""
    return math.ceil(math.log(1.0 - confidence) / math.log(1.0 - miss_rate) - 1e-12)


def choose_operating_point(
    scores: np.ndarray,
    abnormal: np.ndarray,
    target_sensitivity: float = 0.99,
    confidence: float = 0.95,
) -> OperatingPoint:
    """Threshold on the second stage's score (abnormal iff score >= threshold) that controls
    the miss rate: the Neyman-Pearson order statistic of the abnormal validation scores.

    With too few abnormal cases for the guarantee, the threshold falls back to the lowest
    abnormal score (no validation miss), a warning is logged, and the manifest records the
    guarantee actually achieved: the miss-rate bound at `confidence`, and the confidence that
    the miss rate is within 1 - target.
    """
    scores = np.asarray(scores, dtype=np.float64)
    abnormal = np.asarray(abnormal).astype(bool)
    positives = np.sort(scores[abnormal])
    negatives = scores[~abnormal]
    if len(positives) == 0 or len(negatives) == 0:
        raise ValueError("choosing an operating point needs normal and abnormal cases")
    miss_rate = round(1.0 - float(target_sensitivity), 12)
    n = len(positives)
    k = np_order_statistic(n, miss_rate, confidence) if miss_rate > 0 else None
    guaranteed = k is not None
    needed = min_abnormal_for_guarantee(miss_rate, confidence) if miss_rate > 0 else None
    if k is None:
        log.warning(
            "operating point: %d abnormal validation cases; a miss rate <= %.3g at %.0f%% "
            "confidence needs %s. Falling back to the lowest abnormal score; the achieved "
            "guarantee is recorded in the manifest.",
            n,
            miss_rate,
            100 * confidence,
            needed if needed is not None else "a target sensitivity below 1",
        )
        k = 1
    # Miss-rate bound at this confidence for the chosen k, and confidence at the target rate.
    bound = float(beta.ppf(confidence, k, n - k + 1))
    achieved_confidence = float(1.0 - binom.cdf(k - 1, n, miss_rate)) if miss_rate > 0 else 0.0
    threshold = float(positives[k - 1])
    return OperatingPoint(
        target_sensitivity=float(target_sensitivity),
        threshold=threshold,
        validation={
            "rule": "neyman_pearson_order_statistic",
            "n_abnormal": n,
            "n_normal": len(negatives),
            "order_statistic_k": k,
            "sensitivity": float((positives >= threshold).mean()),
            "specificity": float((negatives < threshold).mean()),
            "miss_rate_target": miss_rate,
            "confidence": float(confidence),
            "guarantee_met": guaranteed,
            "miss_rate_upper_bound": bound,
            "confidence_miss_rate_within_target": achieved_confidence,
            "min_abnormal_for_guarantee": needed,
        },
    )
