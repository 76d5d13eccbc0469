"""Where everything lives in a training run directory: each name in it is defined here once.

Run directory:
    run.json                 config fingerprint and manifest hash the run belongs to
    config.yaml              the validated config
    dataset.json             split sizes and finding counts per split
    dataset/manifest.csv     the manifest with every split resolved and absolute paths
                             (evaluate its test split with `scxnn-train evaluate`)
    cache/                   preprocessed PNGs (unless config.cache_dir points elsewhere)
    members/<finding>/       checkpoint.pt, metrics.csv, member.safetensors, done.json,
                             val_logits.npy
    image_roles.csv          image, patient_id, role (train, fit, calibration or test)
    second_stage.json        the SVM, fitted on the fit part of validation
    temperatures.json        one temperature per member, fitted on the fit part
    operating_point.json     the threshold, set on the calibration part (study-level scores)
    safety_net.json          critical-finding thresholds, set on the calibration part
    calibration.json         what the calibration part shows: counts, per-tier results
    validation_metrics.json  the thesis's tables on the calibration part
    drift_reference.json     the calibration part's scores and input statistics (drift watch)
"""

from __future__ import annotations

from pathlib import Path

# A run keeps these under the names the bundle gives them (export copies them as they are).
from scxnn_node.model.safety_net import SAFETY_NET_FILE as SAFETY_NET_FILE
from scxnn_node.model.temperature import TEMPERATURES_FILE as TEMPERATURES_FILE

RUN_FILE = "run.json"
CONFIG_FILE = "config.yaml"
DATASET_FILE = "dataset.json"
RESOLVED_MANIFEST = "dataset/manifest.csv"
CACHE_DIR = "cache"
MEMBERS_DIR = "members"
SECOND_STAGE_FILE = "second_stage.json"
OPERATING_POINT_FILE = "operating_point.json"
VALIDATION_METRICS_FILE = "validation_metrics.json"
IMAGE_ROLES_FILE = "image_roles.csv"
CALIBRATION_FILE = "calibration.json"
DRIFT_REFERENCE_FILE = "drift_reference.json"

# In each member's directory:
CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.csv"
WEIGHTS_FILE = "member.safetensors"
DONE_FILE = "done.json"
VAL_LOGITS_FILE = "val_logits.npy"


class RunError(Exception):
    """A run directory or checkpoint that does not fit the request; the message says why."""


def member_dir(run_dir: str | Path, finding: str) -> Path:
    return Path(run_dir) / MEMBERS_DIR / finding


def member_done(run_dir: str | Path, finding: str) -> bool:
    d = member_dir(run_dir, finding)
    return (d / DONE_FILE).exists() and (d / WEIGHTS_FILE).exists()
