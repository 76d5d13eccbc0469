"""The miss-rate guarantee holds when the threshold is set on data the classifier never saw,
and fails when the same images fit the classifier and set its threshold."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import numpy as np
import pytest
from scipy.stats import binom
from sklearn.svm import LinearSVC

from scxnn_node.findings import THESIS_CATALOGUE
from scxnn_node.model.decision import abnormality_scores
from training.calibrate import ValidationImages, calibrate
from training.held_out_threshold import CALIBRATION
from training.second_stage_fit import choose_operating_point, fit_second_stage, np_order_statistic
from training.temperature import UNKNOWN

N_MEMBERS = len(THESIS_CATALOGUE.names)
N_FEATURES = N_MEMBERS * 3  # 13 members x 3 logits
N_ABNORMAL, N_NORMAL = 600, 200
MISS_RATE, CONFIDENCE = 0.01, 0.95
N_TRIALS = 200
# Abnormal cases sit this many standard deviations from the normal ones, spread over all
# features: separable enough that a linear SVM pulls its training cases' scores away from
# the boundary, so their lowest scores are optimistic.
SEPARATION = 4.0
SHIFT = np.full(N_FEATURES, SEPARATION / np.sqrt(N_FEATURES))

# A procedure gets features, labels and a seed and returns a score function and a threshold:
# abnormal iff score(x) >= threshold.
Score = Callable[[np.ndarray], np.ndarray]
Procedure = Callable[[np.ndarray, np.ndarray, int], tuple[Score, float]]


def _draw(rng: np.random.Generator, n_abnormal: int, n_normal: int):
    x = np.vstack(
        [rng.normal(size=(n_abnormal, N_FEATURES)) + SHIFT, rng.normal(size=(n_normal, N_FEATURES))]
    )
    y = np.concatenate([np.ones(n_abnormal, int), np.zeros(n_normal, int)])
    return x, y


def _linear_svm(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    svm = LinearSVC(C=1.0, class_weight="balanced", dual=False).fit(x, y)
    return svm.coef_[0], float(svm.intercept_[0])


def fit_and_threshold_on_the_same_images(x, y, seed):
    """What training/fit.py did before: SVM and threshold on every validation image."""
    w, b = _linear_svm(x, y)
    op = choose_operating_point(x @ w + b, y, 1 - MISS_RATE, CONFIDENCE)
    return lambda z: z @ w + b, op.threshold


def _validation_images(logits: np.ndarray, abnormal: list[int | None]) -> ValidationImages:
    """Validation images of one patient and one study each. No finding labels and no member
    classes: the safety net and the temperatures, which do not move the SVM's threshold, get
    nothing to fit."""
    n = len(logits)
    return ValidationImages(
        logits=logits.reshape(n, N_MEMBERS, 3),
        patient_ids=[f"P{i}" for i in range(n)],
        study_ids=[""] * n,
        labels=[{}] * n,
        abnormal=abnormal,
        member_classes=np.full((n, N_MEMBERS), UNKNOWN),
    )


def fit_then_threshold_on_calibration(x, y, seed):
    """The pipeline's second stage (training/calibrate.py): a patient-level cut, the SVM
    fitted on one part, the threshold set on the other; scored as the node scores."""
    result = calibrate(
        THESIS_CATALOGUE,
        _validation_images(x, y.tolist()),
        kernel="linear",
        target_sensitivity=1 - MISS_RATE,
        confidence=CONFIDENCE,
        calibration_fraction=0.5,
        calibration_seed=seed,
    )
    op = result.operating_point
    assert op.validation["guarantee_met"] and op.validation["threshold_set_on"] == CALIBRATION
    stage = result.second_stage
    return lambda z: abnormality_scores(stage, z.reshape(len(z), N_MEMBERS, 3)), op.threshold


def guarantee_violations(procedure: Procedure, seed: int) -> int:
    """How many of N_TRIALS independent validation sets give a threshold whose true miss rate
    (measured on a large fresh abnormal sample from the same distribution) exceeds MISS_RATE."""
    rng = np.random.default_rng(seed)
    fresh_abnormal, _ = _draw(rng, 100_000, 0)
    violations = 0
    for trial in range(N_TRIALS):
        x, y = _draw(rng, N_ABNORMAL, N_NORMAL)
        score, threshold = procedure(x, y, trial)
        true_miss_rate = float((score(fresh_abnormal) < threshold).mean())
        violations += true_miss_rate > MISS_RATE
    return violations


# At most 5 % of validation sets may violate "miss rate <= 1 %"; allow binomial slack so a
# correct procedure fails this check with probability 0.001.
ALLOWED_VIOLATIONS = int(binom.ppf(0.999, N_TRIALS, 1 - CONFIDENCE))


def test_threshold_on_calibration_keeps_the_guarantee():
    # The calibration half has 300 abnormal cases: enough for k = 1 (299 are needed).
    assert np_order_statistic(N_ABNORMAL // 2, MISS_RATE, CONFIDENCE) == 1
    violations = guarantee_violations(fit_then_threshold_on_calibration, seed=0)
    assert violations <= ALLOWED_VIOLATIONS


def test_threshold_on_the_fitted_images_breaks_the_guarantee():
    violations = guarantee_violations(fit_and_threshold_on_the_same_images, seed=0)
    assert violations > ALLOWED_VIOLATIONS


def _logits(seed: int, n: int = 120) -> tuple[np.ndarray, list[int | None]]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    logits = rng.normal(size=(n, 13, 3)) + y[:, None, None] * np.array([-1.0, 1.0, 0.5])
    abnormal: list[int | None] = [int(v) for v in y]
    return logits, abnormal


def test_the_pipeline_fits_on_fit_rows_and_thresholds_on_calibration_rows():
    logits, abnormal = _logits(5)
    abnormal[0] = abnormal[1] = None  # unknown status: in neither part
    images = _validation_images(logits, abnormal)
    result = calibrate(THESIS_CATALOGUE, images, target_sensitivity=0.9)
    calibration = result.split.calibration_mask(images.patient_ids)
    x = logits.reshape(len(logits), -1)
    known = np.array([a is not None for a in abnormal])
    y = np.array([a == 1 for a in abnormal], dtype=int)
    fit_rows, cal_rows = known & ~calibration, known & calibration
    expected = fit_second_stage(x[fit_rows], y[fit_rows])
    stage = result.second_stage
    np.testing.assert_allclose(stage.decision_function(x), expected.decision_function(x))
    # Changing the calibration images' logits moves the threshold, never the SVM.
    moved = logits.copy()
    moved[calibration] += 0.3
    other = calibrate(THESIS_CATALOGUE, replace(images, logits=moved), target_sensitivity=0.9)
    np.testing.assert_allclose(
        other.second_stage.decision_function(x), expected.decision_function(x)
    )
    assert other.operating_point.threshold != result.operating_point.threshold
    # The threshold is the order statistic of the calibration abnormal scores.
    cal_scores = np.sort(stage.decision_function(x[cal_rows & (y == 1)]))
    v = result.operating_point.validation
    assert result.operating_point.threshold == pytest.approx(
        cal_scores[v["order_statistic_k"] - 1]
    )
    assert v["n_abnormal"] == int((cal_rows & (y == 1)).sum())
    assert v["n_fit_abnormal"] == int((fit_rows & (y == 1)).sum())
    assert v["n_fit_normal"] == int((fit_rows & (y == 0)).sum())
    assert v["threshold_set_on"] == CALIBRATION


def test_the_pipeline_refuses_mismatched_lengths():
    logits, abnormal = _logits(6, n=20)
    with pytest.raises(ValueError, match="one patient, study, label set and class each"):
        _validation_images(logits, abnormal[:19])
