"""Choosing the critical-finding safety net on calibration data: per critical-tier finding,
the threshold on its member's target probability that keeps that finding's miss rate within
the target at the given confidence (the Neyman-Pearson order statistic of the positives'
probabilities, as for the second stage), or a record of how many positives it lacked.

The probabilities must come from patients the thresholds' data did not otherwise shape (the
calibration part of training.calibration_split) for the guarantee to hold.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import beta

from scxnn_node.findings import FindingCatalogue, RiskTier
from scxnn_node.model.safety_net import (
    CriticalSafetyNet,
    CriticalThreshold,
    InsufficientPositives,
    SafetyNetThreshold,
)
from training.one_study_per_patient import one_study_per_patient
from training.second_stage_fit import min_abnormal_for_guarantee, np_order_statistic

log = logging.getLogger(__name__)


def miss_rate_upper_bound(n_positive: int, k: int, confidence: float) -> float:
    """Upper `confidence` bound on the miss rate of thresholding at the k-th lowest of
    n_positive scores: the miss rate is Beta(k, n - k + 1) distributed. 1.0 with no positives."""
    if n_positive < 1:
        return 1.0
    if not 1 <= k <= n_positive:
        raise ValueError(f"k must be in 1..{n_positive}, got {k}")
    return float(beta.ppf(confidence, k, n_positive - k + 1))


def critical_threshold(
    finding: str,
    positive_probabilities: np.ndarray,
    miss_rate: float = 0.01,
    confidence: float = 0.95,
) -> SafetyNetThreshold:
    """The threshold for one finding from its calibration positives' target probabilities."""
    positives = np.sort(np.asarray(positive_probabilities, dtype=np.float64).reshape(-1))
    n = len(positives)
    k = np_order_statistic(n, miss_rate, confidence)
    if k is not None:
        return CriticalThreshold(
            finding=finding,
            threshold=float(positives[k - 1]),
            n_positive=n,
            order_statistic_k=k,
            miss_rate_target=float(miss_rate),
            confidence=float(confidence),
            miss_rate_upper_bound=miss_rate_upper_bound(n, k, confidence),
        )
    needed = min_abnormal_for_guarantee(miss_rate, confidence)
    log.warning(
        "safety net: %s has %d calibration positives; a miss rate <= %.3g at %.0f%% confidence "
        "needs %d. Its threshold is the lowest positive's probability, without the guarantee.",
        finding,
        n,
        miss_rate,
        100 * confidence,
        needed,
    )
    return InsufficientPositives(
        finding=finding,
        needed=needed,
        available=n,
        miss_rate_upper_bound=miss_rate_upper_bound(n, 1, confidence),
        threshold=float(positives[0]) if n else None,
        miss_rate_target=float(miss_rate),
        confidence=float(confidence),
    )


def fit_critical_safety_net(
    findings: FindingCatalogue,
    target_probability: np.ndarray,
    labels: Sequence[Mapping[str, int | None]],
    miss_rate: float = 0.01,
    confidence: float = 0.95,
    *,
    patients: Sequence[str] | None = None,
    seed: int = 0,
) -> CriticalSafetyNet:
    """One threshold per critical-tier finding of `findings` (the members, in order), from
    (N, n_members) target probabilities of calibration studies and their manifest labels
    (1 present, 0 absent, None or missing unknown). Only studies labelled present count: the
    threshold bounds the miss rate, which is a property of the positives alone. With
    `patients` (one per study), each finding counts one of a patient's positive studies,
    drawn with `seed`: a patient's studies are not independent cases."""
    probs = np.asarray(target_probability, dtype=np.float64)
    if probs.shape != (len(labels), len(findings)):
        raise ValueError(
            f"target probabilities must be ({len(labels)}, {len(findings)}), got {probs.shape}"
        )
    if patients is not None and len(patients) != len(labels):
        raise ValueError(f"patients must name one patient per study ({len(labels)})")
    thresholds = []
    for m, finding in enumerate(findings):
        if finding.tier != RiskTier.CRITICAL:
            continue
        present = np.array([lab.get(finding.name) == 1 for lab in labels], dtype=bool)
        if patients is not None:
            present = one_study_per_patient(patients, [1 if p else None for p in present], seed)
        positives = probs[present, m]
        thresholds.append(critical_threshold(finding.name, positives, miss_rate, confidence))
    return CriticalSafetyNet(tuple(thresholds))
