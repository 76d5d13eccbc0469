"""Shared fixtures: small bundles built with the real writers, and the demo bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from scxnn_node.findings import THESIS_CATALOGUE
from scxnn_node.imaging.preprocess import PreprocessSpec
from scxnn_node.model.bundle import Manifest, OperatingPoint, TrainingData, write_bundle
from scxnn_node.model.member import MemberNet
from training.second_stage_fit import fit_second_stage

DATA = Path(__file__).resolve().parents[1] / "scxnn_node" / "samples"
SMALL_FINDINGS = ("pneumothorax", "nodule", "cardiomegaly")


def build_random_bundle(out: Path, names=SMALL_FINDINGS, size: int = 64, seed: int = 0) -> Path:
    """A bundle of untrained small members and an SVM fitted on random logits."""
    torch.manual_seed(seed)
    catalogue = THESIS_CATALOGUE.subset(list(names))
    states = {
        n: MemberNet("densenet_small", with_decoder=False).inference_state_dict() for n in names
    }
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(40, 3 * len(names)))
    abnormal = (logits[:, 1] > 0).astype(int)
    stage = fit_second_stage(logits, abnormal, kernel="rbf")
    manifest = Manifest(
        name="test-bundle",
        version="1.2.3",
        created="2026-01-01T00:00:00Z",
        demo=True,
        intended_use="tests",
        findings=catalogue,
        preprocessing=PreprocessSpec(size=size),
        architecture="densenet_small",
        operating_point=OperatingPoint(0.99, 0.0, {"sensitivity": 1.0}),
        training_data=TrainingData("random", "0" * 64),
    )
    write_bundle(out, manifest, states, stage)
    return out


@pytest.fixture(scope="session")
def small_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_random_bundle(tmp_path_factory.mktemp("bundles") / "small")


@pytest.fixture(scope="session")
def demo_bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo bundle built by the real CLI at a test-sized scale."""
    from training.cli import main

    out = tmp_path_factory.mktemp("demo") / "bundle"
    code = main(
        [
            "--log-level",
            "WARNING",
            "demo-bundle",
            "--out",
            str(out),
            "--size",
            "64",
            "--train-count",
            "40",
            "--val-count",
            "30",
            "--epochs",
            "1",
        ]
    )
    assert code == 0
    return out
