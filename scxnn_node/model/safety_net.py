"""The critical-finding safety net: per critical finding, a threshold on its member's target
probability above which the study is abnormal whatever the second stage says.

The thresholds are data (chosen on calibration patients by training.critical_safety_net and
stored as plain numbers); each record says whether it carries the miss-rate guarantee or had
too few positives for it. The rule is evaluated on the same target probabilities the
thresholds were chosen on (softmax of the member's logits, after any temperature the bundle
applies), so a bundle must store and apply both together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

#: The bundle file that carries the net (CriticalSafetyNet.to_dict()).
SAFETY_NET_FILE = "safety_net.json"
GUARANTEED = "guaranteed"
INSUFFICIENT_POSITIVES = "insufficient_positives"


def _check(
    record: CriticalThreshold | InsufficientPositives,
    numbers: Sequence[str],
    counts: Sequence[str],
) -> None:
    """A bundle's numbers are checked on load: finite probabilities in [0, 1], counts >= 0."""
    for attr in numbers:
        value = getattr(record, attr)
        if value is None and attr == "threshold" and isinstance(record, InsufficientPositives):
            continue
        if not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(
                f"safety-net threshold of {record.finding!r}: {attr} must be a number in "
                f"[0, 1], got {value!r}"
            )
    for attr in counts:
        value = getattr(record, attr)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(
                f"safety-net threshold of {record.finding!r}: {attr} must be a count, "
                f"got {value!r}"
            )


@dataclass(frozen=True)
class CriticalThreshold:
    """A threshold that keeps the finding's miss rate <= miss_rate_target with probability
    >= confidence: the k-th lowest target probability of n_positive calibration positives."""

    finding: str
    threshold: float
    n_positive: int
    order_statistic_k: int
    miss_rate_target: float
    confidence: float
    miss_rate_upper_bound: float  # at `confidence`, for this k and n_positive

    def __post_init__(self) -> None:
        _check(
            self,
            ("threshold", "miss_rate_target", "confidence", "miss_rate_upper_bound"),
            ("n_positive", "order_statistic_k"),
        )

    @property
    def guarantee_met(self) -> bool:
        return True

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": GUARANTEED,
            "finding": self.finding,
            "threshold": self.threshold,
            "n_positive": self.n_positive,
            "order_statistic_k": self.order_statistic_k,
            "miss_rate_target": self.miss_rate_target,
            "confidence": self.confidence,
            "miss_rate_upper_bound": self.miss_rate_upper_bound,
        }


@dataclass(frozen=True)
class InsufficientPositives:
    """Too few calibration positives for the guarantee. The threshold, when there was any
    positive, is the lowest positive's target probability (no calibration miss), and
    miss_rate_upper_bound is what that achieves at `confidence`; with none it is None (the
    rule never fires) and the bound is 1."""

    finding: str
    needed: int
    available: int
    miss_rate_upper_bound: float
    threshold: float | None
    miss_rate_target: float
    confidence: float

    def __post_init__(self) -> None:
        _check(
            self,
            ("threshold", "miss_rate_target", "confidence", "miss_rate_upper_bound"),
            ("needed", "available"),
        )

    @property
    def guarantee_met(self) -> bool:
        return False

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": INSUFFICIENT_POSITIVES,
            "finding": self.finding,
            "needed": self.needed,
            "available": self.available,
            "miss_rate_upper_bound": self.miss_rate_upper_bound,
            "threshold": self.threshold,
            "miss_rate_target": self.miss_rate_target,
            "confidence": self.confidence,
        }


SafetyNetThreshold = CriticalThreshold | InsufficientPositives


def threshold_from_dict(data: Mapping[str, Any]) -> SafetyNetThreshold:
    if not isinstance(data, Mapping):
        raise ValueError("a safety-net threshold must be an object")
    kind = data.get("kind")
    cls: type[CriticalThreshold] | type[InsufficientPositives]
    if kind == GUARANTEED:
        cls = CriticalThreshold
    elif kind == INSUFFICIENT_POSITIVES:
        cls = InsufficientPositives
    else:
        raise ValueError(
            f"safety-net threshold of {data.get('finding')!r}: kind must be {GUARANTEED!r} or "
            f"{INSUFFICIENT_POSITIVES!r}, got {kind!r}"
        )
    fields = [f for f in cls.__dataclass_fields__ if f != "kind"]
    missing = [f for f in fields if f not in data]
    if missing:
        raise ValueError(f"safety-net threshold of {data.get('finding')!r}: missing {missing}")
    return cls(**{f: data[f] for f in fields})


@dataclass(frozen=True)
class CriticalSafetyNet:
    """One threshold per critical finding; a rule fires when target probability >= threshold."""

    thresholds: tuple[SafetyNetThreshold, ...]

    def __post_init__(self) -> None:
        names = [t.finding for t in self.thresholds]
        if len(set(names)) != len(names):
            raise ValueError(f"safety net lists a finding twice: {names}")

    @property
    def findings(self) -> list[str]:
        return [t.finding for t in self.thresholds]

    @property
    def guarantee_met(self) -> bool:
        """True when every critical finding's threshold carries the guarantee."""
        return all(t.guarantee_met for t in self.thresholds)

    def fired_matrix(
        self, target_probability: np.ndarray, finding_names: Sequence[str]
    ) -> np.ndarray:
        """(N, M) booleans for (N, M) target probabilities whose columns are `finding_names`:
        True where that finding's critical rule fires (never for findings outside the net)."""
        probs = np.asarray(target_probability, dtype=np.float64)
        if probs.ndim != 2 or probs.shape[1] != len(finding_names):
            raise ValueError(
                f"target probabilities must be (N, {len(finding_names)}), got {probs.shape}"
            )
        column = {name: m for m, name in enumerate(finding_names)}
        missing = [t.finding for t in self.thresholds if t.finding not in column]
        if missing:
            raise ValueError(f"no target probability for safety-net findings {missing}")
        fired = np.zeros(probs.shape, dtype=bool)
        for t in self.thresholds:
            if t.threshold is not None:
                m = column[t.finding]
                fired[:, m] = probs[:, m] >= t.threshold
        return fired

    def fired(self, target_probability: Mapping[str, float]) -> list[str]:
        """The critical findings whose rule fires for one study, in the net's order."""
        names = list(target_probability)
        row = np.array([[target_probability[n] for n in names]], dtype=np.float64)
        fired = self.fired_matrix(row, names)[0]
        order = {n: i for i, n in enumerate(self.findings)}
        return sorted((n for n, f in zip(names, fired, strict=True) if f), key=order.__getitem__)

    def to_dict(self) -> dict[str, Any]:
        return {"thresholds": [t.to_dict() for t in self.thresholds]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CriticalSafetyNet:
        items = data.get("thresholds") if isinstance(data, Mapping) else None
        if not isinstance(items, list):
            raise ValueError('safety net must be an object with a "thresholds" list')
        return cls(tuple(threshold_from_dict(item) for item in items))
