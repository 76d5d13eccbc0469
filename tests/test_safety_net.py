"""The critical-finding safety net: thresholds with a miss-rate guarantee, a record when the
positives are too few, and which rules fire."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy.stats import beta, binom

from scxnn_node.findings import THESIS_CATALOGUE
from scxnn_node.model.safety_net import (
    CriticalSafetyNet,
    CriticalThreshold,
    InsufficientPositives,
)
from training.critical_safety_net import (
    critical_threshold,
    fit_critical_safety_net,
    miss_rate_upper_bound,
)

FINDINGS = THESIS_CATALOGUE.subset(["pneumothorax", "pleural_effusion", "nodule", "cardiomegaly"])


def test_threshold_keeps_the_miss_rate_guarantee_over_many_calibration_sets():
    # Positives' target probabilities follow Beta(5, 2); the true miss rate of a threshold t
    # is that distribution's CDF at t. At most 5 % of calibration sets may exceed 1 %.
    rng = np.random.default_rng(0)
    n_sets, n_positive = 400, 500
    true_miss = []
    for _ in range(n_sets):
        record = critical_threshold("pneumothorax", rng.beta(5, 2, n_positive), 0.01, 0.95)
        assert isinstance(record, CriticalThreshold)
        true_miss.append(beta.cdf(record.threshold, 5, 2))
    violations = int((np.array(true_miss) > 0.01).sum())
    assert violations <= binom.ppf(0.999, n_sets, 0.05)
    # And it is not vacuous: the thresholds sit near the 1 % quantile, not at zero.
    assert np.median(true_miss) > 0.002


def test_threshold_is_the_order_statistic_of_the_positives():
    probs = np.linspace(0.2, 0.99, 1000)[::-1]  # unsorted input
    record = critical_threshold("pneumothorax", probs, 0.01, 0.95)
    assert isinstance(record, CriticalThreshold) and record.guarantee_met
    k = max(k for k in range(1, 1001) if binom.cdf(k - 1, 1000, 0.01) <= 0.05)
    assert record.order_statistic_k == k
    assert record.threshold == np.sort(probs)[k - 1]
    assert record.n_positive == 1000
    assert record.miss_rate_upper_bound == pytest.approx(beta.ppf(0.95, k, 1000 - k + 1))
    assert record.miss_rate_upper_bound <= 0.01


def test_too_few_positives_gives_a_typed_record(caplog):
    with caplog.at_level("WARNING"):
        record = critical_threshold("pneumoperitoneum", np.array([0.7, 0.4, 0.9]), 0.01, 0.95)
    assert isinstance(record, InsufficientPositives) and not record.guarantee_met
    assert (record.needed, record.available) == (299, 3)
    assert record.threshold == 0.4  # the lowest positive: no calibration miss
    assert record.miss_rate_upper_bound == pytest.approx(1 - 0.05 ** (1 / 3))
    assert "pneumoperitoneum has 3 calibration positives" in caplog.text
    none = critical_threshold("pneumoperitoneum", np.array([]), 0.01, 0.95)
    assert isinstance(none, InsufficientPositives)
    assert (none.available, none.threshold, none.miss_rate_upper_bound) == (0, None, 1.0)


def test_miss_rate_upper_bound_checks_k():
    assert miss_rate_upper_bound(299, 1, 0.95) <= 0.01 < miss_rate_upper_bound(298, 1, 0.95)
    with pytest.raises(ValueError, match="k must be"):
        miss_rate_upper_bound(10, 11, 0.95)


def _calibration(rng: np.random.Generator, n: int = 1200):
    """Labels and target probabilities: pneumothorax common, pleural effusion rare."""
    labels = []
    probs = rng.uniform(0, 0.3, size=(n, len(FINDINGS)))
    for i in range(n):
        lab = {
            "pneumothorax": int(i % 3 == 0),
            "pleural_effusion": int(i % 100 == 0),
            "nodule": int(i % 5 == 0),
            "cardiomegaly": None,
        }
        for m, f in enumerate(FINDINGS):
            if lab[f.name] == 1:
                probs[i, m] = rng.uniform(0.4, 1.0)
        labels.append(lab)
    return probs, labels


def test_net_covers_critical_findings_only_and_fires_where_it_should():
    probs, labels = _calibration(np.random.default_rng(1))
    labels[3]["pneumothorax"] = None  # unknown: not a positive
    net = fit_critical_safety_net(FINDINGS, probs, labels, 0.01, 0.95)
    assert net.findings == ["pneumothorax", "pleural_effusion"]
    ptx, eff = net.thresholds
    assert isinstance(ptx, CriticalThreshold) and ptx.n_positive == 399
    assert isinstance(eff, InsufficientPositives) and eff.available == 12
    assert not net.guarantee_met
    names = FINDINGS.names
    fired = net.fired_matrix(probs, names)
    assert fired.shape == probs.shape
    assert not fired[:, names.index("nodule")].any()  # not critical: never in the net
    np.testing.assert_array_equal(fired[:, 0], probs[:, 0] >= ptx.threshold)
    np.testing.assert_array_equal(fired[:, 1], probs[:, 1] >= eff.threshold)
    # Every calibration positive of the rare finding is caught (threshold = lowest positive).
    positives = np.array([lab["pleural_effusion"] == 1 for lab in labels])
    assert fired[positives, 1].all()
    # One study as a mapping of target probabilities, answered in the net's order.
    study = {"nodule": 0.99, "pleural_effusion": 0.95, "pneumothorax": 0.99, "cardiomegaly": 0.0}
    assert net.fired(study) == ["pneumothorax", "pleural_effusion"]
    assert net.fired({**study, "pneumothorax": 0.0, "pleural_effusion": 0.0}) == []


def test_net_refuses_missing_probabilities_and_wrong_shapes():
    probs, labels = _calibration(np.random.default_rng(2), n=300)
    net = fit_critical_safety_net(FINDINGS, probs, labels)
    with pytest.raises(ValueError, match=r"no target probability .*pleural_effusion"):
        net.fired({"pneumothorax": 0.5, "nodule": 0.1})
    with pytest.raises(ValueError, match="must be"):
        net.fired_matrix(probs[:, :2], FINDINGS.names)
    with pytest.raises(ValueError, match=r"must be \(300, 4\)"):
        fit_critical_safety_net(FINDINGS, probs[:, :3], labels)


def test_a_finding_without_positives_never_fires():
    net = CriticalSafetyNet((critical_threshold("pneumothorax", np.array([]), 0.01, 0.95),))
    assert not net.fired_matrix(np.ones((4, 1)), ["pneumothorax"]).any()


def test_net_round_trips_through_json_and_checks_its_numbers():
    probs, labels = _calibration(np.random.default_rng(3))
    net = fit_critical_safety_net(FINDINGS, probs, labels)
    data = json.loads(json.dumps(net.to_dict()))
    assert CriticalSafetyNet.from_dict(data) == net
    bad = json.loads(json.dumps(data))
    bad["thresholds"][0]["threshold"] = 1.5
    with pytest.raises(ValueError, match=r"'pneumothorax': threshold must be a number in \[0, 1\]"):
        CriticalSafetyNet.from_dict(bad)
    bad = json.loads(json.dumps(data))
    bad["thresholds"][1]["kind"] = "maybe"
    with pytest.raises(ValueError, match="kind must be"):
        CriticalSafetyNet.from_dict(bad)
    bad = json.loads(json.dumps(data))
    del bad["thresholds"][1]["needed"]
    with pytest.raises(ValueError, match=r"missing \['needed'\]"):
        CriticalSafetyNet.from_dict(bad)
    with pytest.raises(ValueError, match="twice"):
        CriticalSafetyNet((net.thresholds[0], net.thresholds[0]))


def test_the_threshold_modules_import_no_torch():
    # They run where a calibration is redone or checked, without the member networks.
    modules = [
        "scxnn_node.model.safety_net",
        "training.calibration_split",
        "training.critical_safety_net",
        "training.held_out_threshold",
        "training.temperature",
    ]
    code = f"import sys; import {', '.join(modules)}; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "False"
