"""Temperature scaling of each member's 3-class softmax, and the reliability data (diagram
bins, expected calibration error) that show whether its probabilities mean what they say.

One positive temperature T per member divides its logits (scxnn_node.model.temperature's
apply_temperature, the node's own); T is the minimiser of the negative
log-likelihood of the member's classes on held-out images. T > 1 softens an over-confident
member. Dividing by T keeps each member's arg max, so calls do not change; probabilities do.

Fitted on the images whose probabilities later set thresholds, T would make those thresholds'
scores depend on that data: fit it on the "fit" part (training.calibration_split) when the
calibration part sets order-statistic thresholds on temperature-scaled probabilities.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

from scxnn_node.model.temperature import apply_temperature

if TYPE_CHECKING:  # the bundle loader imports torch; this module stays numpy-only
    from scxnn_node.model.bundle import Bundle
    from training.dataset import ManifestEntry

#: Search range of T; a minimiser on its edge means the logits carry (almost) no information.
TEMPERATURE_BOUNDS = (0.05, 20.0)
#: Class label meaning "unknown" in member label arrays; such images are left out.
UNKNOWN = -1


def _known(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels).astype(int).reshape(-1)
    if x.ndim != 2 or len(x) != len(y):
        raise ValueError(f"need (N, C) logits and N labels, got {x.shape} and {y.shape}")
    if ((y < UNKNOWN) | (y >= x.shape[1])).any():
        raise ValueError(f"labels must be class indices 0..{x.shape[1] - 1} or {UNKNOWN}")
    keep = y != UNKNOWN
    return x[keep], y[keep]


def negative_log_likelihood(
    logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0
) -> float:
    """Mean NLL of the labels (class indices, -1 unknown) under softmax(logits / T)."""
    x, y = _known(logits, labels)
    if len(y) == 0:
        raise ValueError("no image with a known class")
    log_p = log_softmax(x / temperature, axis=1)
    return float(-log_p[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T > 0 minimising the NLL of (N, C) logits' classes. The NLL is convex in 1/T, so
    a bounded scalar search over log T finds the minimum."""
    x, y = _known(logits, labels)
    if len(y) == 0:
        raise ValueError("fitting a temperature needs images with a known class")
    lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(x, y, math.exp(log_t)),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(math.exp(result.x))


def fit_member_temperatures(logits: np.ndarray, member_labels: np.ndarray) -> np.ndarray:
    """One temperature per member from (N, M, C) logits and (N, M) member classes (normal,
    target, others as 0, 1, 2; -1 unknown)."""
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(member_labels)
    if x.ndim != 3 or y.shape != x.shape[:2]:
        raise ValueError(f"need (N, M, C) logits and (N, M) labels, got {x.shape} and {y.shape}")
    return np.array([fit_temperature(x[:, m], y[:, m]) for m in range(x.shape[1])])


@dataclass(frozen=True)
class ReliabilityBin:
    """One bin of a reliability diagram: predictions with lower <= p < upper (the last bin
    includes 1), their mean, the observed frequency of the event and how many there were."""

    lower: float
    upper: float
    mean_predicted: float | None  # None for an empty bin
    observed_frequency: float | None
    count: int


def reliability_bins(
    predicted: np.ndarray, observed: np.ndarray, n_bins: int = 10
) -> list[ReliabilityBin]:
    """Equal-width bins over [0, 1] of predicted probabilities of an event and whether it
    happened (booleans)."""
    p = np.asarray(predicted, dtype=np.float64).reshape(-1)
    o = np.asarray(observed, dtype=bool).reshape(-1)
    if len(p) != len(o):
        raise ValueError("predicted and observed need one value per prediction")
    if n_bins < 1:
        raise ValueError("n_bins must be >= 1")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("predicted probabilities must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    index = np.minimum((p * n_bins).astype(int), n_bins - 1)
    bins = []
    for b in range(n_bins):
        rows = index == b
        n = int(rows.sum())
        bins.append(
            ReliabilityBin(
                lower=float(edges[b]),
                upper=float(edges[b + 1]),
                mean_predicted=float(p[rows].mean()) if n else None,
                observed_frequency=float(o[rows].mean()) if n else None,
                count=n,
            )
        )
    return bins


def expected_calibration_error(bins: Sequence[ReliabilityBin]) -> float:
    """Count-weighted mean |mean predicted - observed frequency| over the non-empty bins."""
    total = sum(b.count for b in bins)
    if total == 0:
        raise ValueError("no predictions in any bin")
    return float(
        sum(
            b.count * abs(b.mean_predicted - b.observed_frequency)
            for b in bins
            if b.count and b.mean_predicted is not None and b.observed_frequency is not None
        )
        / total
    )


def top_label_reliability(
    logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0, n_bins: int = 10
) -> list[ReliabilityBin]:
    """Reliability of a member's call: its softmax(logits / T) confidence in the arg max
    class against whether that class was right (images with label -1 left out)."""
    x, y = _known(logits, labels)
    probs = softmax(apply_temperature(x, temperature), axis=1)
    return reliability_bins(probs.max(axis=1), probs.argmax(axis=1) == y, n_bins)

def member_reliability(
    bundle: Bundle, entries: Sequence[ManifestEntry], logits: np.ndarray
) -> dict[str, list[ReliabilityBin]]:
    """Per member: the reliability of its (temperature-scaled) call on the evaluated images."""
    from training.member_targets import member_class  # the dataset rules, needed only here

    curves = {}
    for m, finding in enumerate(bundle.manifest.findings):
        labels = np.array(
            [-1 if (c := member_class(e, finding.name)) is None else c for e in entries]
        )
        if (labels >= 0).any():
            t = 1.0 if bundle.temperatures is None else float(bundle.temperatures[m])
            curves[finding.name] = top_label_reliability(logits[:, m], labels, t)
    return curves

