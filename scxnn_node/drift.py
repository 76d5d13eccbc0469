"""Drift watch: how far the node's live studies have moved from the bundle's calibration data.

The worker records, in the commit that stores a result, one sample per analysed study (its
abnormality score, whether it was called definite normal) and one per analysed image (rows,
columns, bits stored, manufacturer, mean intensity after windowing): `record_drift_samples`.
`drift_report` compares the newest `drift.window_studies` studies of the bundle being served
with the bundle's `drift_reference` (scxnn_node/drift_reference.py), statistic by statistic:

- abnormality score, mean intensity after windowing, rows, columns, bits stored: the population
  stability index PSI = sum over bins of (live - ref) * ln(live / ref), on the reference's bins
  (deciles; categories for bits stored, plus one bin for values the reference never had). Live
  proportions are smoothed with half a count per bin and both sides floored at 1e-4, so an
  empty bin does not make it infinite. PSI is 0 for equal proportions and grows with the shift;
  the usual reading is < 0.1 stable, 0.1 to 0.25 moderate, > 0.25 significant, and
  `drift.psi_threshold` (0.25) is the warning line. An unchanged distribution still shows about
  (bins - 1) / n from sampling alone, which is why no verdict is given below `drift.min_samples`.
- definite-normal share: drifted when the share the bundle expects (from its calibration part)
  lies outside the 99 % Wilson interval of the live share.
- manufacturer: drifted when more than `drift.unseen_manufacturer_share` of live images come
  from manufacturers the calibration data never had.

A statistic the bundle has no reference for (bundles from before drift watch; header statistics
of a dataset of PNG files) is reported as no_reference with its live sample count. The
scheduler runs `DriftWatch.check`, which prunes the window and records a WARNING event of kind
"drift" (subject: the statistic) when a statistic drifts, again only after
`drift.repeat_warning_hours`, and an INFO event when it is back within its threshold.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from scxnn_node.config import DriftSection, NodeConfig
from scxnn_node.drift_reference import (
    ABNORMALITY_SCORE,
    BITS_STORED,
    COLUMNS,
    DEFINITE_NORMAL_SHARE,
    MANUFACTURER,
    ROWS,
    WINDOWED_MEAN,
    DriftReference,
    Histogram,
    image_statistics,
)
from scxnn_node.model.manifest import BundleError, Manifest, read_manifest
from scxnn_node.model.result import StudyResult, Verdict
from scxnn_node.store.db import Database, session_now
from scxnn_node.store.models import DriftSample, Event

if TYPE_CHECKING:  # the worker's type; importing it here would load torch for `status`
    from scxnn_node.triage import PreparedInstance

log = logging.getLogger(__name__)

STUDY = "study"
IMAGE = "image"
EVENT_KIND = "drift"
PSI_FLOOR = 1e-4
LIVE_SMOOTHING = 0.5  # counts added to every live bin
WILSON_Z_99 = 2.5758293035489  # two-sided 99 %

PSI = "psi"
WILSON_99 = "wilson_99"
UNSEEN_SHARE = "unseen_share"


class DriftState(StrEnum):
    OK = "ok"
    DRIFTED = "drifted"
    TOO_FEW_SAMPLES = "too_few_samples"
    NO_REFERENCE = "no_reference"


def population_stability_index(
    reference: Sequence[float] | np.ndarray,
    live: Sequence[float] | np.ndarray,
    floor: float = PSI_FLOOR,
) -> float:
    """sum((live - ref) * ln(live / ref)) over bins, each proportion floored at `floor`;
    never negative, 0 when the proportions are equal."""
    ref = np.maximum(np.asarray(reference, dtype=np.float64), floor)
    cur = np.maximum(np.asarray(live, dtype=np.float64), floor)
    if ref.shape != cur.shape:
        raise ValueError(f"PSI needs proportions over the same bins: {ref.shape} != {cur.shape}")
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def smoothed_proportions(proportions: np.ndarray, n: int) -> np.ndarray:
    """Live proportions of `n` samples with LIVE_SMOOTHING counts added to every bin."""
    counts = np.asarray(proportions, dtype=np.float64) * n + LIVE_SMOOTHING
    return counts / counts.sum()


def wilson_interval(successes: int, n: int, z: float = WILSON_Z_99) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion ((0, 1) without trials)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class DriftStatistic:
    """One statistic's comparison. `value`: the PSI, the live definite-normal share, or the
    unseen-manufacturer share; `threshold`: the PSI or share warned above, or (wilson_99) the
    expected share, warned when outside the live interval in `detail`."""

    name: str
    unit: str  # "study" or "image": what `samples` counts
    statistic: str  # "psi", "wilson_99" or "unseen_share"
    value: float | None
    threshold: float | None
    samples: int
    min_samples: int
    state: DriftState
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def drifted(self) -> bool:
        return self.state is DriftState.DRIFTED

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit": self.unit,
            "statistic": self.statistic,
            "value": None if self.value is None else round(self.value, 6),
            "threshold": None if self.threshold is None else round(self.threshold, 6),
            "samples": self.samples,
            "min_samples": self.min_samples,
            "state": self.state.value,
            "drifted": self.drifted,
            "detail": self.detail,
        }

    def describe(self) -> str:
        """One line for `status` and the warning event."""
        return describe_statistic(self.to_dict())


@dataclass(frozen=True)
class DriftReport:
    """The live window of one bundle version against that bundle's reference."""

    bundle_version: str
    has_reference: bool
    window_studies: int
    studies: int
    images: int
    statistics: tuple[DriftStatistic, ...]

    @property
    def drifted(self) -> bool:
        return any(s.drifted for s in self.statistics)

    def statistic(self, name: str) -> DriftStatistic:
        return next(s for s in self.statistics if s.name == name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bundle_version": self.bundle_version,
            "has_reference": self.has_reference,
            "window_studies": self.window_studies,
            "studies": self.studies,
            "images": self.images,
            "drifted": self.drifted,
            "statistics": [s.to_dict() for s in self.statistics],
        }


@dataclass(frozen=True)
class _Window:
    scores: list[float]
    definite_normal: list[bool]
    images: dict[str, list[Any]]


def record_drift_samples(
    session: Session, result: StudyResult, prepared: Sequence[PreparedInstance]
) -> None:
    """Add the samples of one stored result to the live window (in the caller's transaction,
    so they exist exactly when the result does); a study not analysed adds none."""
    if result.verdict is Verdict.NOT_ANALYSED or result.abnormality_score is None:
        return
    at = session_now(session)
    version = result.bundle.version
    session.add(
        DriftSample(
            at=at,
            bundle_version=version,
            kind=STUDY,
            abnormality_score=float(result.abnormality_score),
            definite_normal=result.verdict is Verdict.DEFINITE_NORMAL,
        )
    )
    analysed = set(result.analysed_instances)
    for p in prepared:  # added after the study's row, so inserted (numbered) after it
        if not p.analysed or p.sop_instance_uid not in analysed or p.windowed_mean is None:
            continue
        stats = image_statistics(p.header, p.windowed_mean)
        session.add(
            DriftSample(
                at=at,
                bundle_version=version,
                kind=IMAGE,
                windowed_mean=stats.windowed_mean,
                rows=stats.rows,
                columns=stats.columns,
                bits_stored=stats.bits_stored,
                manufacturer=stats.manufacturer,
            )
        )


def _window(session: Session, bundle_version: str, window_studies: int) -> _Window:
    """The newest `window_studies` study samples of the version and the image samples after
    the oldest of them (the images of those studies)."""
    first = session.scalar(
        select(DriftSample.id)
        .where(DriftSample.kind == STUDY, DriftSample.bundle_version == bundle_version)
        .order_by(DriftSample.id.desc())
        .offset(window_studies - 1)
        .limit(1)
    )
    rows = session.execute(
        select(DriftSample).where(
            DriftSample.bundle_version == bundle_version, DriftSample.id >= (first or 0)
        )
    ).scalars()
    window = _Window([], [], {k: [] for k in (WINDOWED_MEAN, ROWS, COLUMNS, BITS_STORED)})
    window.images[MANUFACTURER] = []
    for row in rows:
        if row.kind == STUDY:
            if row.abnormality_score is not None:
                window.scores.append(row.abnormality_score)
            if row.definite_normal is not None:
                window.definite_normal.append(bool(row.definite_normal))
            continue
        for name in (WINDOWED_MEAN, ROWS, COLUMNS, MANUFACTURER):
            value = getattr(row, name)
            if value is not None:
                window.images[name].append(value)
        if row.bits_stored is not None:
            window.images[BITS_STORED].append(str(row.bits_stored))  # categories are strings
    return window


def _psi_statistic(
    name: str, unit: str, values: list[Any], reference: Histogram | None, settings: DriftSection
) -> DriftStatistic:
    base = {
        "name": name,
        "unit": unit,
        "statistic": PSI,
        "threshold": settings.psi_threshold,
        "samples": len(values),
        "min_samples": settings.min_samples,
    }
    if reference is None:
        return DriftStatistic(**base, value=None, state=DriftState.NO_REFERENCE)
    if len(values) < settings.min_samples:
        return DriftStatistic(**base, value=None, state=DriftState.TOO_FEW_SAMPLES)
    ref, live = reference.live_proportions(values)
    value = population_stability_index(ref, smoothed_proportions(live, len(values)))
    detail: dict[str, Any] = {"bins": len(ref)}
    if reference.kind == "numeric":
        detail["live_median"] = round(float(np.median(np.asarray(values, dtype=float))), 4)
    state = DriftState.DRIFTED if value > settings.psi_threshold else DriftState.OK
    return DriftStatistic(**base, value=value, state=state, detail=detail)


def _normal_share_statistic(
    normal: list[bool], expected: float | None, settings: DriftSection
) -> DriftStatistic:
    n, k = len(normal), sum(normal)
    base = {
        "name": DEFINITE_NORMAL_SHARE,
        "unit": STUDY,
        "statistic": WILSON_99,
        "threshold": expected,
        "samples": n,
        "min_samples": settings.min_samples,
        "value": k / n if n else None,
    }
    if expected is None:
        return DriftStatistic(**base, state=DriftState.NO_REFERENCE)
    if n < settings.min_samples:
        return DriftStatistic(**base, state=DriftState.TOO_FEW_SAMPLES)
    low, high = wilson_interval(k, n)
    state = DriftState.OK if low <= expected <= high else DriftState.DRIFTED
    detail = {"interval": [round(low, 4), round(high, 4)], "confidence": 0.99}
    return DriftStatistic(**base, state=state, detail=detail)


def _manufacturer_statistic(
    names: list[str], reference: Histogram | None, settings: DriftSection
) -> DriftStatistic:
    counts = Counter(names)
    base = {
        "name": MANUFACTURER,
        "unit": IMAGE,
        "statistic": UNSEEN_SHARE,
        "threshold": settings.unseen_manufacturer_share,
        "samples": len(names),
        "min_samples": settings.min_samples,
    }
    detail: dict[str, Any] = {"live": dict(counts.most_common(5))}
    if reference is None:
        return DriftStatistic(**base, value=None, state=DriftState.NO_REFERENCE, detail=detail)
    seen = set(reference.bins)
    unseen = sum(c for name, c in counts.items() if name not in seen)
    value = unseen / len(names) if names else None
    if value is None or len(names) < settings.min_samples:
        return DriftStatistic(**base, value=value, state=DriftState.TOO_FEW_SAMPLES, detail=detail)
    drifted = value > settings.unseen_manufacturer_share
    return DriftStatistic(
        **base, value=value, state=DriftState.DRIFTED if drifted else DriftState.OK, detail=detail
    )


def drift_report(
    db: Database, manifest: Manifest, settings: DriftSection | None = None
) -> DriftReport:
    """The newest `settings.window_studies` studies served with `manifest`'s bundle version
    against its drift reference: one read of at most that many studies' samples, then numpy."""
    settings = settings or DriftSection()
    with db.session() as session:
        window = _window(session, manifest.version, settings.window_studies)
    reference = manifest.drift_reference or DriftReference(0, None)
    histograms = reference.histograms
    statistics = (
        _psi_statistic(
            ABNORMALITY_SCORE, STUDY, window.scores, histograms.get(ABNORMALITY_SCORE), settings
        ),
        _normal_share_statistic(window.definite_normal, reference.definite_normal_share, settings),
        *(
            _psi_statistic(name, IMAGE, window.images[name], histograms.get(name), settings)
            for name in (WINDOWED_MEAN, ROWS, COLUMNS, BITS_STORED)
        ),
        _manufacturer_statistic(
            window.images[MANUFACTURER], histograms.get(MANUFACTURER), settings
        ),
    )
    return DriftReport(
        bundle_version=manifest.version,
        has_reference=manifest.drift_reference is not None,
        window_studies=settings.window_studies,
        studies=len(window.scores),
        images=len(window.images[WINDOWED_MEAN]),
        statistics=statistics,
    )


def node_drift_report(db: Database, config: NodeConfig) -> DriftReport | None:
    """The report for the configured bundle; None when its manifest cannot be read."""
    try:
        manifest = read_manifest(config.model.bundle)
    except BundleError as exc:
        log.warning("drift watch: %s", exc)
        return None
    return drift_report(db, manifest, config.drift)


def prune_drift_samples(db: Database, window_studies: int) -> int:
    """Delete samples older than the newest `window_studies` studies (of any bundle
    version); returns how many rows went."""
    with db.session() as session:
        first = session.scalar(
            select(DriftSample.id)
            .where(DriftSample.kind == STUDY)
            .order_by(DriftSample.id.desc())
            .offset(window_studies - 1)
            .limit(1)
        )
        if first is None:
            return 0
        return session.execute(delete(DriftSample).where(DriftSample.id < first)).rowcount or 0


def describe_statistic(entry: dict[str, Any]) -> str:
    """A statistic's dict (DriftStatistic.to_dict) as one line of text."""
    name, state, n = entry["name"], entry["state"], entry["samples"]
    plural = {STUDY: "studies"}.get(entry["unit"], f"{entry['unit']}s")
    counted = f"{n} {entry['unit'] if n == 1 else plural}"
    if state == DriftState.NO_REFERENCE:
        return f"{name}: no reference in the bundle ({counted})"
    if state == DriftState.TOO_FEW_SAMPLES:
        return f"{name}: too few samples ({counted}, needs {entry['min_samples']})"
    verdict = "DRIFTED" if entry["drifted"] else "ok"
    if entry["statistic"] == WILSON_99:
        low, high = entry["detail"]["interval"]
        return (
            f"{name}: {verdict}, live {entry['value']:.3f} (99 % interval {low:.3f}-{high:.3f}) "
            f"vs expected {entry['threshold']:.3f} ({counted})"
        )
    what = "PSI" if entry["statistic"] == PSI else "unseen share"
    return (
        f"{name}: {verdict}, {what} {entry['value']:.3f} (threshold {entry['threshold']:g}, "
        f"{counted})"
    )


def format_drift(section: dict[str, Any]) -> list[str]:
    """The `status` text of a report's dict (DriftReport.to_dict)."""
    head = (
        f"drift (bundle {section['bundle_version']}, {section['studies']} studies and "
        f"{section['images']} images in the window of {section['window_studies']})"
        + ("" if section["has_reference"] else ": the bundle has no drift reference")
    )
    return [head + ":", *(f"  {describe_statistic(s)}" for s in section["statistics"])]


class DriftWatch:
    """The scheduler's drift task: prune the window, compare, warn once per shift."""

    def __init__(self, config: NodeConfig, db: Database) -> None:
        self.config = config
        self.db = db

    def check(self) -> DriftReport | None:
        settings = self.config.drift
        prune_drift_samples(self.db, settings.window_studies)
        report = node_drift_report(self.db, self.config)
        if report is not None:
            self._announce(report)
        return report

    def _announce(self, report: DriftReport) -> None:
        repeat = timedelta(hours=self.config.drift.repeat_warning_hours)
        now = self.db.now()
        for stat in report.statistics:
            if stat.state not in (DriftState.OK, DriftState.DRIFTED):
                continue  # no verdict: nothing to announce or to clear
            with self.db.session() as session:
                last = session.execute(
                    select(Event.level, Event.at)
                    .where(Event.kind == EVENT_KIND, Event.subject == stat.name)
                    .order_by(Event.id.desc())
                    .limit(1)
                ).first()
            warned = last is not None and last.level == "WARNING"
            if stat.drifted and (not warned or last.at < now - repeat):
                message = f"bundle {report.bundle_version}: {stat.describe()}"
                log.warning("drift watch: %s", message)
                self.db.record_event(EVENT_KIND, message, subject=stat.name, level="WARNING")
            elif not stat.drifted and warned:
                message = f"bundle {report.bundle_version}: back within: {stat.describe()}"
                log.info("drift watch: %s", message)
                self.db.record_event(EVENT_KIND, message, subject=stat.name, level="INFO")
