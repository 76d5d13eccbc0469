"""Bundles of untrained members: for tests and speed benchmarks, where weights do not matter.

They go through the real bundle format (manifest, safetensors, SVM as numbers) but claim
nothing: `demo` is true and the SVM is fitted on random logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from scxnn_node.findings import THESIS_CATALOGUE
from scxnn_node.imaging.preprocess import PreprocessSpec
from scxnn_node.model.bundle import Bundle, load_bundle, write_bundle
from scxnn_node.model.manifest import Manifest, OperatingPoint, TrainingData, utc_now_iso
from scxnn_node.model.member import MemberNet
from scxnn_node.model.second_stage import SvmSecondStage
from training.second_stage_fit import fit_second_stage


def untrained_parts(
    arch: str, size: int, findings: Sequence[str] | None = None, seed: int = 0
) -> tuple[Manifest, dict[str, dict[str, torch.Tensor]], SvmSecondStage]:
    torch.manual_seed(seed)
    catalogue = THESIS_CATALOGUE.subset(list(findings)) if findings else THESIS_CATALOGUE
    states = {
        name: MemberNet(arch, with_decoder=False).inference_state_dict() for name in catalogue.names
    }
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(60, 3 * len(catalogue)))
    stage = fit_second_stage(logits, (logits[:, 1] > 0).astype(int))
    manifest = Manifest(
        name="untrained",
        version="0.0.1",
        created=utc_now_iso(),
        demo=True,
        intended_use="tests and speed benchmarks only; untrained weights. NOT FOR CLINICAL USE.",
        findings=catalogue,
        preprocessing=PreprocessSpec(size=size),
        architecture=arch,
        operating_point=OperatingPoint(0.99, 0.0, {"sensitivity": 1.0}),
        training_data=TrainingData("none (random logits)", "0" * 64),
    )
    return manifest, states, stage


def untrained_bundle(
    arch: str, size: int, findings: Sequence[str] | None = None, out: Path | None = None
) -> Bundle:
    """In memory, or written to `out` and loaded back (verified) when given."""
    manifest, states, stage = untrained_parts(arch, size, findings)
    if out is None:
        return Bundle(Path("<memory>"), manifest, stage, states)
    write_bundle(out, manifest, states, stage)
    return load_bundle(out)
