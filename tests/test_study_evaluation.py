"""`evaluate` on the node's own study path, and its refusal of data the bundle has seen."""

from __future__ import annotations

import csv
import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from dicom_factory import chest_pixels, make_dataset, write

from scxnn_node.imaging.preprocess import preprocess_image
from scxnn_node.model.bundle import load_bundle, write_bundle
from scxnn_node.model.engine import InferenceEngine
from scxnn_node.model.options import EngineOptions
from scxnn_node.model.result import Verdict
from scxnn_node.triage import PreparedInstance, prepare_instance, triage_study
from training.dataset import ManifestError, ManifestRow, load_manifest, write_manifest
from training.evaluate import evaluate_bundle
from training.provenance import PROVENANCE_FILE, TrainingProvenance, provenance_of
from training.source_images import read_source_pixels
from training.synthetic import synthesise_case
from training.untrained import untrained_parts

FINDINGS = ["pneumothorax", "nodule", "cardiomegaly"]
SIZE = 32


def _png(path: Path, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    case = synthesise_case(np.random.default_rng(seed), 64, [], FINDINGS)
    cv2.imwrite(str(path), case.pixels)
    return path.name


def _dicom(path: Path, seed: int, view: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    write(make_dataset(chest_pixels(64, seed=seed), view=view), path)
    return path.name


def _bundle(out: Path, provenance: bytes | None = None) -> Path:
    manifest, states, stage = untrained_parts("densenet_small", SIZE, FINDINGS)
    manifest = replace(manifest, name="eval-test", version="0.0.1")
    extra = {PROVENANCE_FILE: provenance} if provenance is not None else None
    write_bundle(out, manifest, states, stage, extra)
    return out


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture()
def training_data(tmp_path: Path) -> Path:
    """Two trained-on patients (train, val) and one held-out test patient."""
    d = tmp_path / "train"
    rows = [
        ManifestRow(_png(d / "t1.png", 1), "P-TRAIN", {"nodule": 1}, split="train"),
        ManifestRow(_png(d / "t2.png", 2), "P-VAL", {"nodule": 0}, split="val"),
        ManifestRow(_png(d / "t3.png", 3), "P-TEST", {"nodule": 0}, split="test"),
    ]
    return write_manifest(d / "manifest.csv", rows, ["nodule"])


def test_provenance_keeps_salted_hashes_only(training_data: Path):
    entries = [e for e in load_manifest(training_data).entries if e.split != "test"]
    record = provenance_of(entries)
    text = record.to_json().decode()
    content = hashlib.sha256(entries[0].image.read_bytes()).hexdigest()
    assert "P-TRAIN" not in text and "P-VAL" not in text and content not in text
    assert len(record.patients) == 2 and len(record.images) == 2
    again = TrainingProvenance.from_json(record.to_json(), "x")
    assert again == record
    other = provenance_of(entries)  # a new salt: nothing in common with the first
    assert other.salt != record.salt and not (other.patients & record.patients)
    assert record.overlap(entries) and not other.overlap([])


def test_evaluate_refuses_patients_and_images_the_bundle_has_seen(
    training_data: Path, tmp_path: Path, caplog
):
    seen = [e for e in load_manifest(training_data).entries if e.split in ("train", "val")]
    bundle = _bundle(tmp_path / "bundle", provenance_of(seen).to_json())
    d = tmp_path / "eval"
    copy = d / "copy.png"
    copy.parent.mkdir()
    copy.write_bytes((training_data.parent / "t1.png").read_bytes())
    rows = [
        ManifestRow(_png(d / "new.png", 10), "P-VAL", {"nodule": 0}),  # a seen patient
        ManifestRow("copy.png", "P-NEW", {"nodule": 1}),  # a seen image under a new patient
        ManifestRow(_png(d / "ok.png", 11), "P-OTHER", {"nodule": 0}),
    ]
    manifest = write_manifest(d / "manifest.csv", rows, ["nodule"])
    with pytest.raises(ManifestError) as err:
        evaluate_bundle(bundle, manifest, tmp_path / "out", split="all", progress=False)
    problems = err.value.problems
    assert any(p.startswith("row 2, column 'patient_id': a patient the bundle") for p in problems)
    assert any(p.startswith("row 3, column 'image': the same file content") for p in problems)
    assert len(problems) == 2
    assert not (tmp_path / "out" / "metrics.json").exists()
    # the run's own held-out test split is what evaluation is for
    metrics = evaluate_bundle(bundle, training_data, tmp_path / "out2", progress=False)
    assert metrics["split"] == "test" and metrics["training_overlap_checked"] is True
    # a bundle without provenance is evaluated, but says so
    plain = _bundle(tmp_path / "plain")
    with caplog.at_level(logging.WARNING, logger="training.evaluate"):
        metrics = evaluate_bundle(plain, manifest, tmp_path / "out3", split="all", progress=False)
    assert metrics["training_overlap_checked"] is False
    assert "no training provenance" in caplog.text
    assert "not checked" in (tmp_path / "out3" / "report.md").read_text()


def test_evaluate_reports_studies_as_the_node_triages_them(tmp_path: Path):
    bundle_dir = _bundle(tmp_path / "bundle")
    d = tmp_path / "data"
    rows = [
        # s1: two PNG images (no header: taken as frontal)
        ManifestRow(_png(d / "a.png", 1), "P1", {"nodule": 1, "cardiomegaly": 0}, study_id="s1"),
        ManifestRow(_png(d / "b.png", 2), "P1", {"nodule": 0, "cardiomegaly": 0}, study_id="s1"),
        # s2: a PA and a lateral DICOM: the node analyses the PA only
        *(
            ManifestRow(
                _dicom(d / name, seed, view),
                "P2",
                {"nodule": 0, "cardiomegaly": 0},
                study_id="s2",
                no_finding=True,
            )
            for name, seed, view in (("pa.dcm", 3, "PA"), ("lat.dcm", 4, "LL"))
        ),
        # s3: only a lateral view: not analysed
        ManifestRow(_dicom(d / "lat2.dcm", 5, "LL"), "P3", {"nodule": 1, "cardiomegaly": 0}),
        # an image of its own (no study id), a second abnormal study of P1's
        ManifestRow(_png(d / "c.png", 6), "P1", {"nodule": 0, "cardiomegaly": 1}),
    ]
    manifest = write_manifest(d / "manifest.csv", rows, ["nodule", "cardiomegaly"])
    out = tmp_path / "eval"
    metrics = evaluate_bundle(
        bundle_dir, manifest, out, split="all", precision="fp32", progress=False
    )
    assert metrics["n_images"] == 6 and metrics["level"] == "image"
    study = metrics["study"]
    assert study["level"] == "study"
    assert study["n_studies"] == 4 and study["n_not_analysed"] == 1
    assert metrics["engine"] == {"device": "cpu", "precision": "fp32"}

    # the same verdicts as the node's own path, study by study
    bundle = load_bundle(bundle_dir)
    engine = InferenceEngine(bundle, EngineOptions(device="cpu", precision="fp32"))
    spec = bundle.manifest.preprocessing
    def png(name: str) -> PreparedInstance:
        image = preprocess_image(read_source_pixels(d / name), spec)
        return PreparedInstance(name, name, image)

    expected = {
        "s1": triage_study(engine, "s1", [png("a.png"), png("b.png")]),
        "s2": triage_study(
            engine, "s2", [prepare_instance(d / n, spec) for n in ("pa.dcm", "lat.dcm")]
        ),
        "row-6": triage_study(engine, "row-6", [prepare_instance(d / "lat2.dcm", spec)]),
        "row-7": triage_study(engine, "row-7", [png("c.png")]),
    }
    assert expected["row-6"].verdict is Verdict.NOT_ANALYSED
    assert len(expected["s2"].analysed_instances) == 1
    predicted = {r["study_id"]: r for r in _rows(out / "study_predictions.csv")}
    assert set(predicted) == set(expected)
    for key, result in expected.items():
        row = predicted[key]
        assert row["verdict"] == result.verdict.value
        assert row["images"] == str(2 if key in ("s1", "s2") else 1)
        assert row["analysed"] == str(len(result.analysed_instances))
        if result.abnormality_score is not None:
            assert float(row["score"]) == pytest.approx(result.abnormality_score, abs=1e-5)
    assert {k: r["abnormal"] for k, r in predicted.items()} == {
        "s1": "1",
        "s2": "0",
        "row-6": "1",
        "row-7": "1",
    }
    # the study figures agree with the study predictions
    abnormal = [r for r in predicted.values() if r["abnormal"] == "1"]
    missed = sum(r["verdict"] == "definite_normal" for r in abnormal)
    assert study["sensitivity_detail"]["n"] == 3
    assert study["sensitivity"] == pytest.approx((3 - missed) / 3)
    assert study["confusion"]["not_analysed"] == {"normal": 0, "abnormal": 1}
    assert "level" in json.loads((out / "metrics.json").read_text())["study"]
    report = (out / "report.md").read_text()
    assert "## Studies" in report and "95% CI" in report
    # P1's two abnormal studies are one independent case: the intervals to quote count it once
    independent = metrics["study_one_per_patient"]
    assert independent["sensitivity_detail"]["n"] == 2 and independent["n_studies"] == 3
    assert independent["specificity_detail"]["n"] == 1
    assert "One study per patient and class" in report


def test_the_runs_resolved_manifest_keeps_studies_and_normal_statements(tmp_path: Path):
    from trainkit import small_config_data

    from training.config import training_config_from
    from training.fit import prepare_run
    from training.run_layout import RESOLVED_MANIFEST

    d = tmp_path / "data"
    labels = {"pneumothorax": 0, "nodule": 0, "cardiomegaly": 0}
    rows = [
        ManifestRow(
            _png(d / f"{i}.png", i),
            f"P{i // 2}",
            labels,
            no_finding=i % 2 == 0,
            study_id=f"S{i // 2}",
        )
        for i in range(6)
    ]
    manifest = write_manifest(d / "manifest.csv", rows, FINDINGS)
    config = training_config_from(small_config_data(preprocess_workers=1))
    prepare_run(config, manifest, tmp_path / "run", progress=False)
    resolved = load_manifest(tmp_path / "run" / RESOLVED_MANIFEST)
    assert [e.no_finding for e in resolved.entries] == [True, False] * 3
    assert [e.study_id for e in resolved.entries] == ["S0", "S0", "S1", "S1", "S2", "S2"]
    assert [e.abnormal for e in resolved.entries] == [0, None] * 3
