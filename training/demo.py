"""The demo bundle: the small architecture trained on synthetic images, marked demo.

It exists so that the node runs end to end on a fresh machine in minutes; it claims nothing.
The training path is the real one (preprocessing, multi-task members, SVM, operating point,
bundle export) at a size a CPU manages quickly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scxnn_node.findings import THESIS_CATALOGUE, FindingCatalogue
from scxnn_node.imaging.preprocess import PreprocessSpec, preprocess_image, preprocess_mask
from scxnn_node.model.bundle import Manifest, TrainingData, utc_now_iso, write_bundle
from training.member_training import MemberTrainingSettings, member_logits, train_member
from training.second_stage_fit import choose_operating_point, fit_second_stage
from training.synthetic import SyntheticCase, synthesise_cases

log = logging.getLogger(__name__)

DEMO_INTENDED_USE = (
    "Demonstration only: trained on synthetic images to exercise the node end to end. "
    "NOT FOR CLINICAL USE."
)


@dataclass(frozen=True)
class DemoSettings:
    size: int = 64
    train_count: int = 260
    val_count: int = 120
    epochs: int = 8
    seed: int = 0
    architecture: str = "densenet_small"
    version: str = "0.1.0"
    name: str = "scxnn-demo"
    target_sensitivity: float = 0.99


def prepare_cases(
    cases: list[SyntheticCase], spec: PreprocessSpec, catalogue: FindingCatalogue
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Preprocessed images (N,S,S) uint8, labels (N,F), masks (N,F,S,S) uint8."""
    n, f, s = len(cases), len(catalogue), spec.size
    images = np.empty((n, s, s), np.uint8)
    labels = np.zeros((n, f), np.int64)
    masks = np.zeros((n, f, s, s), np.uint8)
    for i, case in enumerate(cases):
        images[i] = preprocess_image(case.pixels, spec)
        for j, name in enumerate(catalogue.names):
            labels[i, j] = case.labels.get(name, 0)
            if name in case.masks:
                masks[i, j] = preprocess_mask(case.masks[name], spec)
    return images, labels, masks


def build_demo_bundle(out_dir: str | Path, settings: DemoSettings | None = None) -> Manifest:
    settings = settings or DemoSettings()
    catalogue = THESIS_CATALOGUE
    spec = PreprocessSpec(size=settings.size, clahe_tile_grid=4)
    started = time.monotonic()
    # Source images a little larger than the network input so that resizing is exercised.
    source_size = settings.size * 2
    cases = synthesise_cases(
        settings.train_count + settings.val_count,
        source_size,
        seed=settings.seed,
        findings=catalogue.names,
    )
    images, labels, masks = prepare_cases(cases, spec, catalogue)
    tr = slice(0, settings.train_count)
    va = slice(settings.train_count, None)
    member_settings = MemberTrainingSettings(
        architecture=settings.architecture, epochs=settings.epochs, seed=settings.seed
    )
    states = {}
    val_logits = np.zeros((settings.val_count, len(catalogue), 3), np.float32)
    for m, name in enumerate(catalogue.names):
        model = train_member(images[tr], labels[tr], masks[tr, m], m, member_settings)
        val_logits[:, m] = member_logits(model, images[va])
        states[name] = model.inference_state_dict()
        log.info("member %s trained (%.0f s so far)", name, time.monotonic() - started)
    abnormal = labels[va].any(axis=1).astype(int)
    stage = fit_second_stage(val_logits, abnormal)
    scores = stage.decision_function(val_logits.reshape(len(val_logits), -1))
    operating_point = choose_operating_point(scores, abnormal, settings.target_sensitivity)
    data_description = {
        "generator": "training.synthetic",
        "seed": settings.seed,
        "source_size": source_size,
        "train_count": settings.train_count,
        "val_count": settings.val_count,
    }
    manifest = Manifest(
        name=settings.name,
        version=settings.version,
        created=utc_now_iso(),
        demo=True,
        intended_use=DEMO_INTENDED_USE,
        findings=catalogue,
        preprocessing=spec,
        architecture=settings.architecture,
        operating_point=operating_point,
        training_data=TrainingData(
            description="synthetic chest-like images with lesion masks "
            + json.dumps(data_description, sort_keys=True),
            manifest_sha256=hashlib.sha256(
                json.dumps(data_description, sort_keys=True).encode()
            ).hexdigest(),
        ),
        changelog=(f"{settings.version}: demo bundle built by scxnn-train demo-bundle",),
    )
    written = write_bundle(out_dir, manifest, states, stage)
    log.info("demo bundle written to %s in %.0f s", out_dir, time.monotonic() - started)
    return written
