"""config.yaml: the documented example is valid; errors name key and file; env overrides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from scxnn_node.config import ConfigError, NodeConfig, load_config

EXAMPLE = Path(__file__).resolve().parents[1] / "config.yaml"


def test_example_config_is_valid_and_uses_the_issue_keys():
    config = load_config(EXAMPLE, environ={})
    assert config.node.ae_title == "SCXNN" and config.node.port == 11112
    assert config.allowed_callers[0].ae_title == "PACS"
    assert str(config.storage.spool_dir) == "var/spool"
    assert config.database.url == "sqlite:///var/scxnn.db"
    assert config.model.devices == ["cpu"] and config.study.quiet_seconds == 5
    assert config.destinations[0].outputs == ["sr", "summary"]
    # Every documented default equals the schema's own default.
    defaults = NodeConfig()
    for section in (
        "node",
        "storage",
        "database",
        "model",
        "study",
        "filters",
        "delivery",
        "worker",
        "scheduler",
        "logging",
    ):
        assert getattr(config, section) == getattr(defaults, section), section


def test_unknown_key_named_with_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("node:\n  ae_title: X\n  colour: blue\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: node\.colour: unknown key"):
        load_config(path, environ={})


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("node: {port: 70000}", "node.port"),
        ("node: {ae_title: WAY_TOO_LONG_AE_TITLE}", "node.ae_title"),
        ("model: {devices: [tpu]}", "model.devices"),
        (
            "destinations: [{name: a, ae_title: A, host: h, port: 1, outputs: [pdf]}]",
            "destinations.0.outputs",
        ),
        (
            "destinations: [{name: a, ae_title: A, host: h, port: 1}, "
            "{name: a, ae_title: B, host: h, port: 2}]",
            "destinations",
        ),
    ],
)
def test_invalid_values_name_the_key(tmp_path, text, key):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"c\.yaml: {key}"):
        load_config(path, environ={})


def test_environment_overrides(tmp_path):
    config = load_config(
        EXAMPLE,
        environ={
            "SCXNN__NODE__PORT": "11999",
            "SCXNN__MODEL__DEVICES": "[cuda:0, cuda:1]",
            "SCXNN__LOGGING__JSON_FORMAT": "true",
            "OTHER": "ignored",
        },
    )
    assert config.node.port == 11999
    assert config.model.devices == ["cuda:0", "cuda:1"]
    assert config.logging.json_format is True
    with pytest.raises(ConfigError, match=r"node\.port"):
        load_config(EXAMPLE, environ={"SCXNN__NODE__PORT": "many"})


def test_check_config_command(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "scxnn_node.cli", "check-config", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0 and "valid" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage: {spool: x}\n")
    run = subprocess.run(
        [sys.executable, "-m", "scxnn_node.cli", "check-config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1 and "storage.spool: unknown key" in run.stderr


def test_production_example_is_valid():
    production = EXAMPLE.parent / "deploy" / "production-config.yaml"
    config = load_config(production, environ={})
    assert config.database.url.startswith("postgresql")
    assert [d.name for d in config.destinations] == ["pacs", "worklist"]
    assert config.allowed_callers[0].host == "10.20.0.15"
