"""The node's definite-normal verdict: second stage AND critical safety net, on probabilities
after the bundle's member temperatures; the bundle files that carry them; the precision check."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import SMALL_FINDINGS

from scxnn_node.model.bundle import Bundle, load_bundle, write_bundle
from scxnn_node.model.decision import result_from_logits
from scxnn_node.model.manifest import MODEL_CARD_FILE, BundleError, read_manifest
from scxnn_node.model.result import TARGET, MemberCall, Verdict
from scxnn_node.model.safety_net import (
    SAFETY_NET_FILE,
    CriticalSafetyNet,
    CriticalThreshold,
    InsufficientPositives,
)
from scxnn_node.model.temperature import TEMPERATURES_FILE, temperatures_to_dict
from training.untrained import untrained_parts

# pneumothorax (critical) guaranteed at 0.3; no critical rule for the others (not critical).
NET = CriticalSafetyNet(
    (
        CriticalThreshold(
            finding="pneumothorax",
            threshold=0.3,
            n_positive=400,
            order_statistic_k=1,
            miss_rate_target=0.01,
            confidence=0.95,
            miss_rate_upper_bound=0.0075,
        ),
    )
)


def _write(out: Path, files: dict[str, bytes], precision: str | None = None) -> Path:
    manifest, states, stage = untrained_parts("densenet_small", 32, SMALL_FINDINGS)
    write_bundle(out, replace(manifest, precision=precision), states, stage, files)
    return out


@pytest.fixture(scope="module")
def calibrated_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    files = {
        TEMPERATURES_FILE: json.dumps(
            temperatures_to_dict(SMALL_FINDINGS, [2.0, 1.0, 0.5])
        ).encode(),
        SAFETY_NET_FILE: json.dumps(NET.to_dict()).encode(),
        MODEL_CARD_FILE: b"# Model card: untrained\n\nGuarantee achieved: none.\n",
    }
    return _write(tmp_path_factory.mktemp("calibrated") / "b", files, precision="bf16")


@pytest.fixture(scope="module")
def bundle(calibrated_dir: Path) -> Bundle:
    return load_bundle(calibrated_dir)


def _at(bundle: Bundle, threshold: float) -> Bundle:
    op = replace(bundle.manifest.operating_point, threshold=threshold)
    return replace(bundle, manifest=replace(bundle.manifest, operating_point=op))


def _logits(target_logit: float) -> np.ndarray:
    """One image; pneumothorax's target logit as given (normal 0, others -5), others normal."""
    logits = np.zeros((1, 3, 3), np.float32)
    logits[0, :, 0] = 2.0
    logits[0, 0] = [0.0, target_logit, -5.0]
    return logits


def test_bundle_loads_its_temperatures_and_safety_net(bundle: Bundle, calibrated_dir: Path):
    np.testing.assert_array_equal(bundle.temperatures, [2.0, 1.0, 0.5])
    assert bundle.safety_net == NET
    manifest = read_manifest(calibrated_dir)
    assert manifest.precision == "bf16"
    assert {TEMPERATURES_FILE, SAFETY_NET_FILE, MODEL_CARD_FILE} <= set(manifest.files)


def test_a_critical_rule_overrides_the_second_stage(bundle: Bundle):
    # target probability of pneumothorax: softmax([0, -1, -5] / 2) -> about 0.37 >= 0.3
    result = result_from_logits(_at(bundle, 1e9), "1.2.3", _logits(-1.0), ["x"])
    assert result.verdict is Verdict.ABNORMAL
    assert result.safety_net_fired == ("pneumothorax",)
    assert result.risk_tier == "critical"
    assert "critical safety net: pneumothorax" in result.reason
    assert result.to_dict()["safety_net_fired"] == ["pneumothorax"]
    assert result.findings[0].call is MemberCall.NORMAL  # the call itself is unchanged


def test_definite_normal_needs_the_svm_and_no_rule(bundle: Bundle):
    # target probability softmax([0, -4, -5] / 2) is about 0.11: below 0.3
    result = result_from_logits(_at(bundle, 1e9), "1.2.3", _logits(-4.0), ["x"])
    assert result.verdict is Verdict.DEFINITE_NORMAL
    assert result.safety_net_fired == () and result.risk_tier is None


def test_the_rule_reads_temperature_scaled_probabilities(bundle: Bundle):
    # Unscaled softmax([0, -1, -5]) gives target 0.27 < 0.3; at T = 2 it is 0.37 >= 0.3.
    unscaled = replace(_at(bundle, 1e9), temperatures=None)
    plain = result_from_logits(unscaled, "1", _logits(-1.0), ["x"])
    assert plain.verdict is Verdict.DEFINITE_NORMAL
    scaled = result_from_logits(_at(bundle, 1e9), "1", _logits(-1.0), ["x"])
    p = scaled.findings[0].probabilities["target"]
    assert p == pytest.approx(np.exp(-0.5) / (1 + np.exp(-0.5) + np.exp(-2.5)), rel=1e-5)
    # calls follow the arg max, which a temperature never changes
    assert scaled.findings[0].call is MemberCall.NORMAL


def test_the_rule_takes_the_study_s_most_confident_image(bundle: Bundle):
    logits = np.concatenate([_logits(-4.0), _logits(-1.0)])
    result = result_from_logits(_at(bundle, 1e9), "1", logits, ["a", "b"])
    assert result.safety_net_fired == ("pneumothorax",)


def test_a_net_without_enough_positives_still_fires_where_it_can(bundle: Bundle):
    weak = CriticalSafetyNet(
        (InsufficientPositives("pneumothorax", 299, 3, 0.63, 0.5, 0.01, 0.95),)
    )
    b = replace(_at(bundle, 1e9), temperatures=None, safety_net=weak)
    logits = _logits(4.0)  # target probability about 0.98
    assert result_from_logits(b, "1", logits, ["x"]).safety_net_fired == ("pneumothorax",)
    nothing = CriticalSafetyNet(
        (InsufficientPositives("pneumothorax", 299, 0, 1.0, None, 0.01, 0.95),)
    )
    b = replace(b, safety_net=nothing)
    assert result_from_logits(b, "1", logits, ["x"]).safety_net_fired == ()


@pytest.mark.parametrize(
    ("rel", "content", "says"),
    [
        (TEMPERATURES_FILE, {"temperatures": {"pneumothorax": 1.0}}, "missing"),
        (
            TEMPERATURES_FILE,
            temperatures_to_dict(SMALL_FINDINGS, [1.0, 0.0, 1.0]),
            "positive",
        ),
        (
            SAFETY_NET_FILE,
            replace(
                NET, thresholds=(replace(NET.thresholds[0], finding="pleural_effusion"),)
            ).to_dict(),
            "not members",
        ),
        (SAFETY_NET_FILE, {"thresholds": [{"kind": "vibes"}]}, "kind"),
    ],
)
def test_bad_calibration_files_are_refused_by_name(tmp_path, rel, content, says):
    out = _write(tmp_path / "b", {rel: json.dumps(content).encode()})
    with pytest.raises(BundleError, match=f"{rel}.*{says}"):
        load_bundle(out)


def test_serving_at_another_precision_warns(bundle: Bundle, caplog):
    from scxnn_node.model.engine import InferenceEngine
    from scxnn_node.model.options import EngineOptions

    with caplog.at_level(logging.WARNING, logger="scxnn_node.model.engine"):
        engine = InferenceEngine(bundle, EngineOptions(precision="fp32"))
    assert engine.precision == "fp32"
    assert "set at bf16 precision; serving at fp32" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="scxnn_node.model.engine"):
        InferenceEngine(bundle, EngineOptions(precision="bf16"))
    assert "precision" not in caplog.text


def test_engine_results_carry_the_safety_net(bundle: Bundle):
    from scxnn_node.model.engine import InferenceEngine
    from scxnn_node.model.options import EngineOptions

    always = CriticalSafetyNet((replace(NET.thresholds[0], threshold=0.0),))
    engine = InferenceEngine(replace(_at(bundle, 1e9), safety_net=always), EngineOptions())
    images = np.random.default_rng(0).integers(0, 256, (1, 32, 32), dtype=np.uint8)
    result = engine.triage("1.2.3", images, ["x"])
    assert result.verdict is Verdict.ABNORMAL and result.safety_net_fired == ("pneumothorax",)
    assert result.findings[0].probabilities["target"] == pytest.approx(
        float(
            np.exp(engine.member_logits(images)[0, 0] / 2.0)[TARGET]
            / np.exp(engine.member_logits(images)[0, 0] / 2.0).sum()
        ),
        rel=1e-4,
    )


def test_bundle_show_prints_the_safety_net_and_the_card(calibrated_dir: Path, tmp_path: Path):
    def show(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "scxnn_node.cli", "bundle", "show", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )

    out = show(str(calibrated_dir), "--card")
    assert out.returncode == 0, out.stderr
    assert "precision:     bf16" in out.stdout
    assert "safety net:    guaranteed" in out.stdout
    assert "pneumothorax" in out.stdout and "threshold 0.3000" in out.stdout
    assert "Guarantee achieved: none." in out.stdout
    weak = CriticalSafetyNet(
        (InsufficientPositives("pneumothorax", 299, 3, 0.63, 0.5, 0.01, 0.95),)
    )
    lacking = _write(tmp_path / "weak", {SAFETY_NET_FILE: json.dumps(weak.to_dict()).encode()})
    out = show(str(lacking))
    assert "safety net:    GUARANTEE NOT MET" in out.stdout
    assert "NOT ENOUGH POSITIVES: 3 of 299 needed" in out.stdout
    bare = _write(tmp_path / "bare", {})
    assert "safety net:    none" in show(str(bare)).stdout
