"""Export a finished run as a versioned bundle in the node's format.

The bundle carries the members' encoder + head weights (the decoder is for training only), the
SVM as plain numbers, the operating point with its Neyman-Pearson guarantee, the preprocessing
spec, the finding list, the training manifest's sha256, a changelog line, the member
temperatures and the critical safety net the node applies, MODEL_CARD.md, and as listed,
hash-checked records: validation and calibration metrics, the training config and the dataset
summary. A run that recorded its calibration part's distributions gives the manifest its
`drift_reference` (drift watch); an older run's bundle has none.

A run whose definite-normal guarantee is not met (too few abnormal calibration studies, or too
few positives of a critical finding) is not exported as a clinical bundle: export refuses,
naming the shortfall, unless asked for a bundle marked NOT FOR CLINICAL USE (the demo marking,
which every output of the node shows).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import load_file

from scxnn_node.drift_reference import DriftReference
from scxnn_node.model.bundle import write_bundle
from scxnn_node.model.manifest import (
    MODEL_CARD_FILE,
    NOT_FOR_CLINICAL_USE,
    BundleError,
    Manifest,
    OperatingPoint,
    TrainingData,
    read_manifest,
    utc_now_iso,
)
from scxnn_node.model.safety_net import CriticalSafetyNet
from scxnn_node.model.temperature import temperatures_from_dict, temperatures_to_dict
from training.config import load_training_config
from training.fit import load_run_second_stage
from training.model_card import guarantee_shortfalls, render_model_card
from training.provenance import PROVENANCE_FILE, run_provenance
from training.run_layout import (
    CALIBRATION_FILE,
    CONFIG_FILE,
    DATASET_FILE,
    DRIFT_REFERENCE_FILE,
    OPERATING_POINT_FILE,
    RUN_FILE,
    SAFETY_NET_FILE,
    TEMPERATURES_FILE,
    VALIDATION_METRICS_FILE,
    WEIGHTS_FILE,
    member_dir,
    member_done,
)

RECORD_FILES = {
    "training/validation_metrics.json": VALIDATION_METRICS_FILE,
    "training/calibration.json": CALIBRATION_FILE,
    "training/dataset.json": DATASET_FILE,
    "training/config.yaml": CONFIG_FILE,
}


def export_bundle(
    run_dir: str | Path,
    out_dir: str | Path,
    version: str,
    changelog: str | None = None,
    previous: str | Path | None = None,
    not_for_clinical_use: bool = False,
) -> Manifest:
    """Write the run as bundle `version` in `out_dir` (a new directory; bundles are immutable).
    With `previous`, that bundle's changelog lines follow the new one. A non-demo run whose
    guarantee is not met is refused unless `not_for_clinical_use`, which marks the bundle."""
    run = Path(run_dir)
    if not (run / RUN_FILE).exists():
        raise BundleError(f"{run}: not a training run directory (no {RUN_FILE})")
    config = load_training_config(run / CONFIG_FILE)
    missing = [f for f in config.catalogue.names if not member_done(run, f)]
    if missing:
        raise BundleError(f"{run}: members not trained yet: {missing}")
    calibration_files = (OPERATING_POINT_FILE, TEMPERATURES_FILE, SAFETY_NET_FILE)
    if not all((run / f).exists() for f in (*calibration_files, CALIBRATION_FILE)):
        raise BundleError(
            f"{run}: no held-out second stage yet; run `scxnn-train fit` without --member "
            "(trained members are kept)"
        )
    net = CriticalSafetyNet.from_dict(json.loads((run / SAFETY_NET_FILE).read_text()))
    temperatures = temperatures_from_dict(
        json.loads((run / TEMPERATURES_FILE).read_text()), config.catalogue.names
    )
    states = {}
    for finding in config.catalogue.names:
        full = load_file(str(member_dir(run, finding) / WEIGHTS_FILE))
        states[finding] = {k: v for k, v in full.items() if not k.startswith("decoder.")}
    op_data = json.loads((run / OPERATING_POINT_FILE).read_text())
    shortfalls = guarantee_shortfalls(op_data, net)
    demo, intended_use = config.demo, config.intended_use
    if shortfalls and not config.demo and not not_for_clinical_use:
        raise BundleError(
            f"{run}: the definite-normal guarantee is not met, so this run is not exported as a "
            "clinical bundle: " + "; ".join(shortfalls) + ". Calibrate on more patients, or "
            f"export with --not-for-clinical-use for a bundle marked {NOT_FOR_CLINICAL_USE}"
        )
    if not_for_clinical_use and not config.demo:
        why = "; ".join(shortfalls) or "exported with --not-for-clinical-use"
        demo, intended_use = True, f"{NOT_FOR_CLINICAL_USE} ({why}). {config.intended_use}"
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
    drift_file = run / DRIFT_REFERENCE_FILE
    drift_reference = None
    if drift_file.exists():
        drift_reference = DriftReference.from_dict(json.loads(drift_file.read_text()))
    manifest = Manifest(
        name=config.name,
        version=version,
        created=utc_now_iso(),
        demo=demo,
        intended_use=intended_use,
        findings=config.catalogue,
        preprocessing=config.preprocessing,
        architecture=config.architecture,
        operating_point=operating_point,
        training_data=TrainingData(
            description=f"manifest {dataset['manifest']}: {counts}",
            manifest_sha256=identity["manifest_sha256"],
        ),
        changelog=(line, *history),
        precision=op_data.get("validation", {}).get("precision"),
        drift_reference=drift_reference,
    )
    calibration = json.loads((run / CALIBRATION_FILE).read_text())
    records = {rel: (run / src).read_bytes() for rel, src in RECORD_FILES.items()}
    records[TEMPERATURES_FILE] = json.dumps(
        temperatures_to_dict(config.catalogue.names, temperatures.tolist())
    ).encode()
    records[SAFETY_NET_FILE] = json.dumps(net.to_dict()).encode()
    card = render_model_card(manifest, dataset, calibration, net, shortfalls)
    records[MODEL_CARD_FILE] = card.encode()
    records[PROVENANCE_FILE] = run_provenance(run)  # salted hashes: evaluate refuses seen data
    return write_bundle(out_dir, manifest, states, load_run_second_stage(run), records)
