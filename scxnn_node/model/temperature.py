"""Member temperatures, numpy only: dividing each member's logits before its softmax, and the
bundle file (temperatures.json) that carries one plain number per member.

Training fits the temperatures (training/temperature.py) and the node applies them with this
one function, so the probabilities the critical safety net was calibrated on are the ones the
node thresholds. Dividing by T keeps each member's arg max: calls do not change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

#: The bundle file: {"temperatures": {finding: T}} in catalogue order.
TEMPERATURES_FILE = "temperatures.json"


def apply_temperature(logits: np.ndarray, temperature: float | np.ndarray) -> np.ndarray:
    """Logits divided by the temperature: one T for (N, C) logits, or one per member
    (shape (M,)) for (N, M, C) logits."""
    x = np.asarray(logits, dtype=np.float64)
    t = np.asarray(temperature, dtype=np.float64)
    if (t <= 0).any() or not np.isfinite(t).all():
        raise ValueError(f"temperatures must be positive and finite, got {temperature!r}")
    if t.ndim == 0:
        return x / t
    if x.ndim != 3 or t.shape != (x.shape[1],):
        raise ValueError(
            f"per-member temperatures {t.shape} need (N, {len(t)}, C) logits, got {x.shape}"
        )
    return x / t[None, :, None]


def temperatures_to_dict(findings: Sequence[str], temperatures: Sequence[float]) -> dict[str, Any]:
    if len(findings) != len(temperatures):
        raise ValueError("one temperature per finding")
    return {"temperatures": {f: float(t) for f, t in zip(findings, temperatures, strict=True)}}


def temperatures_from_dict(data: Mapping[str, Any], findings: Sequence[str]) -> np.ndarray:
    """The (M,) temperatures of `findings` (the bundle's members, in order); a missing,
    unexpected or non-positive value is refused, naming the finding."""
    table = data.get("temperatures") if isinstance(data, Mapping) else None
    if not isinstance(table, Mapping):
        raise ValueError('must be an object with a "temperatures" object')
    extra = sorted(set(table) - set(findings))
    missing = [f for f in findings if f not in table]
    if missing or extra:
        raise ValueError(
            f"temperatures must name the members exactly: missing {missing}, extra {extra}"
        )
    values = []
    for finding in findings:
        value = table[finding]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"temperature of {finding!r} must be a number, got {value!r}")
        if not (np.isfinite(value) and value > 0):
            raise ValueError(f"temperature of {finding!r} must be positive and finite, got {value}")
        values.append(float(value))
    return np.array(values, dtype=np.float64)
