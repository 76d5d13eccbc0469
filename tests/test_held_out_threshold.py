"""The miss-rate guarantee holds when the threshold is set on data the classifier never saw,
and fails when the same images fit the classifier and set its threshold."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from scipy.stats import binom
from sklearn.svm import LinearSVC

from training.calibration_split import split_fit_calibration
from training.held_out_threshold import (
    CALIBRATION,
    fit_second_stage_held_out,
    held_out_operating_point,
)
from training.second_stage_fit import choose_operating_point, fit_second_stage, np_order_statistic

N_FEATURES = 39  # 13 members x 3 logits
N_ABNORMAL, N_NORMAL = 600, 200
MISS_RATE, CONFIDENCE = 0.01, 0.95
N_TRIALS = 200
# Abnormal cases sit this many standard deviations from the normal ones, spread over all
# features: separable enough that a linear SVM pulls its training cases' scores away from
# the boundary, so their lowest scores are optimistic.
SEPARATION = 4.0
SHIFT = np.full(N_FEATURES, SEPARATION / np.sqrt(N_FEATURES))

# A procedure gets features and labels and returns a linear score (w, b) and a threshold:
# abnormal iff x @ w + b >= threshold.
Procedure = Callable[[np.ndarray, np.ndarray, int], tuple[np.ndarray, float, float]]


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
    return w, b, op.threshold


def fit_then_threshold_on_calibration(x, y, seed):
    """Patient-level cut (one image per patient here): fit on one part, threshold on the other."""
    patients = [f"P{i}" for i in range(len(y))]
    split = split_fit_calibration(patients, y.tolist(), calibration_fraction=0.5, seed=seed)
    cal = split.calibration_mask(patients)
    w, b = _linear_svm(x[~cal], y[~cal])
    op = held_out_operating_point(
        x[cal] @ w + b,
        y[cal],
        n_fit_abnormal=int(y[~cal].sum()),
        n_fit_normal=int((1 - y[~cal]).sum()),
        target_sensitivity=1 - MISS_RATE,
        confidence=CONFIDENCE,
    )
    assert op.validation["guarantee_met"] and op.validation["threshold_set_on"] == CALIBRATION
    return w, b, op.threshold


def guarantee_violations(procedure: Procedure, seed: int) -> int:
    """How many of N_TRIALS independent validation sets give a threshold whose true miss rate
    (measured on a large fresh abnormal sample from the same distribution) exceeds MISS_RATE."""
    rng = np.random.default_rng(seed)
    fresh_abnormal, _ = _draw(rng, 100_000, 0)
    violations = 0
    for trial in range(N_TRIALS):
        x, y = _draw(rng, N_ABNORMAL, N_NORMAL)
        w, b, threshold = procedure(x, y, trial)
        true_miss_rate = float((fresh_abnormal @ w + b < threshold).mean())
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


def test_held_out_fit_uses_fit_rows_for_the_svm_and_calibration_rows_for_the_threshold():
    logits, abnormal = _logits(5)
    abnormal[0] = abnormal[1] = None  # unknown status: in neither part
    calibration = np.arange(len(abnormal)) % 2 == 1
    result = fit_second_stage_held_out(logits, abnormal, calibration, target_sensitivity=0.9)
    x = logits.reshape(len(logits), -1)
    known = np.array([a is not None for a in abnormal])
    y = np.array([a == 1 for a in abnormal], dtype=int)
    fit_rows, cal_rows = known & ~calibration, known & calibration
    expected = fit_second_stage(x[fit_rows], y[fit_rows])
    np.testing.assert_allclose(result.stage.decision_function(x), expected.decision_function(x))
    # Changing the calibration images' logits moves the threshold, never the SVM.
    moved = logits.copy()
    moved[calibration] += 0.3
    other = fit_second_stage_held_out(moved, abnormal, calibration, target_sensitivity=0.9)
    np.testing.assert_allclose(other.stage.decision_function(x), expected.decision_function(x))
    assert other.operating_point.threshold != result.operating_point.threshold
    # The threshold is the order statistic of the calibration abnormal scores.
    cal_scores = np.sort(result.stage.decision_function(x[cal_rows & (y == 1)]))
    v = result.operating_point.validation
    assert result.operating_point.threshold == pytest.approx(
        cal_scores[v["order_statistic_k"] - 1]
    )
    assert v["n_abnormal"] == int((cal_rows & (y == 1)).sum())
    assert v["n_fit_abnormal"] == int((fit_rows & (y == 1)).sum())
    assert v["n_fit_normal"] == int((fit_rows & (y == 0)).sum())
    assert v["threshold_set_on"] == CALIBRATION


def test_held_out_fit_refuses_mismatched_lengths():
    logits, abnormal = _logits(6, n=20)
    with pytest.raises(ValueError, match="one value per image"):
        fit_second_stage_held_out(logits, abnormal, np.zeros(19, dtype=bool))
