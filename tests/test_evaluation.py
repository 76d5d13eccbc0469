"""The thesis's tables on a tiny fixture whose numbers are worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from scxnn_node.findings import THESIS_CATALOGUE
from training.metrics import EvaluationInputs, clopper_pearson, triage_metrics

NO, TG, OT = 0, 1, 2  # member classes normal / target / others
FINDINGS = THESIS_CATALOGUE.subset(["pneumothorax", "nodule", "cardiomegaly"])
# image: (labels, other disease, score, member calls [pneumothorax, nodule, cardiomegaly])
FIXTURE = [
    ({"pneumothorax": 0, "nodule": 0, "cardiomegaly": 0}, "", -1.0, [NO, NO, NO]),  # TN
    ({"pneumothorax": 0, "nodule": 0, "cardiomegaly": 0}, "", 0.5, [NO, TG, NO]),  # FP
    ({"pneumothorax": 1, "nodule": 0, "cardiomegaly": 0}, "", 2.0, [TG, OT, OT]),  # TP
    ({"pneumothorax": 0, "nodule": 1, "cardiomegaly": 0}, "", -0.5, [NO, NO, NO]),  # FN
    ({"pneumothorax": 0, "nodule": 1, "cardiomegaly": 1}, "", 1.0, [OT, OT, TG]),  # TP
    ({"pneumothorax": 0, "nodule": 0, "cardiomegaly": 0}, "pneumonia", 0.8, [OT, OT, OT]),  # TP
]


# Target logit where a member does not call target: orders the target probabilities without
# ties (the call's own logit is 3, so the call stays the arg max).
TARGET_LOGIT = [0.1, 0.5, 0.3, 0.2, 0.4, 0.0]


def fixture_inputs() -> EvaluationInputs:
    calls = np.array([c for *_, c in FIXTURE])
    logits = np.zeros((len(FIXTURE), 3, 3), np.float32)
    for i, row in enumerate(calls):
        for m, k in enumerate(row):
            logits[i, m, TG] = TARGET_LOGIT[i]
            logits[i, m, k] = 3.0
    labels = [lab for lab, *_ in FIXTURE]
    other = [o for _, o, *_ in FIXTURE]
    abnormal = [
        int(any(v == 1 for v in lab.values()) or bool(o))
        for lab, o in zip(labels, other, strict=True)
    ]
    return EvaluationInputs(
        findings=FINDINGS,
        logits=logits,
        scores=np.array([s for _, _, s, _ in FIXTURE]),
        threshold=0.0,
        labels=labels,
        abnormal=abnormal,
        other_disease=other,
    )


def test_tables_equal_hand_computed_numbers():
    m = triage_metrics(fixture_inputs())
    # Table 2
    assert m["confusion"] == {
        "ai_normal": {"normal": 1, "abnormal": 1},
        "ai_abnormal": {"normal": 1, "abnormal": 3},
    }
    assert m["sensitivity"] == 0.75 and m["specificity"] == 0.5
    # Score AUC: of 8 abnormal/normal pairs only (-0.5 vs 0.5) is ordered wrongly.
    assert m["auc"] == pytest.approx(7 / 8)
    # Table 3
    assert m["per_tier"] == {
        "critical": {"n": 1, "normal": 0, "target": 1, "others": 0},
        "urgent": {"n": 2, "normal": 1, "target": 0, "others": 1},
        "cardiomegaly": {"n": 1, "normal": 0, "target": 1, "others": 0},
    }
    # Per finding, nodule: target probabilities rank 1 (neg, called target) > 4 (pos) > 2 (neg)
    # > 3 (pos) > 0 (neg) > 5 (neg): image 4 beats 3 negatives, image 3 beats 2: AUC 5/8.
    nodule = m["per_finding"]["nodule"]
    assert nodule["auc"] == pytest.approx(5 / 8)
    assert (nodule["sensitivity"], nodule["specificity"]) == (0.0, 0.75)
    assert nodule["sensitivity_ci"] == pytest.approx([0.0, 1 - 0.025 ** (1 / 2)])
    assert m["per_finding"]["pneumothorax"]["auc"] == 1.0
    assert m["per_finding"]["pneumothorax"]["sensitivity_ci"] == pytest.approx([0.025, 1.0])
    assert m["per_finding"]["cardiomegaly"]["sensitivity"] == 1.0
    # Table 9
    assert m["outside_catalogue"] == {
        "pneumonia": {
            "n": 1,
            "called_abnormal": 1,
            "members": {
                name: {"normal": 0.0, "target": 0.0, "others": 1.0} for name in FINDINGS.names
            },
        }
    }


def test_clopper_pearson_closed_forms():
    assert clopper_pearson(0, 10) == pytest.approx([0.0, 1 - 0.025 ** (1 / 10)])
    assert clopper_pearson(10, 10) == pytest.approx([0.025 ** (1 / 10), 1.0])
    lo, hi = clopper_pearson(5, 10)
    assert lo == pytest.approx(0.187086, abs=1e-5) and hi == pytest.approx(0.812914, abs=1e-5)
    assert clopper_pearson(0, 0) is None


def test_unknown_status_is_left_out_of_table_2():
    inputs = fixture_inputs()
    abnormal = list(inputs.abnormal)
    abnormal[3] = None  # the missed image's status is unknown
    m = triage_metrics(
        EvaluationInputs(
            inputs.findings,
            inputs.logits,
            inputs.scores,
            inputs.threshold,
            inputs.labels,
            abnormal,
            inputs.other_disease,
        )
    )
    assert m["n_with_known_status"] == 5 and m["sensitivity"] == 1.0


def test_risk_tiers_carry_clopper_pearson_intervals():
    m = triage_metrics(fixture_inputs())
    intervals = m["per_tier_intervals"]
    # critical: 1 image, not missed, its member said target
    assert intervals["critical"]["sensitivity"]["value"] == 1.0
    assert intervals["critical"]["sensitivity"]["ci95"] == pytest.approx([0.025, 1.0])
    assert intervals["critical"]["target"]["ci95"] == pytest.approx([0.025, 1.0])
    # urgent: 2 images, one missed, none called target
    assert intervals["urgent"]["sensitivity"]["value"] == 0.5
    assert intervals["urgent"]["sensitivity"]["ci95"] == pytest.approx(clopper_pearson(1, 2))
    assert intervals["urgent"]["target"]["ci95"] == pytest.approx([0.0, 1 - 0.025 ** (1 / 2)])


def test_study_figures_equal_hand_computed_numbers():
    from scxnn_node.model.result import Verdict
    from training.metrics import StudyCall, study_metrics

    normal = {"pneumothorax": 0, "nodule": 0, "cardiomegaly": 0}
    n, a, na = Verdict.DEFINITE_NORMAL, Verdict.ABNORMAL, Verdict.NOT_ANALYSED
    calls = [
        StudyCall(normal, 0, n, frozenset()),  # TN
        StudyCall(normal, 0, a, frozenset({"nodule"})),  # FP
        StudyCall(normal, 0, na, frozenset()),  # a normal study not analysed: not called normal
        StudyCall({**normal, "pneumothorax": 1}, 1, a, frozenset({"pneumothorax"})),  # TP
        StudyCall({**normal, "nodule": 1}, 1, n, frozenset()),  # FN: a miss
        StudyCall({**normal, "nodule": 1, "cardiomegaly": 1}, 1, na, frozenset()),  # not missed
        StudyCall(dict.fromkeys(normal), None, a, frozenset()),  # status unknown: left out
    ]
    m = study_metrics(FINDINGS, calls)
    assert m["level"] == "study"
    assert (m["n_studies"], m["n_with_known_status"], m["n_not_analysed"]) == (7, 6, 2)
    assert m["confusion"] == {
        "ai_normal": {"normal": 1, "abnormal": 1},
        "ai_abnormal": {"normal": 1, "abnormal": 1},
        "not_analysed": {"normal": 1, "abnormal": 1},
    }
    assert m["sensitivity"] == pytest.approx(2 / 3) and m["specificity"] == pytest.approx(1 / 3)
    assert m["sensitivity_ci"] == pytest.approx(clopper_pearson(2, 3))
    assert m["specificity_ci"] == pytest.approx(clopper_pearson(1, 3))
    assert m["per_tier"] == {
        "critical": {"n": 1, "normal": 0, "target": 1, "others": 0, "not_analysed": 0},
        "urgent": {"n": 2, "normal": 1, "target": 0, "others": 0, "not_analysed": 1},
        "cardiomegaly": {"n": 1, "normal": 0, "target": 0, "others": 0, "not_analysed": 1},
    }
    assert m["per_tier_intervals"]["urgent"]["sensitivity"]["ci95"] == pytest.approx(
        clopper_pearson(1, 2)
    )
    assert m["per_tier_intervals"]["critical"]["sensitivity"]["ci95"] == pytest.approx([0.025, 1])
