"""What a bundle records of its calibration data, so the node can tell when live input departs
from it: histograms of the study abnormality scores and of per-image input statistics, and the
share of studies it expects to call definite normal.

Training writes a `DriftReference` into the manifest (`drift_reference`); the node measures the
same statistics of what it analyses (`image_statistics`) and compares the two (scxnn_node/drift.py).
Bins are data: numeric histograms have interior edges at the reference's deciles, categorical
ones name their categories. Numpy only, no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

# Statistic names, defined once (reference keys, live sample columns, report entries).
ABNORMALITY_SCORE = "abnormality_score"  # per study: the second stage's score (study maximum)
DEFINITE_NORMAL_SHARE = "definite_normal_share"  # per study: share called definite normal
WINDOWED_MEAN = "windowed_mean"  # per image: mean 0..255 after the percentile window
ROWS = "rows"  # per image, DICOM header
COLUMNS = "columns"
BITS_STORED = "bits_stored"
MANUFACTURER = "manufacturer"  # per image: the header's Manufacturer, normalised
NUMERIC_IMAGE_STATISTICS = (WINDOWED_MEAN, ROWS, COLUMNS)
CATEGORICAL_IMAGE_STATISTICS = (BITS_STORED, MANUFACTURER)

NUMERIC = "numeric"
CATEGORICAL = "categorical"
DEFAULT_BINS = 10  # deciles: the usual granularity of a population stability index
# Fewer bins for a small reference: a bin's proportion estimated from fewer values than this
# adds its own noise to the PSI (an unchanged distribution shows about bins / n either side).
MIN_VALUES_PER_BIN = 20


@dataclass(frozen=True)
class Histogram:
    """Reference proportions in bins. Numeric: `bins` are interior edges e_0 < ... < e_k and
    bin i holds e_{i-1} < v <= e_i (open at both ends), k + 1 proportions. Categorical: `bins`
    are the categories seen, one proportion each; a live value outside them is "unseen"."""

    kind: str
    bins: tuple[float, ...] | tuple[str, ...]
    proportions: tuple[float, ...]
    count: int

    def __post_init__(self) -> None:
        if self.kind not in (NUMERIC, CATEGORICAL):
            raise ValueError(f"histogram kind must be {NUMERIC} or {CATEGORICAL}: {self.kind!r}")
        expected = len(self.bins) + (1 if self.kind == NUMERIC else 0)
        if len(self.proportions) != expected:
            raise ValueError(
                f"{self.kind} histogram with {len(self.bins)} bins needs {expected} proportions, "
                f"got {len(self.proportions)}"
            )
        if any(not (0.0 <= p <= 1.0) for p in self.proportions) or not math.isclose(
            sum(self.proportions), 1.0, abs_tol=1e-6
        ):
            raise ValueError("histogram proportions must lie in [0, 1] and sum to 1")
        if self.kind == NUMERIC and list(self.bins) != sorted(set(self.bins)):
            raise ValueError("numeric histogram edges must be strictly increasing")
        if not isinstance(self.count, int) or self.count < 1:
            raise ValueError("a histogram needs a positive count")

    def live_proportions(self, values: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
        """(reference, live) proportions over the same bins. Categorical: one more bin, for
        values the reference never saw (reference proportion 0)."""
        n = len(values)
        if self.kind == NUMERIC:
            index = np.searchsorted(np.asarray(self.bins, dtype=np.float64), values, side="left")
            counts = np.bincount(index, minlength=len(self.proportions))
            return np.asarray(self.proportions), counts / max(n, 1)
        position = {c: i for i, c in enumerate(self.bins)}
        counts = np.zeros(len(self.bins) + 1)
        for v in values:
            counts[position.get(v, len(self.bins))] += 1
        return np.append(self.proportions, 0.0), counts / max(n, 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "bins": list(self.bins),
            "proportions": [round(p, 8) for p in self.proportions],
            "count": self.count,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Histogram:
        kind = data["kind"]
        bins = tuple(float(b) for b in data["bins"]) if kind == NUMERIC else tuple(data["bins"])
        proportions = tuple(float(p) for p in data["proportions"])
        total = sum(proportions)  # rounded on writing: renormalise
        return cls(kind, bins, tuple(p / total for p in proportions), int(data["count"]))


def numeric_histogram(values: Iterable[float], bins: int = DEFAULT_BINS) -> Histogram | None:
    """Edges at the values' quantiles (ties merged), at most `bins` bins and at least
    MIN_VALUES_PER_BIN values a bin (two bins at least); None without values."""
    data = np.asarray(list(values), dtype=np.float64)
    if data.size == 0:
        return None
    bins = max(2, min(bins, data.size // MIN_VALUES_PER_BIN))
    quantiles = np.quantile(data, np.linspace(0, 1, bins + 1)[1:-1])
    edges = tuple(float(e) for e in np.unique(quantiles))
    index = np.searchsorted(np.asarray(edges), data, side="left")
    counts = np.bincount(index, minlength=len(edges) + 1)
    return Histogram(NUMERIC, edges, tuple(float(c) for c in counts / data.size), int(data.size))


def categorical_histogram(values: Iterable[str]) -> Histogram | None:
    """Each category's share; None without values."""
    items = list(values)
    if not items:
        return None
    categories = sorted(set(items))
    shares = tuple(items.count(c) / len(items) for c in categories)
    return Histogram(CATEGORICAL, tuple(categories), shares, len(items))


def normalised_manufacturer(value: Any) -> str:
    """The header's Manufacturer as compared: blanks collapsed, upper case, 64 characters
    ("" when absent). A vendor name is not patient data."""
    return " ".join(str(value or "").split()).upper()[:64]


@dataclass(frozen=True)
class ImageStatistics:
    """What drift watch measures of one analysed image."""

    windowed_mean: float
    rows: int | None = None
    columns: int | None = None
    bits_stored: int | None = None
    manufacturer: str | None = None  # None: not a DICOM source (training PNG/JPEG)


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def image_statistics(header: Dataset | None, windowed_mean: float) -> ImageStatistics:
    """The statistics of one image from its DICOM header (None for a PNG/JPEG source, whose
    header statistics are unknown) and its mean intensity after windowing."""
    if header is None:
        return ImageStatistics(float(windowed_mean))
    return ImageStatistics(
        float(windowed_mean),
        _int_or_none(header.get("Rows")),
        _int_or_none(header.get("Columns")),
        _int_or_none(header.get("BitsStored")),
        normalised_manufacturer(header.get("Manufacturer")),
    )


@dataclass(frozen=True)
class DriftReference:
    """The calibration part's distributions, as recorded in a bundle's manifest. A statistic
    without reference data (header statistics of a PNG dataset) is simply absent."""

    studies: int
    definite_normal_share: float | None
    histograms: dict[str, Histogram] = field(default_factory=dict)

    def __post_init__(self) -> None:
        share = self.definite_normal_share
        if share is not None and not 0.0 <= share <= 1.0:
            raise ValueError(f"drift_reference.definite_normal_share must be in [0, 1]: {share}")
        known = {ABNORMALITY_SCORE, *NUMERIC_IMAGE_STATISTICS, *CATEGORICAL_IMAGE_STATISTICS}
        unknown = sorted(set(self.histograms) - known)
        if unknown:
            raise ValueError(f"drift_reference.histograms has unknown statistics {unknown}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "studies": self.studies,
            "definite_normal_share": self.definite_normal_share,
            "histograms": {k: h.to_dict() for k, h in sorted(self.histograms.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DriftReference:
        if not isinstance(data, Mapping):
            raise ValueError("drift_reference must be an object")
        share = data.get("definite_normal_share")
        return cls(
            studies=int(data["studies"]),
            definite_normal_share=None if share is None else float(share),
            histograms={k: Histogram.from_dict(h) for k, h in data.get("histograms", {}).items()},
        )


def build_drift_reference(
    study_scores: Sequence[float],
    study_definite_normal: Sequence[bool],
    images: Sequence[ImageStatistics],
    bins: int = DEFAULT_BINS,
) -> DriftReference:
    """The reference of a calibration part: its studies' scores and verdicts, its images'
    statistics (header statistics only from images that have them)."""
    histograms: dict[str, Histogram | None] = {
        ABNORMALITY_SCORE: numeric_histogram(study_scores, bins),
        WINDOWED_MEAN: numeric_histogram((i.windowed_mean for i in images), bins),
        ROWS: numeric_histogram((i.rows for i in images if i.rows is not None), bins),
        COLUMNS: numeric_histogram((i.columns for i in images if i.columns is not None), bins),
        BITS_STORED: categorical_histogram(
            str(i.bits_stored) for i in images if i.bits_stored is not None
        ),
        MANUFACTURER: categorical_histogram(
            i.manufacturer for i in images if i.manufacturer is not None
        ),
    }
    normal = list(study_definite_normal)
    return DriftReference(
        studies=len(normal),
        definite_normal_share=(sum(map(bool, normal)) / len(normal)) if normal else None,
        histograms={k: h for k, h in histograms.items() if h is not None},
    )
