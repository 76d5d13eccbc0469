"""Shared fixtures: small bundles built with the real writers, and the demo bundle."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from scxnn_node.model.bundle import write_bundle
from training.untrained import untrained_parts

DATA = Path(__file__).resolve().parents[1] / "scxnn_node" / "samples"
SMALL_FINDINGS = ("pneumothorax", "nodule", "cardiomegaly")


def build_random_bundle(out: Path, names=SMALL_FINDINGS, size: int = 64) -> Path:
    """A bundle of untrained small members and an SVM fitted on random logits."""
    manifest, states, stage = untrained_parts("densenet_small", size, names)
    manifest = replace(manifest, name="test-bundle", version="1.2.3", intended_use="tests")
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
