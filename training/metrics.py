"""The thesis's evaluation tables as plain computations on logits, scores and labels.

Table 2: normal/abnormal confusion of the second stage at the operating point.
Table 3: per risk tier, the abnormal images that show a finding of that tier, split by what
         the AI said: normal (a miss), target (a member of one of the image's findings of that
         tier said target), others (called abnormal for another reason).
Table 9: per disease outside the catalogue, each member's share of normal/target/others calls.
Per finding: AUC of the member's target probability, sensitivity and specificity of its target
call. Every proportion carries a 95 % Clopper-Pearson interval, Table 3's too (the share of
each tier not called normal, and the share its own member named).

Per study (`study_metrics`): the node's verdicts, as the node gives them, against each study's
reference standard. A study the node did not analyse is not called normal: it goes to the
radiologist like any other, so it counts as found when abnormal and as not spared when normal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import beta
from sklearn.metrics import roc_auc_score

from scxnn_node.findings import FindingCatalogue, RiskTier
from scxnn_node.model.decision import softmax
from scxnn_node.model.result import MEMBER_CLASSES, TARGET, Verdict


def clopper_pearson(successes: int, n: int, confidence: float = 0.95) -> list[float] | None:
    """Exact binomial interval for successes/n; None when n is 0."""
    if n == 0:
        return None
    alpha = 1.0 - confidence
    lo = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, n - successes + 1))
    hi = 1.0 if successes == n else float(beta.ppf(1 - alpha / 2, successes + 1, n - successes))
    return [lo, hi]


def proportion(successes: int, n: int) -> dict[str, Any]:
    return {
        "value": successes / n if n else None,
        "successes": int(successes),
        "n": int(n),
        "ci95": clopper_pearson(int(successes), int(n)),
    }


def safe_auc(truth: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC, or None when only one class is present."""
    if len(np.unique(truth)) < 2:
        return None
    return float(roc_auc_score(truth, score))


def tier_intervals(per_tier: dict[str, dict[str, int]]) -> dict[str, dict[str, Any]]:
    """Table 3 as proportions with intervals: per tier, the share of its studies (or images)
    not called normal (its sensitivity) and the share its own member called target."""
    return {
        tier: {
            "sensitivity": proportion(c["n"] - c["normal"], c["n"]),
            "target": proportion(c["target"], c["n"]),
        }
        for tier, c in per_tier.items()
    }


@dataclass(frozen=True)
class EvaluationInputs:
    findings: FindingCatalogue  # the bundle's members, in order
    logits: np.ndarray  # (N, n_members, 3)
    scores: np.ndarray  # (N,) second-stage scores
    threshold: float
    labels: Sequence[dict[str, int | None]]  # per image, the manifest's finding labels
    abnormal: Sequence[int | None]  # per image: 1, 0 or None (unknown)
    other_disease: Sequence[str]  # per image: a disease outside the catalogue, or ""

    def __post_init__(self) -> None:
        n = len(self.scores)
        if self.logits.shape != (n, len(self.findings), 3):
            raise ValueError(
                f"logits must be ({n}, {len(self.findings)}, 3), got {self.logits.shape}"
            )
        if not len(self.labels) == len(self.abnormal) == len(self.other_disease) == n:
            raise ValueError("labels, abnormal and other_disease need one value per image")


def triage_metrics(inputs: EvaluationInputs) -> dict[str, Any]:
    """Everything metrics.json reports, computed from `inputs`."""
    scores = np.asarray(inputs.scores, dtype=np.float64)
    predicted = scores >= inputs.threshold
    calls = inputs.logits.argmax(axis=-1)  # (N, M)
    probs = softmax(inputs.logits.astype(np.float64))
    known = np.array([a is not None for a in inputs.abnormal])
    truth = np.array([a == 1 for a in inputs.abnormal])
    tp = int((known & truth & predicted).sum())
    fn = int((known & truth & ~predicted).sum())
    tn = int((known & ~truth & ~predicted).sum())
    fp = int((known & ~truth & predicted).sum())
    out: dict[str, Any] = {
        "n_images": len(scores),
        "n_with_known_status": int(known.sum()),
        "threshold": float(inputs.threshold),
        "confusion": {  # Table 2: rows are the AI's call, columns the reference standard
            "ai_normal": {"normal": tn, "abnormal": fn},
            "ai_abnormal": {"normal": fp, "abnormal": tp},
        },
    }
    sens, spec = proportion(tp, tp + fn), proportion(tn, tn + fp)
    out["sensitivity"], out["sensitivity_ci"] = sens["value"], sens["ci95"]
    out["specificity"], out["specificity_ci"] = spec["value"], spec["ci95"]
    out["sensitivity_detail"], out["specificity_detail"] = sens, spec
    out["accuracy"] = (tp + tn) / known.sum() if known.sum() else None
    out["auc"] = safe_auc(truth[known].astype(int), scores[known])

    per_tier: dict[str, dict[str, int]] = {}
    for tier in RiskTier:
        members = [m for m, f in enumerate(inputs.findings) if f.tier == tier]
        if not members:
            continue
        counts = {"n": 0, "normal": 0, "target": 0, "others": 0}
        for i, labels in enumerate(inputs.labels):
            present = [m for m in members if labels.get(inputs.findings[m].name) == 1]
            if not present:
                continue
            counts["n"] += 1
            if not predicted[i]:
                counts["normal"] += 1
            elif any(calls[i, m] == TARGET for m in present):
                counts["target"] += 1
            else:
                counts["others"] += 1
        per_tier[tier.value] = counts
    out["per_tier"] = per_tier
    out["per_tier_intervals"] = tier_intervals(per_tier)

    per_finding: dict[str, Any] = {}
    for m, finding in enumerate(inputs.findings):
        values = [labels.get(finding.name) for labels in inputs.labels]
        rows = np.array([v is not None for v in values])
        if not rows.any():
            continue
        y = np.array([v == 1 for v in values])[rows]
        said = (calls[:, m] == TARGET)[rows]
        s = proportion(int((y & said).sum()), int(y.sum()))
        c = proportion(int((~y & ~said).sum()), int((~y).sum()))
        per_finding[finding.name] = {
            "tier": finding.tier.value,
            "n_positive": int(y.sum()),
            "n_negative": int((~y).sum()),
            "auc": safe_auc(y.astype(int), probs[rows, m, TARGET]),
            "sensitivity": s["value"],
            "sensitivity_ci": s["ci95"],
            "specificity": c["value"],
            "specificity_ci": c["ci95"],
        }
    out["per_finding"] = per_finding

    outside: dict[str, Any] = {}
    for disease in sorted({d for d in inputs.other_disease if d}):
        rows = np.array([d == disease for d in inputs.other_disease])
        outside[disease] = {
            "n": int(rows.sum()),
            "called_abnormal": int(predicted[rows].sum()),
            "members": {
                f.name: {
                    c: float((calls[rows, m] == k).mean()) for k, c in enumerate(MEMBER_CLASSES)
                }
                for m, f in enumerate(inputs.findings)
            },
        }
    out["outside_catalogue"] = outside
    return out


@dataclass(frozen=True)
class StudyCall:
    """One study: its reference standard (merged over its images) and the node's verdict."""

    labels: dict[str, int | None]  # per finding: 1 if any image shows it, 0 if none does
    abnormal: int | None  # 1, 0 or None (unknown)
    verdict: Verdict
    target_findings: frozenset[str]  # called target, or fired by the critical safety net


def study_metrics(findings: FindingCatalogue, calls: Sequence[StudyCall]) -> dict[str, Any]:
    """The study-level section of metrics.json: Table 2 and Table 3 on the node's verdicts."""
    called_normal = np.array([c.verdict is Verdict.DEFINITE_NORMAL for c in calls], dtype=bool)
    skipped = np.array([c.verdict is Verdict.NOT_ANALYSED for c in calls], dtype=bool)
    flagged = ~called_normal & ~skipped
    known = np.array([c.abnormal is not None for c in calls], dtype=bool)
    truth = np.array([c.abnormal == 1 for c in calls], dtype=bool)
    abnormal, normal = known & truth, known & ~truth

    def count(mask: np.ndarray) -> int:
        return int(mask.sum())

    def by_reference(call: np.ndarray) -> dict[str, int]:
        return {"normal": count(normal & call), "abnormal": count(abnormal & call)}

    sens = proportion(count(abnormal & ~called_normal), count(abnormal))
    spec = proportion(count(normal & called_normal), count(normal))
    per_tier: dict[str, dict[str, int]] = {}
    for tier in RiskTier:
        names = [f.name for f in findings if f.tier == tier]
        if not names:
            continue
        counts = {"n": 0, "normal": 0, "target": 0, "others": 0, "not_analysed": 0}
        for c in calls:
            present = [n for n in names if c.labels.get(n) == 1]
            if not present:
                continue
            counts["n"] += 1
            if c.verdict is Verdict.DEFINITE_NORMAL:
                counts["normal"] += 1
            elif c.verdict is Verdict.NOT_ANALYSED:
                counts["not_analysed"] += 1
            elif c.target_findings.intersection(present):
                counts["target"] += 1
            else:
                counts["others"] += 1
        per_tier[tier.value] = counts
    return {
        "level": "study",
        "n_studies": len(calls),
        "n_with_known_status": count(known),
        "n_not_analysed": count(skipped),
        "confusion": {  # rows are the node's verdict, columns the reference standard
            "ai_normal": by_reference(called_normal),
            "ai_abnormal": by_reference(flagged),
            "not_analysed": by_reference(skipped),
        },
        "sensitivity": sens["value"],
        "sensitivity_ci": sens["ci95"],
        "specificity": spec["value"],
        "specificity_ci": spec["ci95"],
        "sensitivity_detail": sens,
        "specificity_detail": spec,
        "per_tier": per_tier,
        "per_tier_intervals": tier_intervals(per_tier),
    }
