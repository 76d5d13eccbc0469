"""The miss-rate guarantees when patients have several studies (follow-ups, repeat films).

A statistician's attack: the Neyman-Pearson threshold is an order statistic of abnormal
calibration scores, valid when those are independent. Eight studies of one patient are scored
alike, so counted as eight cases they claim a margin only eight times as many patients could
support. Simulated with a patient effect that dominates the study-to-study noise, a run aiming
at a miss rate <= 10 % with 90 % confidence must exceed 10 % on fresh patients in at most about
10 % of runs; counting every study, it exceeded it in about 30 %."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy.stats import binom

from scxnn_node.findings import THESIS_CATALOGUE
from scxnn_node.model.decision import abnormality_scores
from scxnn_node.model.result import NORMAL, OTHERS, TARGET
from training.calibrate import ValidationImages, calibrate
from training.critical_safety_net import fit_critical_safety_net
from training.one_study_per_patient import ONE_STUDY_PER_PATIENT, one_study_per_patient

FINDINGS = THESIS_CATALOGUE.subset(["nodule", "cardiomegaly"])
NAMES = FINDINGS.names
MISS_RATE, CONFIDENCE = 0.1, 0.9


def _patient(rng: np.random.Generator, abnormal: bool, studies: int):
    """One patient's studies (one image each): a patient effect on every logit, shared by
    all of them, dominates the small study-to-study noise."""
    finding = int(rng.integers(len(NAMES))) if abnormal else None
    effect = rng.normal(0, 1.5, (len(NAMES), 3))
    truth = [NORMAL if finding is None else TARGET if m == finding else OTHERS for m in range(2)]
    logits = []
    for _ in range(studies):
        row = effect + rng.normal(0, 0.2, effect.shape)
        row[np.arange(len(NAMES)), truth] += 2.0
        logits.append(row)
    labels = {name: int(m == finding) for m, name in enumerate(NAMES)}
    return logits, truth, labels


def _validation(rng: np.random.Generator, patients: int, studies: int) -> ValidationImages:
    ids, study_ids, labels, logits, classes, abnormal = [], [], [], [], [], []
    for p in range(patients):
        rows, truth, labelled = _patient(rng, p % 2 == 0, studies)
        for s, row in enumerate(rows):
            ids.append(f"P{p}")
            study_ids.append(f"P{p}.S{s}")
            labels.append(labelled)
            logits.append(row)
            classes.append(truth)
            abnormal.append(int(p % 2 == 0))
    return ValidationImages(
        np.array(logits), ids, study_ids, labels, abnormal, np.array(classes)
    )


def _fresh_miss_rate(rng: np.random.Generator, result, n: int = 3000) -> float:
    """The run's miss rate on new abnormal patients, one study each."""
    logits = np.array([_patient(rng, True, 1)[0][0] for _ in range(n)])
    scores = abnormality_scores(result.second_stage, logits)
    return float((scores < result.operating_point.threshold).mean())


def test_patients_with_many_studies_keep_the_stated_confidence():
    runs, exceeded = 150, 0
    for seed in range(runs):
        rng = np.random.default_rng(seed)
        result = calibrate(
            FINDINGS,
            _validation(rng, patients=120, studies=8),
            target_sensitivity=1 - MISS_RATE,
            confidence=CONFIDENCE,
            calibration_seed=seed,
        )
        exceeded += _fresh_miss_rate(rng, result) > MISS_RATE
    # At most 1 - CONFIDENCE of runs may exceed the target; allow binomial chance at 1 %.
    allowed = binom.ppf(0.99, runs, 1 - CONFIDENCE)
    assert exceeded <= allowed, f"{exceeded} of {runs} runs missed more than {MISS_RATE:.0%}"


def test_the_threshold_counts_each_calibration_patient_once():
    rng = np.random.default_rng(0)
    images = _validation(rng, patients=120, studies=8)
    result = calibrate(FINDINGS, images, target_sensitivity=0.9, confidence=0.9)
    v = result.operating_point.validation
    cal = result.split.calibration_mask(images.patient_ids)
    rows = zip(images.patient_ids, images.abnormal, cal, strict=True)
    abnormal_patients = {p for p, a, c in rows if a and c}
    assert v["independent_units"] == ONE_STUDY_PER_PATIENT
    assert v["n_abnormal"] == len(abnormal_patients)
    assert v["n_abnormal_studies_all"] == 8 * len(abnormal_patients)
    counts = result.summary["split"]["calibration"]
    assert counts["independent_abnormal_studies"] == len(abnormal_patients)
    # the reported intervals count the same units; every study is kept beside them
    assert result.summary["results"]["sensitivity"]["n"] == len(abnormal_patients)
    assert result.summary["results_every_study"]["sensitivity"]["n"] == 8 * len(abnormal_patients)


@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.sampled_from([0, 1, None])), min_size=0, max_size=40
    ),
    st.integers(0, 2**32 - 1),
)
def test_one_study_is_drawn_per_patient_and_class(studies, seed):
    patients = [f"P{p}" for p, _ in studies]
    status = [s for _, s in studies]
    chosen = one_study_per_patient(patients, status, seed)
    drawn = [(patients[i], status[i]) for i in np.flatnonzero(chosen)]
    assert len(drawn) == len(set(drawn))  # never two of one patient and class
    assert None not in {s for _, s in drawn}  # unknown status never counts
    assert set(drawn) == {(p, s) for p, s in zip(patients, status, strict=True) if s is not None}
    assert (one_study_per_patient(patients, status, seed) == chosen).all()  # the seed decides


def test_the_safety_net_counts_each_patient_with_the_finding_once():
    """Every abnormal patient has a pneumothorax study and a nodule-only study: the safety net
    for pneumothorax counts each patient once, by one of their pneumothorax studies, whichever
    abnormal study the second stage's threshold drew."""
    findings = THESIS_CATALOGUE.subset(["pneumothorax", "nodule"])
    rng = np.random.default_rng(1)
    ids, study_ids, labels, logits, classes, abnormal = [], [], [], [], [], []
    for p in range(600):
        sick = p % 2 == 0
        studies = [(1, 0), (0, 1), (1, 0)] if sick else [(0, 0)]
        for s, (pneumothorax, nodule) in enumerate(studies):
            truth = [
                TARGET if pneumothorax else OTHERS if sick else NORMAL,
                TARGET if nodule else OTHERS if sick else NORMAL,
            ]
            row = rng.normal(0, 1, (2, 3))
            row[np.arange(2), truth] += 2.0
            ids.append(f"P{p}")
            study_ids.append(f"P{p}.S{s}")
            labels.append({"pneumothorax": pneumothorax, "nodule": nodule})
            logits.append(row)
            classes.append(truth)
            abnormal.append(int(sick))
    images = ValidationImages(np.array(logits), ids, study_ids, labels, abnormal, np.array(classes))
    result = calibrate(findings, images, target_sensitivity=0.9, critical_miss_rate=0.02)
    cal = result.split.calibration_mask(images.patient_ids)
    rows = zip(images.patient_ids, images.abnormal, cal, strict=True)
    sick_patients = {p for p, a, c in rows if a and c}
    (net,) = result.safety_net.thresholds
    assert net.finding == "pneumothorax"
    assert net.n_positive == len(sick_patients) >= 149  # 2 % at 95 % needs 149
    assert result.operating_point.validation["n_abnormal"] == len(sick_patients)


def test_the_safety_net_refuses_patients_that_do_not_match_its_studies():
    findings = THESIS_CATALOGUE.subset(["pneumothorax"])
    probs = np.full((3, 1), 0.5)
    labels = [{"pneumothorax": 1}] * 3
    with pytest.raises(ValueError, match="one patient per study"):
        fit_critical_safety_net(findings, probs, labels, patients=["P1", "P2"])
    net = fit_critical_safety_net(findings, probs, labels, patients=["P1", "P1", "P2"])
    assert net.thresholds[0].available == 2  # two patients, however many studies
