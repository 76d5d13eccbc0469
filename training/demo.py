"""The demo bundle: training/configs/demo.yaml run through the one training pipeline.

It exists so that the node runs end to end on a fresh machine in minutes; it claims nothing.
Synthetic images with masks -> manifest -> fit (members, SVM, operating point) -> export.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any

from scxnn_node.config import read_yaml_mapping
from scxnn_node.model.manifest import Manifest
from training.config import training_config_from
from training.export import export_bundle
from training.fit import fit_run
from training.synthetic import write_synthetic_dataset

log = logging.getLogger(__name__)

DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo.yaml"
DEMO_VERSION = "0.1.0"


def build_demo_bundle(
    out_dir: str | Path,
    count: int = 380,
    source_size: int = 128,
    epochs: int | None = None,
    seed: int = 0,
    config_path: str | Path = DEMO_CONFIG,
    progress: bool = False,
) -> Manifest:
    """Synthesise `count` images of `source_size` px, train the demo config (with `epochs`
    overriding both stages' max_epochs), export version 0.1.0 to `out_dir`."""
    raw: dict[str, Any] = read_yaml_mapping(config_path)
    raw["seed"] = seed
    if epochs is not None:
        training = raw.setdefault("training", {})
        training.setdefault("hard", {})["max_epochs"] = epochs
        training.setdefault("weak", {})["max_epochs"] = min(epochs, 1)
    config = training_config_from(raw, str(config_path))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="scxnn-demo-") as tmp:
        manifest = write_synthetic_dataset(
            Path(tmp) / "data", count, source_size, seed, config.findings, weak_fraction=0.15
        )
        fit_run(config, manifest, Path(tmp) / "run", progress=progress)
        written = export_bundle(
            Path(tmp) / "run",
            out_dir,
            DEMO_VERSION,
            changelog=f"{DEMO_VERSION}: demo bundle built by scxnn-train demo-bundle "
            f"({count} synthetic images, seed {seed})",
        )
    log.info("demo bundle written to %s in %.0f s", out_dir, time.monotonic() - started)
    return written
