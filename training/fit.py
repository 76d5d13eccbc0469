"""A training run: manifest + config -> trained members, second stage and operating point.

The members' validation logits are computed as the node computes them (inference form of the
member, at the bundle's serving precision); the second stage is fitted and calibrated on
disjoint validation patients by calibrate.py.

The run directory's layout is in run_layout.py. Members are independent: `fit --member X`
trains one (on its own machine if the run directory is shared or copied back); `fit` without
--member trains whatever is missing and then the second stage.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from scxnn_node.atomic_file import write_text_atomically
from scxnn_node.model.decision import abnormality_scores
from scxnn_node.model.fused import FusedMember
from scxnn_node.model.manifest import utc_now_iso
from scxnn_node.model.member import MemberNet
from scxnn_node.model.second_stage import SvmSecondStage
from scxnn_node.model.temperature import temperatures_to_dict
from training.cache import CachedImage, build_cache
from training.calibrate import ValidationImages, calibrate
from training.calibration_split import (
    FitCalibrationSplit,
    image_roles,
    split_fit_calibration,
    write_image_roles,
)
from training.config import TrainingConfig
from training.dataset import (
    SPLITS,
    DatasetManifest,
    ManifestEntry,
    ManifestError,
    ManifestRow,
    load_manifest,
    write_manifest,
)
from training.distributed import DistInfo
from training.drift_reference import calibration_drift_reference
from training.member_data import build_plans
from training.member_records import save_member
from training.member_targets import member_class
from training.member_training import MemberTrainer
from training.metrics import EvaluationInputs, triage_metrics
from training.run_layout import (
    CACHE_DIR,
    CALIBRATION_FILE,
    CONFIG_FILE,
    DATASET_FILE,
    DONE_FILE,
    DRIFT_REFERENCE_FILE,
    IMAGE_ROLES_FILE,
    OPERATING_POINT_FILE,
    RESOLVED_MANIFEST,
    RUN_FILE,
    SAFETY_NET_FILE,
    SECOND_STAGE_FILE,
    TEMPERATURES_FILE,
    VAL_LOGITS_FILE,
    VALIDATION_METRICS_FILE,
    RunError,
    member_dir,
    member_done,
)
from training.temperature import UNKNOWN

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedData:
    manifest: DatasetManifest  # every entry has its split
    cached: dict[int, CachedImage]

    def split(self, name: str) -> list[ManifestEntry]:
        return self.manifest.split(name)


def _write_json(path: Path, data: Any) -> None:
    write_text_atomically(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def dataset_summary(manifest: DatasetManifest, findings: list[str]) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "manifest": str(manifest.path),
        "manifest_sha256": manifest.sha256,
        "findings": findings,
        "splits": {},
    }
    for split in SPLITS:
        entries = manifest.split(split)
        summary["splits"][split] = {
            "images": len(entries),
            "patients": len({e.patient_id for e in entries}),
            "abnormal": sum(1 for e in entries if e.abnormal == 1),
            "normal": sum(1 for e in entries if e.abnormal == 0),
            "hard": sum(1 for e in entries if e.label_kind == "hard"),
            "weak": sum(1 for e in entries if e.label_kind == "weak"),
            "positives": {f: sum(1 for e in entries if e.label(f) == 1) for f in findings},
        }
    return summary


def _resolved_rows(manifest: DatasetManifest) -> list[ManifestRow]:
    return [
        ManifestRow(
            image=str(e.image.resolve()),
            patient_id=e.patient_id,
            labels=dict(e.labels),
            label_kind=e.label_kind,
            split=e.split or "",
            masks=dict(e.masks),
            other_disease=e.other_disease,
            no_finding=e.no_finding,
            study_id=e.study_id,
        )
        for e in manifest.entries
    ]


def prepare_run(
    config: TrainingConfig,
    manifest_path: str | Path,
    run_dir: str | Path,
    dist_info: DistInfo | None = None,
    progress: bool = True,
) -> PreparedData:
    """Validate the manifest against the config, split it, fill the preprocessing cache and
    record what the run is made of (refusing a run directory made for something else)."""
    dist_info = dist_info or DistInfo()
    run = Path(run_dir)
    manifest = load_manifest(manifest_path)
    missing = [f for f in config.findings if f not in manifest.findings]
    if missing:
        raise ManifestError(
            manifest.path,
            [f"the config trains {missing}, which have no label column in this manifest"],
        )
    manifest = manifest.with_automatic_split(config.split.seed, config.split.fractions)
    identity = {"config_fingerprint": config.fingerprint(), "manifest_sha256": manifest.sha256}
    run_file = run / RUN_FILE
    if run_file.exists():
        recorded = json.loads(run_file.read_text())
        for key, value in identity.items():
            if recorded.get(key) != value:
                raise RunError(
                    f"{run}: this run directory was made with another {key.split('_')[0]} "
                    f"({key} differs); use a new run directory"
                )
    elif dist_info.is_main:
        run.mkdir(parents=True, exist_ok=True)
        _write_json(
            run_file, {**identity, "created": utc_now_iso(), "manifest": str(manifest.path)}
        )
        (run / CONFIG_FILE).write_text(
            yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
        )
        _write_json(run / DATASET_FILE, dataset_summary(manifest, config.findings))
        write_manifest(run / RESOLVED_MANIFEST, _resolved_rows(manifest), manifest.findings)
    cache_root = config.cache_dir or run / CACHE_DIR
    spec = config.preprocessing
    if dist_info.distributed and not dist_info.is_main:
        dist.barrier()  # rank 0 fills the cache first
    cached = build_cache(
        manifest, spec, cache_root, config.preprocess_workers, progress and dist_info.is_main
    )
    if dist_info.distributed and dist_info.is_main:
        dist.barrier()
    return PreparedData(manifest, cached)


_AUTOCAST = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@torch.inference_mode()
def member_logits_on(
    member: MemberNet,
    cached: Sequence[CachedImage],
    batch_size: int,
    device: torch.device,
    precision: str = "fp32",
) -> np.ndarray:
    """(N, 3) logits of a trained member on cached preprocessed images, computed as the node's
    engine computes them by default (model/engine.py): the member's inference form
    (model/fused.py), channels_last, under autocast at `precision` (fp32, bf16 or fp16), so
    thresholds set on them hold for the node's scores."""
    dtype = _AUTOCAST[precision]
    # A copy: the fused form shares modules with the member, whose weights are saved next.
    runner = FusedMember(copy.deepcopy(member).eval()).to(device).eval()
    runner = runner.to(memory_format=torch.channels_last)
    out = []
    for start in range(0, len(cached), batch_size):
        batch = np.stack([c.load_image() for c in cached[start : start + batch_size]])
        x = torch.from_numpy(batch).unsqueeze(1).to(device).float() / 255.0
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            out.append(runner(x).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 3), np.float32)


def validation_cut(config: TrainingConfig, data: PreparedData) -> FitCalibrationSplit:
    """The run's fit/calibration cut of its validation patients (the same one calibrate.py
    makes from the same rows and settings); RunError when validation cannot be cut."""
    val = data.split("val")
    sc = config.second_stage
    try:
        return split_fit_calibration(
            [e.patient_id for e in val],
            [e.abnormal for e in val],
            sc.calibration_fraction,
            sc.calibration_seed,
        )
    except ValueError as exc:
        raise RunError(f"validation split: {exc}") from None


def train_one_member(
    config: TrainingConfig,
    data: PreparedData,
    run_dir: str | Path,
    finding: str,
    resume: bool = False,
    stop_after_epochs: int | None = None,
    dist_info: DistInfo | None = None,
    progress: bool = True,
) -> None:
    """Train one member and store its weights and validation logits in the run. The member
    chooses its learning-rate steps and best epoch on the fit part of validation only: the
    calibration patients stay unseen until they set the thresholds."""
    dist_info = dist_info or DistInfo()
    directory = member_dir(run_dir, finding)
    started = time.monotonic()
    cut = validation_cut(config, data)
    selection = [e for e in data.split("val") if e.patient_id in cut.fit_patients]
    plans = build_plans(config, finding, data.split("train"), selection, data.cached)
    trainer = MemberTrainer(config, finding, directory, dist_info, progress)
    member = trainer.train(plans, resume=resume, stop_after_epochs=stop_after_epochs)
    if not dist_info.is_main:
        return
    val = data.split("val")
    precision = config.resolved_serving_precision
    logits = member_logits_on(
        member,
        [data.cached[e.row] for e in val],
        config.training.batch_size * 2,
        trainer.device,
        precision,
    )
    np.save(directory / VAL_LOGITS_FILE, logits, allow_pickle=False)
    save_member(
        member,
        directory,
        {
            "finding": finding,
            "val_rows": [e.row for e in val],
            "val_logits_precision": precision,
            "epoch_selected_on": "fit part of validation",
            "train_images": {p.name: len(p.train) for p in plans},
            "seconds": round(time.monotonic() - started, 1),
            "finished": utc_now_iso(),
        },
    )
    log.info("member %s done in %.0f s", finding, time.monotonic() - started)


def fit_second_stage_for_run(
    config: TrainingConfig, data: PreparedData, run_dir: str | Path
) -> dict[str, Any]:
    """The SVM and temperatures on the fit part of validation, the threshold and the critical
    safety net on the calibration part; writes them, every image's role and the calibration
    part's metrics (returned)."""
    run = Path(run_dir)
    val = data.split("val")
    rows = [e.row for e in val]
    precision = config.resolved_serving_precision
    stacked = []
    for finding in config.catalogue.names:
        d = member_dir(run, finding)
        done = json.loads((d / DONE_FILE).read_text())
        if done["val_rows"] != rows:
            raise RunError(f"{d}: validation rows differ from this run's; retrain the member")
        # Logits from before serving precisions were recorded were computed in fp32.
        computed_at = done.get("val_logits_precision", "fp32")
        if computed_at != precision:
            raise RunError(
                f"{d}: validation logits were computed at {computed_at}, the run serves at "
                f"{precision}; retrain the member (or set serving_precision)"
            )
        stacked.append(np.load(d / VAL_LOGITS_FILE, allow_pickle=False))
    logits = np.stack(stacked, axis=1) if rows else np.zeros((0, len(stacked), 3), np.float32)
    names = config.catalogue.names
    classes = np.array(
        [[UNKNOWN if (k := member_class(e, f)) is None else k for f in names] for e in val],
        dtype=int,
    ).reshape(len(val), len(names))
    images = ValidationImages(
        logits=logits,
        patient_ids=[e.patient_id for e in val],
        study_ids=[e.study_id for e in val],
        labels=[e.labels for e in val],
        abnormal=[e.abnormal for e in val],
        member_classes=classes,
    )
    sc = config.second_stage
    try:
        result = calibrate(
            config.catalogue,
            images,
            kernel=sc.kernel,
            c=sc.c,
            class_weight=None if sc.class_weight == "none" else sc.class_weight,
            target_sensitivity=sc.target_sensitivity,
            confidence=sc.confidence,
            calibration_fraction=sc.calibration_fraction,
            calibration_seed=sc.calibration_seed,
            critical_miss_rate=sc.critical_miss_rate,
            precision=precision,
        )
    except ValueError as exc:
        raise RunError(f"second stage: {exc}") from None
    if result.split != validation_cut(config, data):  # the members chose epochs on this cut
        raise RunError("second stage: the validation cut differs from the members'")
    calibration_rows = result.split.calibration_mask(images.patient_ids)
    cal_val = [e for e, on in zip(val, calibration_rows, strict=True) if on]
    cal_logits = logits[calibration_rows]
    metrics = triage_metrics(
        EvaluationInputs(
            findings=config.catalogue,
            logits=cal_logits,
            scores=abnormality_scores(result.second_stage, cal_logits),
            threshold=result.operating_point.threshold,
            labels=[e.labels for e in cal_val],
            abnormal=[e.abnormal for e in cal_val],
            other_disease=[e.other_disease for e in cal_val],
        )
    )
    metrics["evaluated_on"] = "calibration part of validation (images; thresholds set here)"
    write_image_roles(run / IMAGE_ROLES_FILE, image_roles(data.manifest.entries, result.split))
    _write_json(run / SECOND_STAGE_FILE, result.second_stage.to_dict())
    _write_json(run / TEMPERATURES_FILE, temperatures_to_dict(names, result.temperatures))
    _write_json(run / OPERATING_POINT_FILE, result.operating_point.to_dict())
    _write_json(run / SAFETY_NET_FILE, result.safety_net.to_dict())
    _write_json(run / CALIBRATION_FILE, result.summary)
    _write_json(run / VALIDATION_METRICS_FILE, metrics)
    reference = calibration_drift_reference(
        [e.image for e in val], result, config.preprocessing, config.preprocess_workers
    )
    _write_json(run / DRIFT_REFERENCE_FILE, reference.to_dict())
    v = result.operating_point.validation
    log.info(
        "second stage: SVM on %d fit images, threshold %.4f on %d calibration %ss: sensitivity "
        "%.3f specificity %.3f; guarantee %s",
        v["n_fit_images"],
        result.operating_point.threshold,
        v["n_calibration_studies"],
        v["threshold_unit"],
        v["sensitivity"],
        v["specificity"],
        "met" if result.guarantee_met else "NOT met",
    )
    return metrics


def load_run_second_stage(run_dir: str | Path) -> SvmSecondStage:
    return SvmSecondStage.from_dict(json.loads((Path(run_dir) / SECOND_STAGE_FILE).read_text()))


def fit_run(
    config: TrainingConfig,
    manifest_path: str | Path,
    run_dir: str | Path,
    member: str | None = None,
    resume: bool = False,
    stop_after_epochs: int | None = None,
    dist_info: DistInfo | None = None,
    progress: bool = True,
    allow_random_init: bool = False,
) -> dict[str, Any] | None:
    """Train `member` only, or every member not yet done and then the second stage (whose
    validation metrics are returned). A run that is not a demo needs pretrained encoder
    weights unless `allow_random_init`."""
    dist_info = dist_info or DistInfo()
    if member is not None and member not in config.findings:
        raise RunError(f"--member {member!r} is not one of the config's findings {config.findings}")
    if config.imagenet_weights is None and not config.demo:
        if not allow_random_init:
            raise RunError(
                "the config is not a demo (demo: false) and gives no ImageNet (or other "
                "pretrained) encoder weights (imagenet_weights): the thesis starts every member "
                "from them. Give a local weights file, or pass --allow-random-init to train "
                "from random weights on purpose"
            )
        log.warning(
            "TRAINING FROM RANDOM WEIGHTS (--allow-random-init): no pretrained encoder; expect "
            "weaker members than the thesis's"
        )
    data = prepare_run(config, manifest_path, run_dir, dist_info, progress)
    todo = [member] if member else config.catalogue.names
    for finding in todo:
        if member_done(run_dir, finding):
            log.info("member %s already trained in %s; skipped", finding, run_dir)
            continue
        train_one_member(
            config, data, run_dir, finding, resume, stop_after_epochs, dist_info, progress
        )
    if member is not None or not dist_info.is_main:
        return None
    return fit_second_stage_for_run(config, data, run_dir)
