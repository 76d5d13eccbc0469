"""A run's second stage: fitted on the fit patients, thresholds set per study on calibration
patients nothing was fitted on, the safety net and its shortfalls, the model card's inputs."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from scxnn_node.findings import THESIS_CATALOGUE
from scxnn_node.model.decision import member_probabilities
from scxnn_node.model.result import NORMAL, OTHERS, TARGET
from scxnn_node.model.safety_net import CriticalThreshold, InsufficientPositives
from training.calibrate import ValidationImages, calibrate, study_groups
from training.model_card import guarantee_shortfalls
from training.reliability_figure import write_reliability_diagram
from training.temperature import UNKNOWN, reliability_bins

FINDINGS = THESIS_CATALOGUE.subset(["pneumothorax", "nodule", "cardiomegaly"])
NAMES = FINDINGS.names


def _images(n_patients: int, seed: int = 0, study_ids: bool = True) -> ValidationImages:
    """Patients of one study with one or two images; about half abnormal, one finding each.
    Members are over-confident (logits x 3) so the temperatures have something to fit."""
    rng = np.random.default_rng(seed)
    patients, studies, labels, logits, classes = [], [], [], [], []
    for p in range(n_patients):
        finding = int(rng.integers(len(NAMES))) if rng.random() < 0.5 else None
        for _ in range(1 + int(rng.random() < 0.3)):
            patients.append(f"P{p:05d}")
            studies.append(f"S{p:05d}" if study_ids else "")
            labels.append({name: int(m == finding) for m, name in enumerate(NAMES)})
            row, cls = np.zeros((len(NAMES), 3)), []
            for m in range(len(NAMES)):
                truth = NORMAL if finding is None else TARGET if m == finding else OTHERS
                row[m] = rng.normal(0, 1, 3)
                row[m, truth] += 1.5
                cls.append(truth)
            logits.append(3.0 * row)
            classes.append(cls)
    abnormal = [int(any(v == 1 for v in lab.values())) for lab in labels]
    return ValidationImages(
        logits=np.array(logits),
        patient_ids=patients,
        study_ids=studies,
        labels=labels,
        abnormal=abnormal,
        member_classes=np.array(classes),
    )


def _run(images: ValidationImages, **kwargs):
    return calibrate(FINDINGS, images, **{"target_sensitivity": 0.9, **kwargs})


def test_fit_and_calibration_are_disjoint_patients_and_only_calibration_sets_thresholds():
    images = _images(200)
    base = _run(images)
    cal = base.split.calibration_mask(images.patient_ids)
    assert not set(base.split.fit_patients) & set(base.split.calibration_patients)
    # Calibration logits moved: the SVM and the temperatures are untouched, the threshold moves.
    moved = images.logits.copy()
    moved[cal] += np.random.default_rng(1).normal(0, 2, moved[cal].shape)
    other = _run(replace(images, logits=moved))
    assert other.second_stage.to_dict() == base.second_stage.to_dict()
    np.testing.assert_array_equal(other.temperatures, base.temperatures)
    assert other.operating_point.threshold != base.operating_point.threshold
    # Fit logits moved: the SVM changes.
    moved = images.logits.copy()
    moved[~cal] += np.random.default_rng(2).normal(0, 2, moved[~cal].shape)
    assert _run(replace(images, logits=moved)).second_stage.to_dict() != base.second_stage.to_dict()


def test_threshold_is_the_order_statistic_of_calibration_study_maxima():
    images = _images(300, seed=3)
    result = _run(images)
    v = result.operating_point.validation
    assert v["threshold_set_on"] == "calibration" and v["threshold_unit"] == "study"
    cal = np.flatnonzero(result.split.calibration_mask(images.patient_ids))
    scores = result.second_stage.decision_function(images.logits[cal].reshape(len(cal), -1))
    by_study: dict[str, list[int]] = {}
    for i, row in enumerate(cal):
        by_study.setdefault(images.study_ids[row], []).append(i)
    maxima = {s: scores[rows].max() for s, rows in by_study.items()}
    abnormal = {images.study_ids[r]: images.abnormal[r] for r in cal}
    positives = np.sort([m for s, m in maxima.items() if abnormal[s] == 1])
    assert v["n_abnormal"] == len(positives) and v["n_calibration_studies"] == len(by_study)
    assert v["n_calibration_images"] == len(cal) > len(by_study)  # some studies have 2 images
    assert result.operating_point.threshold == positives[v["order_statistic_k"] - 1]
    counts = result.summary["split"]
    assert counts["calibration"]["studies"] == len(by_study)
    assert counts["fit"]["images"] + counts["calibration"]["images"] == len(images.logits)


def test_without_study_ids_every_image_is_a_study():
    images = _images(120, seed=4, study_ids=False)
    result = _run(images)
    v = result.operating_point.validation
    assert v["threshold_unit"] == "image"
    assert v["n_calibration_studies"] == v["n_calibration_images"]
    assert [g.tolist() for g in study_groups([0, 1, 2], ["a", "", "a"])] == [[0, 2], [1]]


def test_temperatures_soften_over_confident_members_on_the_fit_part():
    result = _run(_images(300, seed=5))
    assert (result.temperatures > 1.5).all()  # the logits were multiplied by 3
    t = result.summary["temperatures"]["nodule"]
    assert t["calibration_ece_after"] < t["calibration_ece_before"]


def test_a_member_without_known_classes_keeps_t_one():
    images = _images(60, seed=6)
    classes = images.member_classes.copy()
    classes[:, 1] = UNKNOWN
    result = _run(replace(images, member_classes=classes))
    assert result.temperatures[1] == 1.0


def test_safety_net_set_on_calibration_study_probabilities():
    images = _images(1900, seed=7)  # about 170 pneumothorax studies in the calibration part
    result = _run(images, critical_miss_rate=0.02)  # needs 149
    threshold = result.safety_net.thresholds[0]
    assert [t.finding for t in result.safety_net.thresholds] == ["pneumothorax"]  # critical only
    assert isinstance(threshold, CriticalThreshold)
    cal = np.flatnonzero(result.split.calibration_mask(images.patient_ids))
    probs = member_probabilities(images.logits[cal], result.temperatures)[:, 0, TARGET]
    by_study: dict[str, float] = {}
    for i, row in enumerate(cal):
        if images.labels[row]["pneumothorax"] == 1:
            s = images.study_ids[row]
            by_study[s] = max(by_study.get(s, 0.0), probs[i])
    positives = np.sort(list(by_study.values()))
    assert threshold.n_positive == len(positives) >= 149
    assert threshold.threshold == pytest.approx(positives[threshold.order_statistic_k - 1])
    assert result.summary["safety_net"] == result.safety_net.to_dict()


def test_too_few_positives_is_recorded_and_named_as_a_shortfall():
    result = _run(_images(200, seed=8), target_sensitivity=0.99)
    assert not result.guarantee_met and not result.summary["guarantee_met"]
    assert isinstance(result.safety_net.thresholds[0], InsufficientPositives)
    shortfalls = guarantee_shortfalls(result.operating_point.to_dict(), result.safety_net)
    assert any(s.startswith("second stage:") and "needs 299" in s for s in shortfalls)
    assert any(s.startswith("safety net pneumothorax:") and "299 needed" in s for s in shortfalls)
    in_sample = result.operating_point.to_dict()
    del in_sample["validation"]["threshold_set_on"]
    assert "not set on held-out calibration patients" in guarantee_shortfalls(
        in_sample, result.safety_net
    )[0]


def test_per_tier_results_count_misses_of_the_final_verdict():
    result = _run(_images(300, seed=9))
    results = result.summary["results"]
    critical = results["per_tier"]["critical"]
    assert critical["studies"] == critical["sensitivity"]["n"]
    assert critical["called_normal"] == critical["studies"] - critical["sensitivity"]["successes"]
    # the safety net only adds abnormal calls: never a lower sensitivity than the SVM alone
    alone = results["second_stage_alone"]["sensitivity"]["successes"]
    assert results["sensitivity"]["successes"] >= alone


def test_too_small_a_validation_split_is_refused():
    images = _images(3, seed=10)
    with pytest.raises(ValueError, match="at least 2"):
        _run(images)


def test_reliability_diagram_is_a_png(tmp_path):
    rng = np.random.default_rng(0)
    p = rng.uniform(0, 1, 500)
    bins = reliability_bins(p, rng.uniform(0, 1, 500) < p)
    path = write_reliability_diagram({"member": bins}, tmp_path / "rel.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="at least one"):
        write_reliability_diagram({}, tmp_path / "none.png")


def test_calibration_and_the_decision_rules_import_no_torch():
    import subprocess
    import sys

    modules = [
        "scxnn_node.model.temperature",
        "scxnn_node.model.decision",
        "training.calibrate",
        "training.model_card",
    ]
    code = f"import sys; import {', '.join(modules)}; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "False"
