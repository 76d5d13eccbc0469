"""Drift watch: the population stability index and the Wilson interval behave as documented;
the training side records its calibration part's distributions in the bundle; live samples
recorded as the worker records them are compared with them, and a shifted input raises a
warning in `status` and one "drift" event (an unshifted one raises none)."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from dicom_factory import chest_pixels, make_dataset, write
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from sqlalchemy import func, select

from scxnn_node.drift import (
    DriftState,
    DriftWatch,
    drift_report,
    population_stability_index,
    record_drift_samples,
    smoothed_proportions,
    wilson_interval,
)
from scxnn_node.drift_reference import (
    ABNORMALITY_SCORE,
    BITS_STORED,
    COLUMNS,
    DEFINITE_NORMAL_SHARE,
    MANUFACTURER,
    ROWS,
    WINDOWED_MEAN,
    ImageStatistics,
    build_drift_reference,
    numeric_histogram,
)
from scxnn_node.findings import THESIS_CATALOGUE, RiskTier
from scxnn_node.imaging.preprocess import PreprocessSpec
from scxnn_node.model.bundle import write_bundle
from scxnn_node.model.manifest import BundleError, Manifest, read_manifest, verify_bundle
from scxnn_node.model.result import (
    UNSPECIFIED_TIER,
    BundleIdentity,
    FindingResult,
    MemberCall,
    StudyResult,
    Verdict,
)
from scxnn_node.status import format_status, node_status
from scxnn_node.store.assembly import InstanceRecord, enqueue_quiet_studies, record_instance
from scxnn_node.store.db import Database
from scxnn_node.store.models import DriftSample, Event
from scxnn_node.store.spool import Spool
from scxnn_node.testing.loopback import node_config
from scxnn_node.triage import PreparedInstance, prepare_instance
from scxnn_node.worker import TriageWorker
from training.calibrate import ValidationImages, calibrate
from training.drift_reference import calibration_drift_reference, source_image_statistics
from training.untrained import untrained_parts

SMALL = ("pneumothorax", "nodule", "cardiomegaly")
VERSION = "1.2.3"


# --- the statistics -------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.01, 10.0), min_size=2, max_size=12))
def test_psi_is_zero_for_equal_proportions_and_positive_otherwise(weights):
    p = np.array(weights) / sum(weights)
    assert population_stability_index(p, p) == pytest.approx(0.0, abs=1e-12)
    q = np.roll(p, 1)
    value = population_stability_index(p, q)
    assert value >= 0.0
    assert value > 0.0 or np.allclose(p, q)
    assert value == pytest.approx(population_stability_index(q, p))  # symmetric


def test_psi_grows_with_the_shift_and_crosses_the_threshold():
    rng = np.random.default_rng(0)
    reference = numeric_histogram(rng.normal(size=2000))
    live = rng.normal(size=1000)
    values = []
    for shift in (0.0, 0.25, 0.5, 1.0, 2.0):
        ref, cur = reference.live_proportions(live + shift)
        values.append(population_stability_index(ref, smoothed_proportions(cur, len(live))))
    assert values == sorted(values) and len(set(values)) == len(values)
    assert values[0] < 0.1 < 0.25 < values[3]


def test_an_empty_live_bin_keeps_the_psi_finite():
    ref = np.array([0.5, 0.5])
    assert np.isfinite(population_stability_index(ref, np.array([1.0, 0.0])))
    assert np.isfinite(population_stability_index(ref, smoothed_proportions(np.array([1, 0]), 9)))


def test_a_small_reference_gets_fewer_bins():
    rng = np.random.default_rng(1)
    assert len(numeric_histogram(rng.normal(size=1000)).proportions) == 10
    assert len(numeric_histogram(rng.normal(size=60)).proportions) == 3
    assert numeric_histogram(np.full(50, 2048.0)).bins == (2048.0,)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 400), st.integers(1, 400))
def test_wilson_interval_holds_the_observed_share(successes, extra):
    n = successes + extra
    low, high = wilson_interval(successes, n)
    assert 0.0 <= low <= successes / n <= high <= 1.0
    wider = wilson_interval(successes, n, z=3.5)
    assert wider[0] <= low and wider[1] >= high


def test_the_interval_narrows_with_more_studies():
    small, large = wilson_interval(20, 50), wilson_interval(400, 1000)
    assert large[1] - large[0] < small[1] - small[0]


# --- the reference in the manifest ------------------------------------------------------------


def _reference(rng: np.random.Generator, n_studies: int = 1000):
    scores = rng.normal(0.0, 1.0, n_studies)
    images = [
        ImageStatistics(float(m), 2048, 2500, 12, "ACME")
        for m in rng.normal(140.0, 5.0, n_studies)
    ]
    return build_drift_reference(scores.tolist(), (scores < 0).tolist(), images)


def _manifest(reference=None) -> Manifest:
    manifest = untrained_parts("densenet_small", 32, SMALL)[0]
    return replace(manifest, version=VERSION, drift_reference=reference)


def test_the_reference_survives_the_manifest_round_trip():
    reference = _reference(np.random.default_rng(2))
    manifest = _manifest(reference)
    again = Manifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert again.drift_reference is not None
    assert again.drift_reference.to_dict() == reference.to_dict()
    assert 0.4 < again.drift_reference.definite_normal_share < 0.6
    assert again.drift_reference.histograms[MANUFACTURER].bins == ("ACME",)
    older = {k: v for k, v in manifest.to_dict().items() if k != "drift_reference"}
    assert Manifest.from_dict(older).drift_reference is None  # bundles from before drift watch
    broken = manifest.to_dict()
    broken["drift_reference"]["histograms"][WINDOWED_MEAN]["proportions"] = [0.5]
    with pytest.raises(BundleError, match="proportions"):
        Manifest.from_dict(broken)


# --- the live window against it ---------------------------------------------------------------


def _header(manufacturer: str = "ACME", rows: int = 2048, columns: int = 2500) -> Dataset:
    ds = Dataset()
    ds.Rows, ds.Columns, ds.BitsStored, ds.Manufacturer = rows, columns, 12, manufacturer
    return ds


def _result(score: float, version: str = VERSION) -> StudyResult:
    """A study as the worker has it when it stores the result: verdict from the score."""
    normal = score < 0
    uid = pydicom.uid.generate_uid()
    finding = FindingResult(
        "nodule", RiskTier.URGENT, MemberCall.NORMAL, {"normal": 0.8, "target": 0.1, "others": 0.1}
    )
    result = StudyResult(
        study_instance_uid=pydicom.uid.generate_uid(),
        verdict=Verdict.DEFINITE_NORMAL if normal else Verdict.ABNORMAL,
        reason=None,
        risk_tier=None if normal else UNSPECIFIED_TIER,
        abnormality_score=score,
        threshold=0.0,
        findings=(finding,),
        bundle=BundleIdentity("test", version, True),
        analysed_instances=(uid,),
    )
    return result


def _feed(db: Database, scores, means, manufacturer: str = "ACME", version: str = VERSION):
    for score, mean in zip(scores, means, strict=True):
        result = _result(float(score), version)
        uid = result.analysed_instances[0]
        prepared = [
            PreparedInstance(
                result.study_instance_uid,
                uid,
                np.zeros((4, 4), np.uint8),
                header=_header(manufacturer),
                windowed_mean=float(mean),
            ),
            # Skipped by policy: not a sample.
            PreparedInstance(result.study_instance_uid, "1.2.3.4.5", None, "lateral view"),
        ]
        with db.session() as session:
            record_drift_samples(session, result, prepared)


@pytest.fixture
def watched(tmp_path):
    """A node config whose bundle carries a reference, and its database."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    manifest = _manifest(_reference(np.random.default_rng(3)))
    (bundle / "manifest.json").write_text(json.dumps(manifest.to_dict()))
    config = node_config(
        tmp_path, model={"bundle": str(bundle)}, drift={"window_studies": 300, "min_samples": 100}
    )
    db = Database(config.database.url)
    db.create_schema()
    yield config, db, manifest
    db.dispose()


def _drift_events(db: Database) -> list[tuple[str, str, str]]:
    with db.session() as session:
        rows = session.execute(
            select(Event.level, Event.subject, Event.message)
            .where(Event.kind == "drift")
            .order_by(Event.id)
        ).all()
    return [tuple(r) for r in rows]


def test_unshifted_studies_raise_no_warning(watched):
    config, db, _manifest = watched
    rng = np.random.default_rng(4)
    _feed(db, rng.normal(0, 1, 300), rng.normal(140, 5, 300))
    report = DriftWatch(config, db).check()
    assert report is not None and report.has_reference
    assert (report.studies, report.images) == (300, 300)
    states = {s.name: s.state for s in report.statistics}
    assert set(states.values()) == {DriftState.OK}, states
    assert report.statistic(ABNORMALITY_SCORE).value < 0.1
    assert not report.drifted and _drift_events(db) == []
    text = format_status(node_status(db, drift=report))
    assert "DRIFTED" not in text and "abnormality_score: ok, PSI" in text


def test_shifted_studies_raise_one_warning_per_statistic_until_they_recover(watched):
    config, db, _manifest = watched
    rng = np.random.default_rng(5)
    # Scores one standard deviation up (more abnormal calls), inverted-looking images from a
    # vendor the calibration data never had.
    _feed(db, rng.normal(1.0, 1, 300), 255 - rng.normal(140, 5, 300), manufacturer="OTHERCO")
    watch = DriftWatch(config, db)
    report = watch.check()
    drifted = {s.name for s in report.statistics if s.drifted}
    assert drifted == {ABNORMALITY_SCORE, DEFINITE_NORMAL_SHARE, WINDOWED_MEAN, MANUFACTURER}
    assert report.statistic(ABNORMALITY_SCORE).value > config.drift.psi_threshold
    share = report.statistic(DEFINITE_NORMAL_SHARE)
    low, high = share.detail["interval"]
    assert not low <= share.threshold <= high  # the expected share is outside the live interval
    assert report.statistic(MANUFACTURER).value == 1.0
    assert {s.name: s.state for s in report.statistics}[ROWS] is DriftState.OK

    status = node_status(db, drift=report)
    assert status["drift"]["drifted"] is True
    text = format_status(status)
    assert "windowed_mean: DRIFTED, PSI" in text and "manufacturer: DRIFTED" in text
    events = _drift_events(db)
    assert sorted(e[1] for e in events) == sorted(drifted)
    assert {e[0] for e in events} == {"WARNING"}
    assert any(e["what"] == "drift" for e in status["last_errors"])

    watch.check()  # still drifted: no second warning within repeat_warning_hours
    assert len(_drift_events(db)) == len(drifted)

    _feed(db, rng.normal(0, 1, 300), rng.normal(140, 5, 300))  # the window is unshifted again
    report = watch.check()
    assert not report.drifted
    cleared = [e for e in _drift_events(db) if e[0] == "INFO"]
    assert sorted(e[1] for e in cleared) == sorted(drifted)
    assert all("back within" in e[2] for e in cleared)
    with db.session() as session:  # pruned to the window
        studies = session.scalar(
            select(func.count()).select_from(DriftSample).where(DriftSample.kind == "study")
        )
    assert studies == config.drift.window_studies


def test_too_few_studies_and_no_reference_give_no_verdict(watched, tmp_path):
    config, db, manifest = watched
    rng = np.random.default_rng(6)
    _feed(db, rng.normal(3, 1, 20), rng.normal(60, 5, 20), manufacturer="OTHERCO")
    report = drift_report(db, manifest, config.drift)
    assert {s.state for s in report.statistics} == {DriftState.TOO_FEW_SAMPLES}
    assert report.statistic(ABNORMALITY_SCORE).samples == 20
    bare = drift_report(db, replace(manifest, drift_reference=None), config.drift)
    assert {s.state for s in bare.statistics} == {DriftState.NO_REFERENCE}
    assert not bare.has_reference and not bare.drifted
    # Samples of another bundle version are not this bundle's window.
    other = drift_report(db, replace(manifest, version="9.9.9"), config.drift)
    assert (other.studies, other.images) == (0, 0)
    assert DriftWatch(config, db).check() is not None and _drift_events(db) == []


def test_a_study_not_analysed_adds_no_sample(watched):
    _config, db, manifest = watched
    result = StudyResult(
        "1.2.9.1", Verdict.NOT_ANALYSED, "no usable image", None, None, None, (),
        BundleIdentity("test", VERSION, True),
    )  # fmt: skip
    with db.session() as session:
        record_drift_samples(session, result, [])
    assert drift_report(db, manifest).studies == 0


# --- the worker and the training side, for real ---------------------------------------------


def _chest(seed: int, inverted: bool = False, manufacturer: str = "ACME") -> Dataset:
    pixels = chest_pixels(96, seed=seed, bits=12)
    if inverted:  # a MONOCHROME1 image labelled MONOCHROME2: bone dark
        pixels = (4095 - pixels).astype(np.uint16)
    ds = make_dataset(pixels)
    ds.Manufacturer = manufacturer
    return ds


def _receive(db: Database, spool: Spool, ds: Dataset) -> None:
    """An instance as the SCP leaves it: its spool file and its committed row."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    study = str(ds.StudyInstanceUID)
    rel = spool.instance_path(study, ds.SOPInstanceUID)
    spool.write_durably(rel, buffer.getvalue())
    record = InstanceRecord(
        ds.SOPInstanceUID, study, ds.SeriesInstanceUID, ds.SOPClassUID, rel, 1, "PACS"
    )
    assert record_instance(db, record)


def test_the_worker_records_samples_and_inverted_images_raise_the_warning(
    tmp_path, database_url
):
    spec = PreprocessSpec(size=64)
    seeds = range(12)
    # The reference, measured by the training side's function on the same kind of images.
    sources = [write(_chest(s), tmp_path / f"ref-{s}.dcm") for s in seeds]
    reference = build_drift_reference(
        [], [], [source_image_statistics(p, spec) for p in sources]
    )
    manifest, states, stage = untrained_parts("densenet_small", 64, SMALL)
    manifest = replace(manifest, version=VERSION, drift_reference=reference)
    write_bundle(tmp_path / "bundle", manifest, states, stage)
    config = node_config(
        tmp_path,
        database={"url": database_url},
        model={"bundle": str(tmp_path / "bundle")},
        drift={"window_studies": len(seeds), "min_samples": 10},
    )
    db = Database(config.database.url)
    db.create_schema()
    spool = Spool(config.storage.spool_dir)
    worker = TriageWorker(config, "cpu")
    watch = DriftWatch(config, db)
    try:
        for s in seeds:
            _receive(db, spool, _chest(s))
        assert enqueue_quiet_studies(db, 0, VERSION) == len(seeds)
        while worker.process_next():
            pass
        report = watch.check()
        assert (report.studies, report.images) == (len(seeds), len(seeds))
        judged = {s.name: s.state for s in report.statistics}
        assert judged[WINDOWED_MEAN] is judged[MANUFACTURER] is DriftState.OK, judged
        assert judged[ROWS] is judged[COLUMNS] is judged[BITS_STORED] is DriftState.OK
        assert judged[ABNORMALITY_SCORE] is DriftState.NO_REFERENCE
        assert _drift_events(db) == []

        for s in seeds:
            _receive(db, spool, _chest(s, inverted=True, manufacturer="OTHERCO"))
        assert enqueue_quiet_studies(db, 0, VERSION) == len(seeds)
        while worker.process_next():
            pass
        report = watch.check()
        assert {s.name for s in report.statistics if s.drifted} == {WINDOWED_MEAN, MANUFACTURER}
        assert {e[1] for e in _drift_events(db)} == {WINDOWED_MEAN, MANUFACTURER}
        assert "windowed_mean: DRIFTED" in format_status(node_status(db, drift=report))
    finally:
        worker.db.dispose()
        db.dispose()


def test_the_node_measures_an_image_as_training_does(tmp_path):
    spec = PreprocessSpec(size=64)
    path = write(_chest(3, manufacturer="  acme  medical "), tmp_path / "x.dcm")
    trained = source_image_statistics(path, spec)
    served = prepare_instance(pydicom.dcmread(path), spec)
    assert served.windowed_mean == trained.windowed_mean
    assert (trained.rows, trained.columns, trained.bits_stored) == (96, 96, 12)
    assert trained.manufacturer == "ACME MEDICAL"
    inverted = source_image_statistics(write(_chest(3, True), tmp_path / "y.dcm"), spec)
    assert abs(inverted.windowed_mean - trained.windowed_mean) > 20  # bone dark: far apart


def _validation(n_patients: int, seed: int = 0) -> ValidationImages:
    """One image per patient and study, about half abnormal (pneumothorax)."""
    rng = np.random.default_rng(seed)
    findings = THESIS_CATALOGUE.subset(list(SMALL))
    logits, labels, classes = [], [], []
    for _ in range(n_patients):
        abnormal = rng.random() < 0.5
        row = rng.normal(0, 1, (len(findings), 3))
        row[0, 1 if abnormal else 0] += 2.0
        row[1:, 0] += 2.0
        logits.append(row)
        labels.append({f: int(abnormal and f == SMALL[0]) for f in SMALL})
        classes.append([1 if abnormal else 0, 0, 0])
    ids = [f"P{i:04d}" for i in range(n_patients)]
    return ValidationImages(
        logits=np.array(logits),
        patient_ids=ids,
        study_ids=[f"S{i}" for i in range(n_patients)],
        labels=labels,
        abnormal=[int(any(lab.values())) for lab in labels],
        member_classes=np.array(classes),
    )


def test_calibration_records_its_studies_and_images_as_the_reference(tmp_path):
    images = _validation(120)
    result = calibrate(THESIS_CATALOGUE.subset(list(SMALL)), images, target_sensitivity=0.9)
    cal_rows = np.flatnonzero(result.split.calibration_mask(images.patient_ids))
    assert len(result.study_scores) == len(cal_rows) == len(result.calibration_studies)
    # Source files: DICOM for even rows, PNG for odd rows (no header statistics).
    paths: list[Path] = []
    for i in range(len(images.patient_ids)):
        ds = _chest(i)
        if i % 2:
            cv2.imwrite(str(tmp_path / f"{i}.png"), (ds.pixel_array >> 4).astype(np.uint8))
            paths.append(tmp_path / f"{i}.png")
        else:
            paths.append(write(ds, tmp_path / f"{i}.dcm"))
    normal = result.study_definite_normal
    threshold = result.operating_point.threshold
    assert 0 < normal.sum() < len(normal)
    assert (result.study_scores[normal] < threshold).all()  # definite normal: below the line
    assert not normal[result.study_scores >= threshold].any()
    reference = calibration_drift_reference(paths, result, PreprocessSpec(size=32), workers=2)
    assert reference.studies == len(cal_rows)
    assert reference.definite_normal_share == pytest.approx(normal.sum() / len(normal))
    hist = reference.histograms
    assert hist[ABNORMALITY_SCORE].count == len(cal_rows)
    assert hist[WINDOWED_MEAN].count == len(cal_rows)
    assert hist[ROWS].count == sum(1 for r in cal_rows if r % 2 == 0)
    assert hist[MANUFACTURER].bins == ("ACME",) and hist[BITS_STORED].bins == ("12",)


def test_the_demo_bundle_carries_a_drift_reference(demo_bundle_dir):
    manifest = verify_bundle(demo_bundle_dir)
    reference = manifest.drift_reference
    assert reference is not None and reference.studies > 0
    assert 0.0 <= reference.definite_normal_share <= 1.0
    assert {ABNORMALITY_SCORE, WINDOWED_MEAN} <= set(reference.histograms)
    assert reference.histograms[ABNORMALITY_SCORE].count == reference.studies
    assert read_manifest(demo_bundle_dir).to_dict()["drift_reference"] == reference.to_dict()
