"""MODEL_CARD.md of a bundle: what it is for, what it was trained and calibrated on, the
guarantee it achieved and what it does not claim, written from the run's own records."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from scxnn_node.findings import RiskTier
from scxnn_node.model.manifest import NOT_FOR_CLINICAL_USE, Manifest
from scxnn_node.model.safety_net import CriticalSafetyNet, CriticalThreshold


def guarantee_shortfalls(operating_point: Mapping[str, Any], net: CriticalSafetyNet) -> list[str]:
    """One line per part of the definite-normal guarantee a run did not achieve."""
    v = operating_point.get("validation", {})
    out = []
    if v.get("threshold_set_on") != "calibration":
        out.append("second stage: its threshold was not set on held-out calibration patients")
    if not v.get("guarantee_met"):
        out.append(
            f"second stage: {v.get('n_abnormal', 0)} abnormal calibration "
            f"{_plural(v.get('threshold_unit', 'image'))}; a miss rate <= "
            f"{v.get('miss_rate_target')} at {v.get('confidence')} confidence needs "
            f"{v.get('min_abnormal_for_guarantee')}"
        )
    for t in net.thresholds:
        if not isinstance(t, CriticalThreshold):
            out.append(
                f"safety net {t.finding}: {t.available} calibration positives, "
                f"{t.needed} needed for a miss rate <= {t.miss_rate_target} at "
                f"{t.confidence} confidence"
            )
    return out


def _plural(unit: str) -> str:
    return {"study": "studies", "image": "images"}.get(unit, unit + "s")


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _proportion(p: Mapping[str, Any]) -> str:
    ci = p.get("ci95")
    interval = "n/a" if ci is None else f"{ci[0]:.3f}-{ci[1]:.3f}"
    return f"{_p(p.get('value'))} ({p['successes']}/{p['n']}; 95% CI {interval})"


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def render_model_card(
    manifest: Manifest,
    dataset: Mapping[str, Any],
    calibration: Mapping[str, Any],
    net: CriticalSafetyNet,
    shortfalls: Sequence[str],
) -> str:
    """The card as Markdown. `dataset` is the run's dataset.json, `calibration` its
    calibration.json; `shortfalls` come from guarantee_shortfalls."""
    op = manifest.operating_point
    v = op.validation
    split = calibration["split"]
    cal = split["calibration"]
    lines = [f"# Model card: {manifest.name} {manifest.version}", ""]
    if manifest.demo:
        lines += [f"**{NOT_FOR_CLINICAL_USE}.** {manifest.intended_use}", ""]
    lines += [
        "## Intended use",
        "",
        manifest.intended_use,
        "",
        "Input: frontal chest radiographs, preprocessed by the bundle's own parameters "
        f"({manifest.preprocessing.size} px). Output per study: definite normal or abnormal, "
        "the highest risk tier of the findings its members call, per-finding probabilities.",
        "",
        "## Findings",
        "",
        *_table(
            ("finding", "risk tier"), [(f.name, f.tier.value) for f in manifest.findings]
        ),
        "",
        "## Training data",
        "",
        f"Manifest sha256 `{manifest.training_data.manifest_sha256}`. Images (patients) per "
        "split, and positives per finding:",
        "",
    ]
    splits = dataset["splits"]
    names = [s for s in ("train", "val", "test") if s in splits]
    lines += _table(
        ("", *names),
        [
            ("images", *(splits[s]["images"] for s in names)),
            ("patients", *(splits[s]["patients"] for s in names)),
            ("abnormal", *(splits[s]["abnormal"] for s in names)),
            ("normal", *(splits[s]["normal"] for s in names)),
            *(
                (f.name, *(splits[s]["positives"].get(f.name, 0) for s in names))
                for f in manifest.findings
            ),
        ],
    )
    unit = calibration["threshold_unit"]
    studies = f", {cal['studies']} studies" if unit == "study" else ""
    lines += [
        "",
        f"The validation split is cut per patient (seed {split['seed']}): "
        f"{split['fit']['patients']} patients ({split['fit']['images']} images) fit the second "
        f"stage and the member temperatures; {cal['patients']} patients ({cal['images']} "
        f"images{studies}) calibrate its threshold and the critical safety net. No member "
        "trained on either, and the members chose their best epoch on the fit part only.",
        "",
        "## Calibration set",
        "",
        f"{cal['studies']} {_plural(unit)}: {cal['abnormal_studies']} "
        f"abnormal, {cal['normal_studies']} normal, {cal['unknown_studies']} of unknown status. "
        f"Scores at {calibration['precision']} precision, the precision the node serves "
        "this bundle at; a study's score is its highest image score. A patient's "
        f"{_plural(unit)} are not independent cases, so the threshold and the results below "
        f"count one {unit} per patient and class (the safety net one positive {unit} per "
        "patient and finding), drawn with the split's seed: "
        f"{cal.get('independent_abnormal_studies', '?')} abnormal, "
        f"{cal.get('independent_normal_studies', '?')} normal.",
        "",
        "## Guarantee achieved",
        "",
        f"Second stage: threshold {op.threshold:.4f} is order statistic k = "
        f"{v.get('order_statistic_k')} (1 = lowest) of {v.get('n_abnormal')} abnormal "
        f"calibration {unit} scores; with "
        f"{v.get('confidence', 0):.0%} confidence the miss rate is at most "
        f"{_p(v.get('miss_rate_upper_bound'))} (target {v.get('miss_rate_target')}): "
        + ("**met**." if v.get("guarantee_met") else "**NOT met**."),
        "",
        "Critical safety net (a study is definite normal only when the second stage says normal "
        "and no rule fires):",
        "",
    ]
    rows = []
    for t in net.thresholds:
        if isinstance(t, CriticalThreshold):
            rows.append(
                (t.finding, f"{t.threshold:.4f}", t.n_positive, _p(t.miss_rate_upper_bound), "met")
            )
        else:
            rule = "never fires" if t.threshold is None else f"{t.threshold:.4f}"
            rows.append(
                (
                    t.finding,
                    rule,
                    t.available,
                    _p(t.miss_rate_upper_bound),
                    f"NOT met: {t.available} of {t.needed} positives",
                )
            )
    lines += _table(
        ("finding", "threshold", "positives", "miss-rate bound", "guarantee"), rows
    ) if rows else ["No critical finding among the members."]
    results = calibration["results"]
    lines += [
        "",
        "## Results on the calibration set",
        "",
        f"One {unit} per patient and class, 95% Clopper-Pearson intervals. These are the "
        f"{_plural(unit)} the "
        "thresholds were set on, so they describe the calibration, not new patients: "
        "held-out test results come from `scxnn-train evaluate` on the run's test split.",
        "",
        f"- definite-normal verdict: sensitivity {_proportion(results['sensitivity'])}, "
        f"specificity {_proportion(results['specificity'])}",
        "- second stage alone: sensitivity "
        f"{_proportion(results['second_stage_alone']['sensitivity'])}, specificity "
        f"{_proportion(results['second_stage_alone']['specificity'])}",
        "",
        *_table(
            ("risk tier", "studies", "called normal", "sensitivity (95% CI)"),
            [
                (tier, r["studies"], r["called_normal"], _proportion(r["sensitivity"]))
                for tier, r in (
                    (t.value, results["per_tier"][t.value])
                    for t in RiskTier
                    if t.value in results["per_tier"]
                )
            ],
        ),
        "",
        "## Member temperatures",
        "",
        *_table(
            ("member", "temperature", "ECE before", "ECE after"),
            [
                (
                    name,
                    f"{t['temperature']:.3f}",
                    _p(t["calibration_ece_before"]),
                    _p(t["calibration_ece_after"]),
                )
                for name, t in (
                    (f.name, calibration["temperatures"][f.name]) for f in manifest.findings
                )
            ],
        ),
        "",
        "Expected calibration error of each member's top-class probability on the calibration "
        "set, before and after its temperature (fitted on the fit part).",
        "",
        "## Limitations",
        "",
        "- The guarantee bounds the miss rate on studies drawn like the calibration patients; a "
        "different population, device or protocol needs its own calibration.",
        "- The bound is per study at the recorded precision; a node serving another precision "
        "logs a warning and the bound is not measured for it.",
        "- Findings outside the catalogue are seen only as 'abnormal, unspecified'; the model "
        "claims nothing about them.",
        "- Weak (report-mined) labels in training carry their own errors.",
    ]
    lines += [f"- Guarantee shortfall: {s}" for s in shortfalls]
    return "\n".join(lines) + "\n"
