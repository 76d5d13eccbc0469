"""A bundle made when atelectasis was non-urgent: served with the tiers it records (they are
data), with a warning naming each finding whose tier differs from the current catalogue."""

from __future__ import annotations

import logging
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from scxnn_node.findings import THESIS_CATALOGUE, FindingCatalogue, RiskTier
from scxnn_node.model.bundle import load_bundle, write_bundle
from scxnn_node.model.decision import result_from_logits
from scxnn_node.model.manifest import OperatingPoint, verify_bundle
from training.untrained import untrained_parts

FINDINGS = ("pneumothorax", "atelectasis", "cardiomegaly")


def _bundle(out: Path, atelectasis: RiskTier) -> Path:
    manifest, states, stage = untrained_parts("densenet_small", 64, FINDINGS)
    findings = FindingCatalogue(
        [replace(f, tier=atelectasis) if f.name == "atelectasis" else f for f in manifest.findings]
    )
    # Every study is abnormal (threshold far below any score): the risk tier is what is tested.
    manifest = replace(
        manifest, findings=findings, operating_point=OperatingPoint(0.99, -1e9, {})
    )
    write_bundle(out, manifest, states, stage)
    return out


@pytest.fixture(scope="module")
def old_tiers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _bundle(tmp_path_factory.mktemp("old") / "bundle", RiskTier.NON_URGENT)


@pytest.fixture(scope="module")
def current_tiers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _bundle(tmp_path_factory.mktemp("current") / "bundle", RiskTier.URGENT)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scxnn_node.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_the_catalogue_calls_atelectasis_urgent():
    assert THESIS_CATALOGUE.get("atelectasis").tier is RiskTier.URGENT


def test_a_bundle_with_old_tiers_is_served_as_recorded_and_logs_a_warning(old_tiers, caplog):
    with caplog.at_level(logging.WARNING, logger="scxnn_node"):
        bundle = load_bundle(old_tiers)
    assert bundle.manifest.findings.get("atelectasis").tier is RiskTier.NON_URGENT
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "atelectasis" in warnings[0] and "non_urgent" in warnings[0]
    assert "urgent" in warnings[0].replace("non_urgent", "")
    # Atelectasis the only target call: the study's tier is the bundle's, not the catalogue's.
    logits = np.zeros((1, len(FINDINGS), 3), np.float32)
    logits[0, :, 0] = 5.0
    logits[0, 1] = (0.0, 5.0, 0.0)
    result = result_from_logits(bundle, "1.2.3", logits, ["1.2.3.4"])
    assert result.risk_tier == "non_urgent"
    assert [f.name for f in result.flagged_findings] == ["atelectasis"]


def test_a_bundle_with_current_tiers_loads_without_a_warning(current_tiers, caplog):
    with caplog.at_level(logging.WARNING, logger="scxnn_node"):
        load_bundle(current_tiers)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_bundle_verify_and_show_name_each_finding_whose_tier_differs(old_tiers, current_tiers):
    for command in (("verify",), ("show",), ("show", "--json")):
        old = _cli("bundle", *command, str(old_tiers))
        assert old.returncode == 0, old.stderr
        lines = [line for line in old.stderr.splitlines() if "tier" in line]
        assert len(lines) == 1 and "atelectasis" in lines[0], old.stderr
        assert "non_urgent" in lines[0] and "served as recorded" in lines[0]
        current = _cli("bundle", *command, str(current_tiers))
        assert current.returncode == 0 and "tier" not in current.stderr
    assert verify_bundle(old_tiers).findings.get("atelectasis").tier is RiskTier.NON_URGENT
