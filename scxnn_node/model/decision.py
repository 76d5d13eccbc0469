"""Decision rules, numpy only: from the members' logits to a study's `StudyResult`.

Softmax over each member's three classes (after the bundle's member temperatures), the second
stage's score against the bundle's operating point, the critical safety net (a study is
definite normal only when the second stage says normal and no critical rule fires), the risk
tier of what the members call target. The engine (model/engine.py)
produces the logits; training's metrics and evaluation apply the same rules to theirs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from scxnn_node.model.result import (
    MEMBER_CLASSES,
    OTHERS,
    TARGET,
    UNSPECIFIED_TIER,
    FindingResult,
    MemberCall,
    StudyResult,
    Verdict,
)
from scxnn_node.model.safety_net import CriticalSafetyNet
from scxnn_node.model.second_stage import SvmSecondStage
from scxnn_node.model.temperature import apply_temperature

if TYPE_CHECKING:  # a Bundle holds torch tensors; the rules read only its manifest and SVM
    from scxnn_node.model.bundle import Bundle


def second_stage_features(logits: np.ndarray) -> np.ndarray:
    """(B, n_members, 3) logits -> (B, 3 * n_members) second-stage features: member by member
    in catalogue order, each member's classes in MEMBER_CLASSES order."""
    return logits.reshape(len(logits), -1)


def abnormality_scores(second_stage: SvmSecondStage, logits: np.ndarray) -> np.ndarray:
    """Second-stage abnormality scores for (B, n_members, 3) logits."""
    return second_stage.decision_function(second_stage_features(logits))


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis (member classes), numerically stable."""
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def member_probabilities(logits: np.ndarray, temperatures: np.ndarray | None) -> np.ndarray:
    """(B, n_members, 3) class probabilities: softmax of each member's logits divided by its
    temperature (None: no temperatures, T = 1)."""
    x = np.asarray(logits, dtype=np.float64)
    return softmax(apply_temperature(x, temperatures) if temperatures is not None else x)


def study_target_probabilities(probabilities: np.ndarray) -> np.ndarray:
    """(n_members,) target probabilities of a study: each member's highest over the study's
    images, as each finding reports the image where its member is most confident."""
    return np.asarray(probabilities)[:, :, TARGET].max(axis=0)


def safety_net_fired(
    net: CriticalSafetyNet | None, finding_names: Sequence[str], probabilities: np.ndarray
) -> tuple[str, ...]:
    """The critical findings whose safety-net rule fires for one study's (B, n_members, 3)
    probabilities; none without a net."""
    if net is None:
        return ()
    target = study_target_probabilities(probabilities)
    return tuple(net.fired(dict(zip(finding_names, map(float, target), strict=True))))


def not_analysed_result(bundle: Bundle, study_instance_uid: str, reason: str) -> StudyResult:
    return StudyResult(
        study_instance_uid=study_instance_uid,
        verdict=Verdict.NOT_ANALYSED,
        reason=reason,
        risk_tier=None,
        abnormality_score=None,
        threshold=None,
        findings=(),
        bundle=bundle.manifest.identity,
    )


def result_from_logits(
    bundle: Bundle,
    study_instance_uid: str,
    logits: np.ndarray,
    instance_uids: Sequence[str],
    notes: Sequence[str] = (),
) -> StudyResult:
    """Combine per-image logits (B, n_members, 3) of one study into its result.

    The study is as abnormal as its most abnormal image. Each finding reports the image where
    its member is most confident of the target; its call is target if any image says target,
    else others if any image says others, else normal.
    """
    manifest = bundle.manifest
    probs = member_probabilities(logits, bundle.temperatures)
    calls = probs.argmax(axis=-1)  # (B, n_members)
    score = float(abnormality_scores(bundle.second_stage, logits).max())
    threshold = float(manifest.operating_point.threshold)
    findings = []
    for m, finding in enumerate(manifest.findings):
        best = int(probs[:, m, TARGET].argmax())
        if (calls[:, m] == TARGET).any():
            call = MemberCall.TARGET
        elif (calls[:, m] == OTHERS).any():
            call = MemberCall.OTHERS
        else:
            call = MemberCall.NORMAL
        p = probs[best, m]
        findings.append(
            FindingResult(
                name=finding.name,
                tier=finding.tier,
                call=call,
                probabilities={c: float(p[i]) for i, c in enumerate(MEMBER_CLASSES)},
            )
        )
    fired = safety_net_fired(bundle.safety_net, manifest.findings.names, probs)
    abnormal = score >= threshold or bool(fired)
    reason_parts = list(notes)
    if fired:
        reason_parts.append(f"critical safety net: {', '.join(fired)}")
    risk_tier: str | None = None
    if abnormal:
        tiers = [f.tier for f in findings if f.call is MemberCall.TARGET or f.name in fired]
        if tiers:
            risk_tier = min(tiers, key=lambda t: t.rank).value
        else:
            risk_tier = UNSPECIFIED_TIER
            if any(f.call is MemberCall.OTHERS for f in findings):
                reason_parts.append("abnormal, unspecified: members see disease outside their own")
            else:
                reason_parts.append("abnormal, unspecified: no member names a finding")
    return StudyResult(
        study_instance_uid=study_instance_uid,
        verdict=Verdict.ABNORMAL if abnormal else Verdict.DEFINITE_NORMAL,
        reason="; ".join(reason_parts) or None,
        risk_tier=risk_tier,
        abnormality_score=score,
        threshold=threshold,
        findings=tuple(findings),
        bundle=manifest.identity,
        analysed_instances=tuple(instance_uids),
        safety_net_fired=fired,
    )
