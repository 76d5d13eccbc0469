"""`fit` will not quietly train a clinical run from random weights."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml
from trainkit import small_config_data

from training.cli import main as train_cli
from training.config import training_config_from
from training.dataset import ManifestError
from training.fit import fit_run
from training.run_layout import RunError


def test_a_clinical_run_without_pretrained_weights_is_refused(tmp_path: Path):
    config = training_config_from(small_config_data(demo=False))
    with pytest.raises(RunError, match="--allow-random-init") as err:
        fit_run(config, tmp_path / "none.csv", tmp_path / "run", progress=False)
    assert "ImageNet" in str(err.value)
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_random_init_goes_ahead_when_asked_and_says_so(tmp_path: Path, caplog):
    config = training_config_from(small_config_data(demo=False))
    # past the guard, the next check is the manifest's: it does not exist
    with (
        caplog.at_level(logging.WARNING, logger="training.fit"),
        pytest.raises(ManifestError, match="cannot read manifest"),
    ):
        fit_run(
            config, tmp_path / "none.csv", tmp_path / "run", allow_random_init=True, progress=False
        )
    assert "RANDOM" in caplog.text


def test_demo_runs_and_runs_with_weights_need_no_flag(tmp_path: Path):
    for data in (small_config_data(), small_config_data(demo=False, imagenet_weights="w.pth")):
        with pytest.raises(ManifestError, match="cannot read manifest"):
            fit_run(training_config_from(data), tmp_path / "none.csv", tmp_path / "r")


def test_the_command_line_passes_the_flag(tmp_path: Path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(small_config_data(demo=False)))
    args = ["--log-level", "ERROR", "fit", "--config", str(config)]
    args += ["--manifest", str(tmp_path / "none.csv"), "--out", str(tmp_path / "run")]
    assert train_cli(args) == 1
    assert "--allow-random-init" in capsys.readouterr().err
    assert train_cli([*args, "--allow-random-init"]) == 1
    assert "cannot read manifest" in capsys.readouterr().err
