"""The second stage of a run, fitted and calibrated on disjoint patients (DESIGN.md rule 8).

The validation images are cut per patient (training/calibration_split.py). On the "fit" part:
the SVM and the member temperatures. On the "calibration" part, which nothing was fitted on:
the Neyman-Pearson threshold and the critical safety net, both on study-level values computed
as the node computes them (scxnn_node/model/decision.py: a study's score is its highest
image score, a finding's target probability its highest image probability, after the
temperatures). Without study ids every image is its own study. A patient's studies are not
independent cases (training/one_study_per_patient.py): the threshold and the results' intervals
count one study per patient and class, the safety net one positive study per patient and
finding. Numpy only: the logits come in
already computed (at the precision the node serves).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from scxnn_node.findings import FindingCatalogue, RiskTier
from scxnn_node.model.decision import (
    abnormality_scores,
    member_probabilities,
    study_target_probabilities,
)
from scxnn_node.model.manifest import OperatingPoint
from scxnn_node.model.safety_net import CriticalSafetyNet
from scxnn_node.model.second_stage import SvmSecondStage
from training.calibration_split import FitCalibrationSplit, split_fit_calibration
from training.critical_safety_net import fit_critical_safety_net
from training.held_out_threshold import held_out_operating_point
from training.metrics import proportion
from training.one_study_per_patient import ONE_STUDY_PER_PATIENT, one_study_per_patient
from training.second_stage_fit import fit_second_stage
from training.temperature import (
    UNKNOWN,
    expected_calibration_error,
    fit_temperature,
    top_label_reliability,
)

log = logging.getLogger(__name__)

STUDY = "study"
IMAGE = "image"


@dataclass(frozen=True)
class ValidationImages:
    """The validation images of a run: members' logits and what the manifest says of each."""

    logits: np.ndarray  # (N, n_members, 3), at the serving precision
    patient_ids: Sequence[str]
    study_ids: Sequence[str]  # "" where the manifest names no study
    labels: Sequence[Mapping[str, int | None]]  # per image, finding -> 1, 0 or None
    abnormal: Sequence[int | None]
    member_classes: np.ndarray  # (N, n_members): normal/target/others as 0/1/2, -1 unknown

    def __post_init__(self) -> None:
        n = len(self.logits)
        sizes = {len(self.patient_ids), len(self.study_ids), len(self.labels), len(self.abnormal)}
        if sizes != {n} or self.member_classes.shape != self.logits.shape[:2]:
            raise ValueError("validation images need one patient, study, label set and class each")


@dataclass(frozen=True)
class RunCalibration:
    """What `calibrate` decided: the run's second stage and the records behind it."""

    split: FitCalibrationSplit
    second_stage: SvmSecondStage
    temperatures: np.ndarray  # (n_members,)
    operating_point: OperatingPoint
    safety_net: CriticalSafetyNet
    summary: dict[str, Any]  # calibration.json: counts, guarantee, per-tier study results
    # Per calibration study, as the node decides it: its score and whether it was called
    # definite normal (drift watch's reference); rows of each study in `calibration_studies`.
    study_scores: np.ndarray = field(default_factory=lambda: np.zeros(0))
    study_definite_normal: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    calibration_studies: tuple[np.ndarray, ...] = ()  # image rows (of the validation images)

    @property
    def guarantee_met(self) -> bool:
        return bool(self.operating_point.validation.get("guarantee_met")) and (
            self.safety_net.guarantee_met
        )


def study_groups(image_rows: Sequence[int], study_ids: Sequence[str]) -> list[np.ndarray]:
    """Row indices of each study, in order of first appearance; an image without a study id
    is a study of its own. `image_rows` are the positions the indices refer to."""
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(image_rows):
        key = study_ids[row] or f"\0image{row}"  # no manifest study id starts with NUL
        groups.setdefault(key, []).append(i)
    return [np.array(g, dtype=int) for g in groups.values()]


def _any_known(values: Sequence[int | None]) -> int | None:
    """1 if any value is 1, 0 if all are 0, None otherwise: a study from its images."""
    if any(v == 1 for v in values):
        return 1
    if values and all(v == 0 for v in values):
        return 0
    return None


def fit_member_temperatures_or_one(
    logits: np.ndarray, member_classes: np.ndarray, names: Sequence[str]
) -> np.ndarray:
    """One temperature per member from the fit part; 1.0 (no scaling) for a member with no
    image of known class there, with a warning."""
    temperatures = []
    for m, name in enumerate(names):
        if (member_classes[:, m] == UNKNOWN).all():
            log.warning("temperature of %s: no fit image of known class; T = 1", name)
            temperatures.append(1.0)
        else:
            temperatures.append(fit_temperature(logits[:, m], member_classes[:, m]))
    return np.array(temperatures, dtype=np.float64)


def _ece(logits: np.ndarray, classes: np.ndarray, temperature: float) -> float | None:
    known = classes != UNKNOWN
    if not known.any():
        return None
    return expected_calibration_error(top_label_reliability(logits, classes, temperature))


def calibrate(
    findings: FindingCatalogue,
    images: ValidationImages,
    kernel: str = "rbf",
    c: float = 1.0,
    class_weight: str | dict[int, float] | None = "balanced",
    target_sensitivity: float = 0.99,
    confidence: float = 0.95,
    calibration_fraction: float = 0.5,
    calibration_seed: int = 0,
    critical_miss_rate: float = 0.01,
    precision: str = "fp32",
) -> RunCalibration:
    """Cut, fit and calibrate; ValueError when the validation split cannot be cut in two."""
    names = findings.names
    split = split_fit_calibration(
        images.patient_ids, images.abnormal, calibration_fraction, calibration_seed
    )
    on_calibration = split.calibration_mask(images.patient_ids)
    known = np.array([a is not None for a in images.abnormal], dtype=bool)
    y = np.array([a == 1 for a in images.abnormal], dtype=int)
    x = np.asarray(images.logits, dtype=np.float64)
    fit_rows = np.flatnonzero(~on_calibration)
    cal_rows = np.flatnonzero(on_calibration)

    stage = fit_second_stage(
        x[fit_rows][known[fit_rows]], y[fit_rows][known[fit_rows]], kernel, c, class_weight
    )
    temperatures = fit_member_temperatures_or_one(
        x[fit_rows], images.member_classes[fit_rows], names
    )

    # Calibration part, study by study, exactly as the node aggregates a study.
    groups = study_groups(cal_rows, images.study_ids)
    unit = STUDY if any(images.study_ids[r] for r in cal_rows) else IMAGE
    cal_scores = abnormality_scores(stage, x[cal_rows])
    cal_probs = member_probabilities(x[cal_rows], temperatures)
    study_scores = np.array([cal_scores[g].max() for g in groups])
    study_abnormal = [_any_known([images.abnormal[cal_rows[i]] for i in g]) for g in groups]
    study_target = np.stack([study_target_probabilities(cal_probs[g]) for g in groups])
    study_labels = [
        {f: _any_known([images.labels[cal_rows[i]].get(f) for i in g]) for f in names}
        for g in groups
    ]
    s_known = np.array([a is not None for a in study_abnormal], dtype=bool)
    s_y = np.array([a == 1 for a in study_abnormal], dtype=int)
    # The threshold sees one study per patient and class, the safety net one positive study
    # per patient and finding: independent units.
    study_patients = [images.patient_ids[cal_rows[g[0]]] for g in groups]
    units = np.flatnonzero(one_study_per_patient(study_patients, study_abnormal, calibration_seed))
    fit_known = fit_rows[known[fit_rows]]
    op = held_out_operating_point(
        study_scores[units],
        s_y[units],
        n_fit_abnormal=int(y[fit_known].sum()),
        n_fit_normal=int((1 - y[fit_known]).sum()),
        target_sensitivity=target_sensitivity,
        confidence=confidence,
    )
    net = fit_critical_safety_net(
        findings,
        study_target,
        study_labels,
        critical_miss_rate,
        confidence,
        patients=study_patients,  # each finding: one positive study per patient
        seed=calibration_seed,
    )
    fired = net.fired_matrix(study_target, names).any(axis=1)
    svm_abnormal = study_scores >= op.threshold
    called_abnormal = svm_abnormal | fired
    op = replace(
        op,
        validation={
            **op.validation,
            "threshold_unit": unit,
            "precision": precision,
            "calibration_fraction": split.calibration_fraction,
            "calibration_seed": split.seed,
            "n_calibration_patients": len(split.calibration_patients),
            "n_calibration_images": len(cal_rows),
            "n_calibration_studies": len(groups),
            "n_abnormal_studies_all": int(s_y[s_known].sum()),
            "independent_units": ONE_STUDY_PER_PATIENT,
            "n_fit_patients": len(split.fit_patients),
            "n_fit_images": len(fit_rows),
        },
    )
    summary = {
        "threshold_unit": unit,
        "precision": precision,
        "split": {
            "calibration_fraction": split.calibration_fraction,
            "seed": split.seed,
            "fit": {"patients": len(split.fit_patients), "images": len(fit_rows)},
            "calibration": {
                "patients": len(split.calibration_patients),
                "images": len(cal_rows),
                "studies": len(groups),
                "abnormal_studies": int(s_y[s_known].sum()),
                "normal_studies": int((1 - s_y[s_known]).sum()),
                "unknown_studies": int((~s_known).sum()),
                # what the guarantees and the results below count: one per patient and class
                "independent_abnormal_studies": int(s_y[units].sum()),
                "independent_normal_studies": int((1 - s_y[units]).sum()),
            },
        },
        "second_stage": op.to_dict(),
        "safety_net": net.to_dict(),
        "safety_net_fired_on_svm_normal": int((fired & ~svm_abnormal).sum()),
        "guarantee_met": bool(op.validation["guarantee_met"]) and net.guarantee_met,
        "temperatures": {
            name: {
                "temperature": float(temperatures[m]),
                "calibration_ece_before": _ece(
                    x[cal_rows, m], images.member_classes[cal_rows, m], 1.0
                ),
                "calibration_ece_after": _ece(
                    x[cal_rows, m], images.member_classes[cal_rows, m], float(temperatures[m])
                ),
            }
            for m, name in enumerate(names)
        },
        "results": study_results(
            findings,
            s_known[units],
            s_y[units],
            called_abnormal[units],
            svm_abnormal[units],
            [study_labels[i] for i in units],
            study_target[units],
        ),
        # every calibration study: counts to read beside the above, whose intervals would be
        # too narrow here (a patient's studies are not independent)
        "results_every_study": study_results(
            findings, s_known, s_y, called_abnormal, svm_abnormal, study_labels, study_target
        ),
    }
    return RunCalibration(
        split,
        stage,
        temperatures,
        op,
        net,
        summary,
        study_scores,
        ~called_abnormal,
        tuple(cal_rows[g] for g in groups),
    )


def study_results(
    findings: FindingCatalogue,
    known: np.ndarray,
    abnormal: np.ndarray,
    called_abnormal: np.ndarray,
    svm_abnormal: np.ndarray,
    labels: Sequence[Mapping[str, int | None]],
    target_probability: np.ndarray,
) -> dict[str, Any]:
    """Study-level results on the calibration part with 95 % Clopper-Pearson intervals: the
    definite-normal verdict (second stage and safety net) overall and per risk tier (a tier's
    studies are those with a finding of that tier present; a miss is one called normal)."""
    truth = known & (abnormal == 1)
    negatives = known & (abnormal == 0)
    out: dict[str, Any] = {
        "sensitivity": proportion(int((truth & called_abnormal).sum()), int(truth.sum())),
        "specificity": proportion(int((negatives & ~called_abnormal).sum()), int(negatives.sum())),
        "second_stage_alone": {
            "sensitivity": proportion(int((truth & svm_abnormal).sum()), int(truth.sum())),
            "specificity": proportion(
                int((negatives & ~svm_abnormal).sum()), int(negatives.sum())
            ),
        },
        "per_tier": {},
    }
    for tier in RiskTier:
        members = [f.name for f in findings if f.tier == tier]
        if not members:
            continue
        rows = np.array([any(lab.get(f) == 1 for f in members) for lab in labels], dtype=bool)
        out["per_tier"][tier.value] = {
            "studies": int(rows.sum()),
            "called_normal": int((rows & ~called_abnormal).sum()),
            "sensitivity": proportion(int((rows & called_abnormal).sum()), int(rows.sum())),
        }
    per_finding = {}
    for m, finding in enumerate(findings):
        rows = np.array([lab.get(finding.name) == 1 for lab in labels], dtype=bool)
        per_finding[finding.name] = {
            "tier": finding.tier.value,
            "positive_studies": int(rows.sum()),
            "called_normal": int((rows & ~called_abnormal).sum()),
            "median_target_probability": (
                float(np.median(target_probability[rows, m])) if rows.any() else None
            ),
        }
    out["per_finding"] = per_finding
    return out

