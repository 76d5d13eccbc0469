"""Evaluate a bundle on a labelled manifest: the thesis's tables, figures and a report.

Two levels. Per image, as the thesis's tables count: every row through the bundle's
preprocessing, the members and the second stage at the operating point. Per study, as the node
decides: rows grouped by `study_id` (a study per image without one) and triaged by the node's
own path (selection, preprocessing, engine, study aggregation, safety net; see
training/study_triage.py) on the requested device and precision. Both carry 95 % Clopper-
Pearson intervals, Table 3 included. Those assume independent cases, which several images or
studies of one patient are not; the study level is therefore given again on one study per
patient and class (training/one_study_per_patient.py), the intervals to quote.

A manifest that shares a patient or an image's content with the bundle's training data
(training/provenance.py) is refused: numbers on seen data claim nothing.

Writes metrics.json, report.md, predictions.csv, study_predictions.csv, roc.png and
confusion.png, reliability.png (member calibration after temperature scaling).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import roc_curve
from tqdm import tqdm

from scxnn_node.imaging.selection import SelectionPolicy
from scxnn_node.model.bundle import Bundle, load_bundle
from scxnn_node.model.decision import softmax
from scxnn_node.model.engine import InferenceEngine
from scxnn_node.model.options import EngineOptions
from scxnn_node.model.result import MEMBER_CLASSES, TARGET, MemberCall, StudyResult
from training.cache import build_cache
from training.dataset import SPLITS, DatasetManifest, ManifestError, load_manifest
from training.metrics import EvaluationInputs, StudyCall, study_metrics, triage_metrics
from training.one_study_per_patient import one_study_per_patient
from training.provenance import PROVENANCE_FILE, bundle_provenance
from training.reliability_figure import write_reliability_diagram
from training.studies import Study, group_studies
from training.study_triage import triage_studies
from training.temperature import expected_calibration_error, member_reliability

log = logging.getLogger(__name__)

INDEPENDENT_STUDIES_SEED = 0  # which study of a patient's counts in the independent figures


def select_split(manifest: DatasetManifest, split: str) -> tuple[DatasetManifest, str]:
    """`auto`: the test split when the manifest has one, else every row; `all`; or a split."""
    if split == "auto":
        split = "test" if manifest.split("test") else "all"
    if split == "all":
        return manifest, split
    if split not in SPLITS:
        raise ValueError(f"split must be auto, all or one of {SPLITS}, got {split!r}")
    entries = tuple(e for e in manifest.entries if e.split == split)
    if not entries:
        raise ManifestError(manifest.path, [f"no rows in split {split!r}"])
    return replace(manifest, entries=entries), split


def refuse_seen_data(bundle: Bundle, manifest: DatasetManifest) -> bool:
    """Raise ManifestError naming every row whose patient or image content the bundle was
    trained or calibrated on. False (with a warning) for a bundle that keeps no provenance."""
    provenance = bundle_provenance(bundle)
    if provenance is None:
        log.warning(
            "bundle %s has no training provenance (%s): cannot check that the evaluation data "
            "are unseen",
            bundle.path,
            PROVENANCE_FILE,
        )
        return False
    problems = provenance.overlap(manifest.entries)
    if problems:
        raise ManifestError(manifest.path, problems)
    return True


def study_call(study: Study, result: StudyResult) -> StudyCall:
    targets = {f.name for f in result.findings if f.call is MemberCall.TARGET}
    return StudyCall(
        labels=study.labels,
        abnormal=study.abnormal,
        verdict=result.verdict,
        target_findings=frozenset(targets | set(result.safety_net_fired)),
    )


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(ci: list[float] | None) -> str:
    return "n/a" if ci is None else f"{ci[0]:.3f}-{ci[1]:.3f}"


def _proportion(p: dict[str, Any]) -> str:
    return f"{p['successes']}/{p['n']} = {_fmt(p['value'])} (95% CI {_ci(p['ci95'])})"


def _tier_lines(per_tier: dict[str, dict[str, int]], intervals: dict[str, Any]) -> list[str]:
    # Image-level tiers have no not_analysed row: every image is analysed there.
    first = next(iter(per_tier.values()), {})
    rows = [r for r in ("normal", "target", "others", "not_analysed") if r in first]
    lines = [
        "| AI \\ tier | " + " | ".join(per_tier) + " |",
        "| --- |" + " ---: |" * len(per_tier),
    ]
    for row in (*rows, "n"):
        cells = " | ".join(str(t[row]) for t in per_tier.values())
        lines.append(f"| {row if row != 'n' else 'total'} | {cells} |")
    for key, label in (("sensitivity", "not called normal"), ("target", "own member: target")):
        cells = " | ".join(_proportion(intervals[t][key]) for t in per_tier)
        lines.append(f"| {label} | {cells} |")
    return lines


def _study_lines(study: dict[str, Any], engine: dict[str, str]) -> list[str]:
    c = study["confusion"]
    return [
        "",
        "## Studies, as the node triages them",
        "",
        f"{study['n_studies']} studies ({study['n_with_known_status']} with a known status), "
        f"each through the node's own path on {engine['device']} at precision "
        f"{engine['precision']}: selection, preprocessing, the members, the second stage, the "
        f"safety net. {study['n_not_analysed']} not analysed (no usable frontal chest image): "
        "they go to the radiologist like any other study, so they count as found when abnormal "
        "and as not spared when normal.",
        "",
        "| node \\ reference | normal | abnormal |",
        "| --- | ---: | ---: |",
        f"| definite normal | {c['ai_normal']['normal']} | {c['ai_normal']['abnormal']} |",
        f"| abnormal | {c['ai_abnormal']['normal']} | {c['ai_abnormal']['abnormal']} |",
        f"| not analysed | {c['not_analysed']['normal']} | {c['not_analysed']['abnormal']} |",
        "",
        f"Sensitivity {_proportion(study['sensitivity_detail'])}, specificity "
        f"{_proportion(study['specificity_detail'])}.",
        "",
        "Risk tiers per study (Table 3):",
        "",
        *_tier_lines(study["per_tier"], study["per_tier_intervals"]),
    ]


def write_report(path: Path, metrics: dict[str, Any]) -> None:
    c = metrics["confusion"]
    checked = metrics["training_overlap_checked"]
    lines = [
        f"# Evaluation of {metrics['bundle']['name']} {metrics['bundle']['version']}",
        "",
        f"Manifest `{metrics['manifest']}` (sha256 {metrics['manifest_sha256'][:12]}), split "
        f"`{metrics['split']}`: {metrics['n_images']} images, {metrics['n_with_known_status']} "
        f"with a known normal/abnormal status. Operating threshold {metrics['threshold']:.4f}.",
        "",
        "No patient and no image content of the evaluation data is among the bundle's training "
        "data (checked against its salted provenance record)."
        if checked
        else "**Overlap with the bundle's training data not checked: the bundle keeps no "
        "training provenance.**",
    ]
    if metrics["bundle"]["demo"]:
        lines += ["", "**Demo bundle: these numbers claim nothing.**"]
    calibrated = metrics["bundle"].get("precision")
    if calibrated and calibrated != metrics["engine"]["precision"]:
        lines += [
            "",
            f"**The bundle's thresholds were set at {calibrated} precision; this evaluation ran "
            f"at {metrics['engine']['precision']}, so its guarantee does not carry over.**",
        ]
    if "study" in metrics:
        lines += _study_lines(metrics["study"], metrics["engine"])
    if "study_one_per_patient" in metrics:
        one = metrics["study_one_per_patient"]
        lines += [
            "",
            f"One study per patient and class ({one['n_studies']} studies, drawn with seed "
            f"{INDEPENDENT_STUDIES_SEED}): a patient's studies are not independent cases, so "
            "these are the intervals to quote, the ones above are too narrow when patients "
            f"have several studies. Sensitivity {_proportion(one['sensitivity_detail'])}, "
            f"specificity {_proportion(one['specificity_detail'])}.",
        ]
    lines += [
        "",
        "## Images: normal / abnormal (thesis Table 2)",
        "",
        "| AI \\ reference | normal | abnormal |",
        "| --- | ---: | ---: |",
        f"| normal | {c['ai_normal']['normal']} | {c['ai_normal']['abnormal']} |",
        f"| abnormal | {c['ai_abnormal']['normal']} | {c['ai_abnormal']['abnormal']} |",
        "",
        f"Sensitivity {_fmt(metrics['sensitivity'])} (95% CI {_ci(metrics['sensitivity_ci'])}), "
        f"specificity {_fmt(metrics['specificity'])} (95% CI {_ci(metrics['specificity_ci'])}), "
        f"AUC {_fmt(metrics['auc'])}.",
        "",
        "## Images: risk tiers (thesis Table 3)",
        "",
        "Images showing a finding of each tier, by the AI's call: normal (missed), target (a "
        "member of one of the image's findings of that tier said target), others (abnormal for "
        "another reason); then each tier's share not called normal and share named by its own "
        "member, with 95% CI.",
        "",
        *_tier_lines(metrics["per_tier"], metrics["per_tier_intervals"]),
    ]
    lines += [
        "",
        "## Per finding",
        "",
        "| finding | tier | positives | negatives | AUC | sensitivity (95% CI) | "
        "specificity (95% CI) |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for name, f in metrics["per_finding"].items():
        lines.append(
            f"| {name} | {f['tier']} | {f['n_positive']} | {f['n_negative']} | {_fmt(f['auc'])} "
            f"| {_fmt(f['sensitivity'])} ({_ci(f['sensitivity_ci'])}) | "
            f"{_fmt(f['specificity'])} ({_ci(f['specificity_ci'])}) |"
        )
    outside = metrics["outside_catalogue"]
    lines += ["", "## Diseases outside the catalogue (thesis Table 9)", ""]
    if not outside:
        lines.append("The manifest names no disease outside the catalogue (column other_disease).")
    for disease, d in outside.items():
        lines += [
            f"**{disease}**: {d['n']} images, {d['called_abnormal']} called abnormal.",
            "",
            "| member | normal | target | others |",
            "| --- | ---: | ---: | ---: |",
        ]
        for member, shares in d["members"].items():
            lines.append(
                f"| {member} | {shares['normal']:.3f} | {shares['target']:.3f} | "
                f"{shares['others']:.3f} |"
            )
        lines.append("")
    lines += ["", "Figures: `roc.png`, `confusion.png`, `reliability.png`.", ""]
    path.write_text("\n".join(lines))


def write_figures(
    out: Path,
    metrics: dict[str, Any],
    inputs: EvaluationInputs,
) -> None:
    known = np.array([a is not None for a in inputs.abnormal])
    truth = np.array([a == 1 for a in inputs.abnormal])[known].astype(int)
    scores = np.asarray(inputs.scores)[known]
    fig, ax = plt.subplots(figsize=(6, 6))
    if len(np.unique(truth)) == 2:
        fpr, tpr, _ = roc_curve(truth, scores)
        ax.plot(fpr, tpr, lw=2, label=f"normal vs abnormal (AUC {metrics['auc']:.3f})")
        ax.plot(
            1 - metrics["specificity"],
            metrics["sensitivity"],
            "o",
            color="red",
            label="operating point",
        )
    probs = softmax(inputs.logits.astype(np.float64))
    for m, finding in enumerate(inputs.findings):
        values = [lab.get(finding.name) for lab in inputs.labels]
        rows = np.array([v is not None for v in values])
        y = np.array([v == 1 for v in values])[rows].astype(int)
        if rows.any() and len(np.unique(y)) == 2:
            fpr, tpr, _ = roc_curve(y, probs[rows, m, TARGET])
            auc = metrics["per_finding"][finding.name]["auc"]
            ax.plot(fpr, tpr, lw=1, alpha=0.7, label=f"{finding.name} ({auc:.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "roc.png", dpi=120)
    plt.close(fig)

    c = metrics["confusion"]
    matrix = np.array(
        [
            [c["ai_normal"]["normal"], c["ai_normal"]["abnormal"]],
            [c["ai_abnormal"]["normal"], c["ai_abnormal"]["abnormal"]],
        ]
    )
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.imshow(matrix, cmap="Blues")
    for (i, j), v in np.ndenumerate(matrix):
        colour = "white" if v > matrix.max() / 2 else "black"
        ax.text(j, i, str(v), ha="center", va="center", color=colour, fontsize=14)
    ax.set_xticks([0, 1], ["normal", "abnormal"])
    ax.set_yticks([0, 1], ["normal", "abnormal"])
    ax.set(xlabel="reference standard", ylabel="AI", title="Normal / abnormal")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=120)
    plt.close(fig)


def write_study_predictions(
    path: Path, studies: list[Study], results: list[StudyResult]
) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "study_id",
                "patient_id",
                "images",
                "analysed",
                "abnormal",
                "verdict",
                "risk_tier",
                "score",
                "reason",
            ]
        )
        for study, result in zip(studies, results, strict=True):
            writer.writerow(
                [
                    study.study_id,
                    study.entries[0].patient_id,
                    len(study.entries),
                    len(result.analysed_instances),
                    "" if study.abnormal is None else study.abnormal,
                    result.verdict.value,
                    result.risk_tier or "",
                    "" if result.abnormality_score is None else f"{result.abnormality_score:.6f}",
                    result.reason or "",
                ]
            )


def evaluate_bundle(
    bundle_dir: str | Path,
    manifest_path: str | Path,
    out_dir: str | Path,
    split: str = "auto",
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    workers: int = 1,
    progress: bool = True,
    precision: str = "auto",
    policy: SelectionPolicy | None = None,
) -> dict[str, Any]:
    """Evaluate per image and per study; `policy` is the node's selection policy (default:
    frontal chest views). Raises ManifestError before any inference when the manifest shares
    patients or images with the bundle's training data."""
    out = Path(out_dir)
    bundle = load_bundle(bundle_dir)
    manifest, used = select_split(load_manifest(manifest_path), split)
    checked = refuse_seen_data(bundle, manifest)
    out.mkdir(parents=True, exist_ok=True)
    spec = bundle.manifest.preprocessing
    cached = build_cache(manifest, spec, cache_dir or out / "cache", workers, progress)
    engine = InferenceEngine(bundle, EngineOptions(device=device, precision=precision))
    entries = list(manifest.entries)
    batch = max(engine.batch_size, 1)
    logits = np.zeros((len(entries), len(bundle.manifest.findings), 3), np.float32)
    for start in tqdm(
        range(0, len(entries), batch), desc="evaluate", unit="batch", disable=not progress
    ):
        chunk = entries[start : start + batch]
        images = np.stack([cached[e.row].load_image() for e in chunk])
        logits[start : start + len(chunk)] = engine.member_logits(images)
    scores = engine.scores(logits)
    inputs = EvaluationInputs(
        findings=bundle.manifest.findings,
        logits=logits,
        scores=scores,
        threshold=float(bundle.manifest.operating_point.threshold),
        labels=[e.labels for e in entries],
        abnormal=[e.abnormal for e in entries],
        other_disease=[e.other_disease for e in entries],
    )
    metrics = triage_metrics(inputs)
    studies = group_studies(entries)
    results = triage_studies(engine, studies, cached, policy, progress)
    calls = [study_call(st, r) for st, r in zip(studies, results, strict=True)]
    independent = one_study_per_patient(
        [st.entries[0].patient_id for st in studies],
        [st.abnormal for st in studies],
        INDEPENDENT_STUDIES_SEED,
    )
    metrics.update(
        level="image",
        study=study_metrics(bundle.manifest.findings, calls),
        study_one_per_patient=study_metrics(
            bundle.manifest.findings,
            [c for c, keep in zip(calls, independent, strict=True) if keep],
        ),
        engine={"device": device, "precision": engine.precision},  # as resolved ("auto")
        bundle={
            "name": bundle.manifest.name,
            "version": bundle.manifest.version,
            "demo": bundle.manifest.demo,
            "precision": bundle.manifest.precision,  # where its thresholds were set
        },
        manifest=str(manifest.path),
        manifest_sha256=manifest.sha256,
        split=used,
        training_overlap_checked=checked,
    )
    reliability = member_reliability(bundle, entries, logits)
    metrics["calibration_error"] = {
        name: expected_calibration_error(bins) for name, bins in reliability.items()
    }
    write_study_predictions(out / "study_predictions.csv", studies, results)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    with open(out / "predictions.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        names = bundle.manifest.findings.names
        writer.writerow(
            ["row", "image", "patient_id", "abnormal", "score", "ai_abnormal", *names, "study_id"]
        )
        calls = logits.argmax(-1)
        for i, e in enumerate(entries):
            writer.writerow(
                [
                    e.row,
                    e.image,
                    e.patient_id,
                    "" if e.abnormal is None else e.abnormal,
                    f"{scores[i]:.6f}",
                    int(scores[i] >= inputs.threshold),
                    *(MEMBER_CLASSES[k] for k in calls[i]),
                    e.study_key,
                ]
            )
    write_figures(out, metrics, inputs)
    if reliability:
        write_reliability_diagram(reliability, out / "reliability.png", "Member reliability")
    write_report(out / "report.md", metrics)
    log.info(
        "evaluated %d images, %d studies (%s split): per study sensitivity %s specificity %s",
        len(entries),
        len(studies),
        used,
        _fmt(metrics["study"]["sensitivity"]),
        _fmt(metrics["study"]["specificity"]),
    )
    return metrics
