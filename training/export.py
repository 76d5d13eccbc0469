"""Export a finished run as a versioned bundle in the node's format.

The bundle carries the members' encoder + head weights (the decoder is for training only), the
SVM as plain numbers, the operating point with its Neyman-Pearson guarantee, the preprocessing
spec, the finding list, the training manifest's sha256, a changelog line, and as listed,
hash-checked records: validation metrics, the training config and the dataset summary.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import load_file

from scxnn_node.model.bundle import (
    BundleError,
    Manifest,
    OperatingPoint,
    TrainingData,
    read_manifest,
    utc_now_iso,
    write_bundle,
)
from training.config import load_training_config
from training.fit import (
    DATASET_FILE,
    OPERATING_POINT_FILE,
    RUN_FILE,
    VALIDATION_METRICS_FILE,
    load_run_second_stage,
    member_dir,
    member_done,
)
from training.member_training import WEIGHTS_FILE

RECORD_FILES = {
    "training/validation_metrics.json": VALIDATION_METRICS_FILE,
    "training/dataset.json": DATASET_FILE,
    "training/config.yaml": "config.yaml",
}


def export_bundle(
    run_dir: str | Path,
    out_dir: str | Path,
    version: str,
    changelog: str | None = None,
    previous: str | Path | None = None,
) -> Manifest:
    """Write the run as bundle `version` in `out_dir` (a new directory; bundles are immutable).
    With `previous`, that bundle's changelog lines follow the new one."""
    run = Path(run_dir)
    if not (run / RUN_FILE).exists():
        raise BundleError(f"{run}: not a training run directory (no {RUN_FILE})")
    config = load_training_config(run / "config.yaml")
    missing = [f for f in config.catalogue.names if not member_done(run, f)]
    if missing:
        raise BundleError(f"{run}: members not trained yet: {missing}")
    if not (run / OPERATING_POINT_FILE).exists():
        raise BundleError(f"{run}: no second stage yet; run `scxnn-train fit` without --member")
    states = {}
    for finding in config.catalogue.names:
        full = load_file(str(member_dir(run, finding) / WEIGHTS_FILE))
        states[finding] = {k: v for k, v in full.items() if not k.startswith("decoder.")}
    op_data = json.loads((run / OPERATING_POINT_FILE).read_text())
    operating_point = OperatingPoint(
        op_data["target_sensitivity"], op_data["threshold"], op_data.get("validation", {})
    )
    identity = json.loads((run / RUN_FILE).read_text())
    dataset = json.loads((run / DATASET_FILE).read_text())
    counts = ", ".join(
        f"{split} {v['images']} images ({v['abnormal']} abnormal)"
        for split, v in dataset["splits"].items()
    )
    line = changelog or (
        f"{version}: trained from manifest sha256 {identity['manifest_sha256'][:12]} "
        f"({counts}); config {identity['config_fingerprint'][:12]}"
    )
    history: Sequence[str] = read_manifest(previous).changelog if previous else ()
    manifest = Manifest(
        name=config.name,
        version=version,
        created=utc_now_iso(),
        demo=config.demo,
        intended_use=config.intended_use,
        findings=config.catalogue,
        preprocessing=config.preprocessing,
        architecture=config.architecture,
        operating_point=operating_point,
        training_data=TrainingData(
            description=f"manifest {dataset['manifest']}: {counts}",
            manifest_sha256=identity["manifest_sha256"],
        ),
        changelog=(line, *history),
    )
    records = {rel: (run / src).read_bytes() for rel, src in RECORD_FILES.items()}
    return write_bundle(out_dir, manifest, states, load_run_second_stage(run), records)
