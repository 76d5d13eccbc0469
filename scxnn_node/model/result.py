"""Triage results: what the ensemble says about one study, validated at construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from scxnn_node.findings import RiskTier

#: Class order of every member's head.
MEMBER_CLASSES = ("normal", "target", "others")
#: Index of each class in a member's logits.
NORMAL, TARGET, OTHERS = range(len(MEMBER_CLASSES))

#: risk_tier value for an abnormal study whose members name no finding of the catalogue.
UNSPECIFIED_TIER = "unspecified"


class Verdict(StrEnum):
    DEFINITE_NORMAL = "definite_normal"
    ABNORMAL = "abnormal"
    NOT_ANALYSED = "not_analysed"


class MemberCall(StrEnum):
    NORMAL = "normal"
    TARGET = "target"
    OTHERS = "others"


class ReportedCall(StrEnum):
    """What every output (JSON, SR, summary image) says of one finding of an analysed study:
    the member's call, overruled where it would contradict the study's verdict."""

    NORMAL = "normal"
    TARGET = "target"  # present: only ever in an abnormal study
    OTHERS = "others"
    # Definite normal: the member said target or others, but the study as a whole is below the
    # operating point (and no safety-net rule fired), so nothing is reported present.
    BELOW_OPERATING_POINT = "below_operating_point"
    # Abnormal: the critical safety net flagged the finding although its member did not say
    # target.
    SAFETY_NET = "safety_net"


@dataclass(frozen=True)
class BundleIdentity:
    name: str
    version: str
    demo: bool

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "demo": self.demo}


@dataclass(frozen=True)
class FindingResult:
    """One member's call on a study, with its three class probabilities."""

    name: str
    tier: RiskTier
    call: MemberCall
    probabilities: dict[str, float]

    def __post_init__(self) -> None:
        if set(self.probabilities) != set(MEMBER_CLASSES):
            raise ValueError(
                f"FindingResult.probabilities of {self.name!r} must have keys {MEMBER_CLASSES}"
            )
        total = sum(self.probabilities.values())
        if not math.isclose(total, 1.0, abs_tol=1e-3):
            raise ValueError(
                f"FindingResult.probabilities of {self.name!r} must sum to 1, got {total:.4f}"
            )

    def to_dict(self, reported: ReportedCall | None = None) -> dict[str, Any]:
        """`reported`: the call its study reports (StudyResult.reported_call); the member's
        own call when None."""
        return {
            "name": self.name,
            "tier": self.tier.value,
            "call": (reported or self.call).value,
            "probabilities": {k: round(float(self.probabilities[k]), 6) for k in MEMBER_CLASSES},
        }


@dataclass(frozen=True)
class StudyResult:
    """The triage of one study. `reason` explains not_analysed, or notes doubts (unknown view).

    It owns the rule every output follows: a finding is reported present (flagged) only in an
    abnormal study (`reported_call`, `flagged_findings`)."""

    study_instance_uid: str
    verdict: Verdict
    reason: str | None
    risk_tier: str | None
    abnormality_score: float | None
    threshold: float | None
    findings: tuple[FindingResult, ...]
    bundle: BundleIdentity
    analysed_instances: tuple[str, ...] = ()
    # Critical findings whose safety-net rule fired (each makes the study abnormal).
    safety_net_fired: tuple[str, ...] = ()
    # Instances of the study whose files retention purged before this analysis: the result
    # is of the others (a late instance amending a study reported long ago).
    purged_instances: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.verdict is Verdict.NOT_ANALYSED:
            if not self.reason:
                raise ValueError("StudyResult.reason is required when the verdict is not_analysed")
            if self.findings or self.abnormality_score is not None:
                raise ValueError("StudyResult of a not_analysed study carries no findings or score")
        else:
            if self.abnormality_score is None or self.threshold is None:
                raise ValueError(
                    "StudyResult.abnormality_score and threshold are required for an analysed study"
                )
            if not self.findings:
                raise ValueError("StudyResult.findings is required for an analysed study")
        allowed_tiers = {t.value for t in RiskTier} | {UNSPECIFIED_TIER}
        if self.risk_tier is not None and self.risk_tier not in allowed_tiers:
            raise ValueError(
                f"StudyResult.risk_tier must be one of {sorted(allowed_tiers)} or None"
            )
        if self.verdict is not Verdict.ABNORMAL and self.risk_tier is not None:
            raise ValueError("StudyResult.risk_tier is only set for an abnormal verdict")
        if self.safety_net_fired and self.verdict is not Verdict.ABNORMAL:
            raise ValueError("StudyResult.safety_net_fired makes the verdict abnormal")

    def reported_call(self, finding: FindingResult) -> ReportedCall:
        """What the outputs say of `finding`, consistent with the verdict: in a definite-normal
        study no finding is present (a member's target or others call is below the operating
        point); in an abnormal one a finding the safety net fired on is flagged."""
        if self.verdict is Verdict.DEFINITE_NORMAL and finding.call is not MemberCall.NORMAL:
            return ReportedCall.BELOW_OPERATING_POINT
        if (
            self.verdict is Verdict.ABNORMAL
            and finding.call is not MemberCall.TARGET
            and finding.name in self.safety_net_fired
        ):
            return ReportedCall.SAFETY_NET
        return ReportedCall(finding.call.value)

    @property
    def flagged_findings(self) -> list[FindingResult]:
        """Findings reported present or flagged by the safety net, most urgent tier first, then
        most probable; empty unless the study is abnormal."""
        flagged = (ReportedCall.TARGET, ReportedCall.SAFETY_NET)
        hits = [f for f in self.findings if self.reported_call(f) in flagged]
        return sorted(hits, key=lambda f: (f.tier.rank, -f.probabilities["target"]))

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape `scxnn-node infer --json` prints, key for key."""
        return {
            "study_instance_uid": self.study_instance_uid,
            "verdict": self.verdict.value,
            "reason": self.reason,
            "risk_tier": self.risk_tier,
            "abnormality_score": (
                None if self.abnormality_score is None else round(self.abnormality_score, 6)
            ),
            "threshold": None if self.threshold is None else round(self.threshold, 6),
            "findings": [f.to_dict(self.reported_call(f)) for f in self.findings],
            "bundle": self.bundle.to_dict(),
            "safety_net_fired": list(self.safety_net_fired),
        }
