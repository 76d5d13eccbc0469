"""A training run: manifest + config -> trained members, second stage and operating point.

Run directory:
    run.json                 config fingerprint and manifest hash the run belongs to
    config.yaml              the validated config
    dataset.json             split sizes and finding counts per split
    dataset/manifest.csv     the manifest with every split resolved and absolute paths
                             (evaluate its test split with `scxnn-train evaluate`)
    cache/                   preprocessed PNGs (unless config.cache_dir points elsewhere)
    members/<finding>/       checkpoint.pt, metrics.csv, member.safetensors, done.json,
                             val_logits.npy
    second_stage.json, operating_point.json, validation_metrics.json

Members are independent: `fit --member X` trains one (on its own machine if the run directory
is shared or copied back); `fit` without --member trains whatever is missing and then the
second stage.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist
import yaml

from scxnn_node.model.bundle import utc_now_iso
from scxnn_node.model.second_stage import SvmSecondStage
from training.cache import CachedImage, build_cache
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
from training.member_training import (
    DONE_FILE,
    VAL_LOGITS_FILE,
    WEIGHTS_FILE,
    DistInfo,
    MemberTrainer,
    RunError,
    build_plans,
    member_logits_on,
    save_member,
)
from training.metrics import EvaluationInputs, triage_metrics
from training.second_stage_fit import choose_operating_point, fit_second_stage

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
SECOND_STAGE_FILE = "second_stage.json"
OPERATING_POINT_FILE = "operating_point.json"
VALIDATION_METRICS_FILE = "validation_metrics.json"
DATASET_FILE = "dataset.json"
RESOLVED_MANIFEST = "dataset/manifest.csv"


@dataclass(frozen=True)
class PreparedData:
    manifest: DatasetManifest  # every entry has its split
    cached: dict[int, CachedImage]

    def split(self, name: str) -> list[ManifestEntry]:
        return self.manifest.split(name)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


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
        (run / "config.yaml").write_text(
            yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
        )
        _write_json(run / DATASET_FILE, dataset_summary(manifest, config.findings))
        write_manifest(run / RESOLVED_MANIFEST, _resolved_rows(manifest), manifest.findings)
    cache_root = config.cache_dir or run / "cache"
    spec = config.preprocessing
    if dist_info.distributed and not dist_info.is_main:
        dist.barrier()  # rank 0 fills the cache first
    cached = build_cache(
        manifest, spec, cache_root, config.preprocess_workers, progress and dist_info.is_main
    )
    if dist_info.distributed and dist_info.is_main:
        dist.barrier()
    return PreparedData(manifest, cached)


def member_dir(run_dir: str | Path, finding: str) -> Path:
    return Path(run_dir) / "members" / finding


def member_done(run_dir: str | Path, finding: str) -> bool:
    d = member_dir(run_dir, finding)
    return (d / DONE_FILE).exists() and (d / WEIGHTS_FILE).exists()


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
    """Train one member and store its weights and validation logits in the run."""
    dist_info = dist_info or DistInfo()
    directory = member_dir(run_dir, finding)
    started = time.monotonic()
    plans = build_plans(config, finding, data.split("train"), data.split("val"), data.cached)
    trainer = MemberTrainer(config, finding, directory, dist_info, progress)
    member = trainer.train(plans, resume=resume, stop_after_epochs=stop_after_epochs)
    if not dist_info.is_main:
        return
    val = data.split("val")
    logits = member_logits_on(
        member, [data.cached[e.row] for e in val], config.training.batch_size * 2, trainer.device
    )
    np.save(directory / VAL_LOGITS_FILE, logits, allow_pickle=False)
    save_member(
        member,
        directory,
        {
            "finding": finding,
            "val_rows": [e.row for e in val],
            "train_images": {p.name: len(p.train) for p in plans},
            "seconds": round(time.monotonic() - started, 1),
            "finished": utc_now_iso(),
        },
    )
    log.info("member %s done in %.0f s", finding, time.monotonic() - started)


def fit_second_stage_for_run(
    config: TrainingConfig, data: PreparedData, run_dir: str | Path
) -> dict[str, Any]:
    """SVM on the members' validation logits, Neyman-Pearson threshold, validation metrics."""
    run = Path(run_dir)
    val = data.split("val")
    rows = [e.row for e in val]
    stacked = []
    for finding in config.catalogue.names:
        d = member_dir(run, finding)
        done = json.loads((d / DONE_FILE).read_text())
        if done["val_rows"] != rows:
            raise RunError(f"{d}: validation rows differ from this run's; retrain the member")
        stacked.append(np.load(d / VAL_LOGITS_FILE, allow_pickle=False))
    logits = np.stack(stacked, axis=1) if rows else np.zeros((0, len(stacked), 3), np.float32)
    abnormal = [e.abnormal for e in val]
    known = np.array([a is not None for a in abnormal], dtype=bool)
    y = np.array([a == 1 for a in abnormal], dtype=int)
    if known.sum() == 0 or len(np.unique(y[known])) < 2:
        raise RunError(
            "the validation split needs normal and abnormal images for the second stage "
            f"(it has {int((y[known] == 1).sum())} abnormal, {int((y[known] == 0).sum())} normal)"
        )
    sc = config.second_stage
    class_weight = None if sc.class_weight == "none" else sc.class_weight
    stage = fit_second_stage(logits[known], y[known], sc.kernel, sc.c, class_weight)
    scores = stage.decision_function(logits.reshape(len(logits), -1))
    op = choose_operating_point(scores[known], y[known], sc.target_sensitivity, sc.confidence)
    metrics = triage_metrics(
        EvaluationInputs(
            findings=config.catalogue,
            logits=logits,
            scores=scores,
            threshold=op.threshold,
            labels=[e.labels for e in val],
            abnormal=abnormal,
            other_disease=[e.other_disease for e in val],
        )
    )
    _write_json(run / SECOND_STAGE_FILE, stage.to_dict())
    _write_json(run / OPERATING_POINT_FILE, op.to_dict())
    _write_json(run / VALIDATION_METRICS_FILE, metrics)
    log.info(
        "second stage: %d validation images; at threshold %.4f sensitivity %.3f specificity %.3f",
        int(known.sum()),
        op.threshold,
        op.validation["sensitivity"],
        op.validation["specificity"],
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
) -> dict[str, Any] | None:
    """Train `member` only, or every member not yet done and then the second stage (whose
    validation metrics are returned)."""
    dist_info = dist_info or DistInfo()
    if member is not None and member not in config.findings:
        raise RunError(f"--member {member!r} is not one of the config's findings {config.findings}")
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
