"""The SVM second stage evaluated from plain numbers equals scikit-learn."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import binom
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from scxnn_node.model.second_stage import SvmSecondStage
from training.second_stage_fit import (
    choose_operating_point,
    fit_second_stage,
    min_abnormal_for_guarantee,
    np_order_statistic,
)


def _data(seed=0, n=120):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 39)) * rng.uniform(0.5, 3, 39) + rng.normal(size=39)
    y = (x[:, :5].sum(1) + rng.normal(size=n) > 0).astype(int)
    return x, y


@pytest.mark.parametrize("kernel", ["rbf", "linear", "poly", "sigmoid"])
def test_equals_sklearn_decision_function(kernel, tmp_path):
    x, y = _data()
    scaler = StandardScaler().fit(x)
    svc = SVC(kernel=kernel, C=2.0, gamma="scale", degree=3, coef0=0.5, class_weight="balanced")
    svc.fit(scaler.transform(x), y)
    stage = SvmSecondStage.from_sklearn(scaler, svc)
    path = tmp_path / "stage.json"
    stage.save(path)
    loaded = SvmSecondStage.load(path)  # through JSON, as a bundle stores it
    x_test, _ = _data(seed=1, n=50)
    expected = svc.decision_function(scaler.transform(x_test))
    np.testing.assert_allclose(loaded.decision_function(x_test), expected, atol=1e-6, rtol=0)
    # Positive means class 1 (abnormal), as sklearn's convention.
    assert (
        (loaded.decision_function(x_test) > 0) == (svc.predict(scaler.transform(x_test)) == 1)
    ).all()


def test_fit_second_stage_separates_and_refuses_one_class():
    x, y = _data(seed=2, n=200)
    stage = fit_second_stage(x, y)
    accuracy = ((stage.decision_function(x) > 0) == y).mean()
    assert accuracy > 0.8
    with pytest.raises(ValueError, match="normal and abnormal"):
        fit_second_stage(x, np.ones(len(x)))


def test_validation_names_the_field():
    x, y = _data()
    stage = fit_second_stage(x, y)
    data = stage.to_dict()
    with pytest.raises(ValueError, match="dual_coef"):
        SvmSecondStage.from_dict({**data, "dual_coef": data["dual_coef"][:-1]})
    with pytest.raises(ValueError, match="kernel"):
        SvmSecondStage.from_dict({**data, "kernel": "quantum"})
    with pytest.raises(ValueError, match="feature_scale"):
        SvmSecondStage.from_dict({**data, "feature_scale": [0.0] * 39})
    with pytest.raises(ValueError, match="missing keys"):
        SvmSecondStage.from_dict({k: v for k, v in data.items() if k != "intercept"})
    with pytest.raises(ValueError, match="expects 39 features"):
        stage.decision_function(np.zeros((1, 12)))
    assert json.loads(json.dumps(data)) == data  # plain numbers only


def test_operating_point_reaches_target_sensitivity_with_guarantee():
    rng = np.random.default_rng(3)
    scores = np.concatenate([rng.normal(1, 1, 1000), rng.normal(-1, 1, 300)])
    abnormal = np.concatenate([np.ones(1000), np.zeros(300)]).astype(int)
    op = choose_operating_point(scores, abnormal, 0.99, confidence=0.95)
    positives = np.sort(scores[abnormal == 1])
    sens = (positives >= op.threshold).mean()
    assert sens >= 0.99
    # Hand check of the order statistic: the largest k with P(Bin(1000, 0.01) <= k-1) <= 0.05.
    k = max(k for k in range(1, 1001) if binom.cdf(k - 1, 1000, 0.01) <= 0.05)
    assert op.validation["order_statistic_k"] == k == 5
    assert op.threshold == positives[k - 1]
    assert op.validation["guarantee_met"] is True
    assert op.validation["miss_rate_upper_bound"] <= 0.01
    assert op.validation["confidence_miss_rate_within_target"] >= 0.95
    assert op.validation["sensitivity"] == pytest.approx(sens)
    assert op.validation["specificity"] == pytest.approx(
        (scores[abnormal == 0] < op.threshold).mean()
    )


def test_neyman_pearson_needs_299_abnormal_cases_for_one_percent():
    assert min_abnormal_for_guarantee(0.01, 0.95) == 299
    assert np_order_statistic(298, 0.01, 0.95) is None
    assert np_order_statistic(299, 0.01, 0.95) == 1


def test_operating_point_with_too_few_abnormal_cases_warns_and_records(caplog):
    rng = np.random.default_rng(4)
    scores = np.concatenate([rng.normal(1, 1, 100), rng.normal(-1, 1, 50)])
    abnormal = np.concatenate([np.ones(100), np.zeros(50)]).astype(int)
    with caplog.at_level("WARNING"):
        op = choose_operating_point(scores, abnormal, 0.99)
    assert "needs 299" in caplog.text
    v = op.validation
    assert v["guarantee_met"] is False and v["order_statistic_k"] == 1
    assert op.threshold == scores[abnormal == 1].min()
    assert v["sensitivity"] == 1.0  # no validation miss
    # k = 1: the miss rate is Beta(1, n): bound 1 - 0.05^(1/n), confidence 1 - 0.99^n.
    assert v["miss_rate_upper_bound"] == pytest.approx(1 - 0.05 ** (1 / 100))
    assert v["confidence_miss_rate_within_target"] == pytest.approx(1 - 0.99**100)


def test_config_calibration_keys_and_serving_precision():
    from pathlib import Path

    from scxnn_node.config import ConfigError
    from training.config import load_training_config, training_config_from

    config = training_config_from({})
    assert config.second_stage.calibration_fraction == 0.5
    assert config.second_stage.critical_miss_rate == 0.01
    assert config.resolved_serving_precision == "bf16"  # device auto: the node's CUDA default
    cpu = training_config_from({"training": {"device": "cpu"}})
    assert cpu.resolved_serving_precision == "fp32"
    forced = training_config_from({"training": {"device": "cpu"}, "serving_precision": "bf16"})
    assert forced.resolved_serving_precision == "bf16"
    with pytest.raises(ConfigError, match="calibration_fraction"):
        training_config_from({"second_stage": {"calibration_fraction": 1.0}})
    configs = Path(__file__).resolve().parents[1] / "training" / "configs"
    thesis = load_training_config(configs / "thesis-gpu.yaml")
    assert thesis.serving_precision == "bf16"
    assert thesis.training.optimiser.plateau_patience == 50
    assert load_training_config(configs / "tiny-cpu.yaml").resolved_serving_precision == "fp32"
