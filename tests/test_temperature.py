"""Temperature scaling softens over-confident members; reliability bins and ECE show it."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from scxnn_node.model.temperature import apply_temperature
from training.temperature import (
    UNKNOWN,
    expected_calibration_error,
    fit_member_temperatures,
    fit_temperature,
    negative_log_likelihood,
    reliability_bins,
    top_label_reliability,
)


def _calibrated(rng: np.random.Generator, n: int = 4000) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true class distribution, and classes drawn from it."""
    logits = rng.normal(scale=1.5, size=(n, 3))
    probs = softmax(logits, axis=1)
    labels = (rng.uniform(size=(n, 1)) > probs.cumsum(axis=1)).sum(axis=1)
    return logits, labels


@pytest.mark.parametrize("over", [2.0, 3.0])
def test_over_confident_logits_get_t_above_one_and_lower_nll_and_ece(over: float):
    logits, labels = _calibrated(np.random.default_rng(0))
    over_confident = over * logits
    t = fit_temperature(over_confident, labels)
    assert t > 1.0
    assert t == pytest.approx(over, rel=0.15)  # recovers the factor the logits were scaled by
    assert negative_log_likelihood(over_confident, labels, t) < negative_log_likelihood(
        over_confident, labels
    )
    ece_before = expected_calibration_error(top_label_reliability(over_confident, labels))
    ece_after = expected_calibration_error(top_label_reliability(over_confident, labels, t))
    assert ece_after < ece_before / 2
    # Dividing by T never changes a call.
    scaled = apply_temperature(over_confident, t)
    np.testing.assert_array_equal(scaled.argmax(1), over_confident.argmax(1))


def test_under_confident_logits_get_t_below_one():
    logits, labels = _calibrated(np.random.default_rng(1))
    assert fit_temperature(0.4 * logits, labels) < 1.0


def test_temperature_is_the_nll_minimum():
    logits, labels = _calibrated(np.random.default_rng(2), n=1000)
    t = fit_temperature(2.5 * logits, labels)
    best = negative_log_likelihood(2.5 * logits, labels, t)
    for other in (0.8 * t, 0.95 * t, 1.05 * t, 1.25 * t):
        assert best <= negative_log_likelihood(2.5 * logits, labels, other)


def test_member_temperatures_are_per_member_and_skip_unknown_labels():
    rng = np.random.default_rng(3)
    logits_a, labels_a = _calibrated(rng)
    logits_b, labels_b = _calibrated(rng)
    logits = np.stack([3.0 * logits_a, 0.5 * logits_b], axis=1)  # (N, 2, 3)
    labels = np.stack([labels_a, labels_b], axis=1)
    labels[:100, 0] = UNKNOWN
    # Unknown rows carry nonsense logits; leaving them out must leave T unchanged.
    logits[:100, 0] = [50.0, -50.0, 0.0]
    t = fit_member_temperatures(logits, labels)
    assert t.shape == (2,)
    assert t[0] > 2.0 and t[1] < 1.0
    assert t[0] == pytest.approx(fit_temperature(logits[100:, 0], labels[100:, 0]))
    scaled = apply_temperature(logits, t)
    np.testing.assert_allclose(scaled[:, 1], logits[:, 1] / t[1])
    with pytest.raises(ValueError, match="per-member temperatures"):
        apply_temperature(logits[:, 0], t)
    with pytest.raises(ValueError, match="positive"):
        apply_temperature(logits, np.array([1.0, 0.0]))


def test_reliability_bins_count_and_average_by_hand():
    predicted = np.array([0.05, 0.15, 0.12, 0.95, 1.0, 0.5])
    observed = np.array([False, True, False, True, True, False])
    bins = reliability_bins(predicted, observed, n_bins=10)
    assert len(bins) == 10 and sum(b.count for b in bins) == 6
    assert (bins[0].count, bins[0].mean_predicted, bins[0].observed_frequency) == (1, 0.05, 0.0)
    assert bins[1].count == 2
    assert bins[1].mean_predicted == pytest.approx(0.135)
    assert bins[1].observed_frequency == 0.5
    assert bins[9].count == 2  # 1.0 falls in the last bin
    assert bins[9].mean_predicted == pytest.approx(0.975) and bins[9].observed_frequency == 1.0
    assert bins[3].count == 0 and bins[3].mean_predicted is None
    # ECE by hand: (1 * 0.05 + 2 * 0.365 + 1 * 0.5 + 2 * 0.025) / 6
    assert expected_calibration_error(bins) == pytest.approx((0.05 + 0.73 + 0.5 + 0.05) / 6)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reliability_bins(np.array([1.2]), np.array([True]))
    with pytest.raises(ValueError, match="class indices"):
        fit_temperature(np.zeros((2, 3)), np.array([0, 3]))
    with pytest.raises(ValueError, match="known class"):
        fit_temperature(np.zeros((2, 3)), np.array([UNKNOWN, UNKNOWN]))
