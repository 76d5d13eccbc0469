"""The JSON, the SR and the summary image say the same thing of a study: a finding is present or
flagged only in an abnormal study, and a result analysed without purged images says so."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from dicom_factory import chest_pixels, make_dataset
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select, update
from test_results import _receive, _sr_of, node_parts  # noqa: F401 (node_parts: a fixture)

from scxnn_node.cleaner import Cleaner
from scxnn_node.dicom.sr import BELOW_OPERATING_POINT, PRESENT, build_triage_sr
from scxnn_node.dicom.summary import build_summary_image, render_summary
from scxnn_node.findings import THESIS_CATALOGUE
from scxnn_node.model.result import (
    BundleIdentity,
    FindingResult,
    MemberCall,
    StudyResult,
    Verdict,
)
from scxnn_node.store.assembly import enqueue_quiet_studies
from scxnn_node.store.models import Instance, Result, Study

CODES = {f.name: (f.code.value, f.code.scheme, f.code.meaning) for f in THESIS_CATALOGUE}
BUNDLE = BundleIdentity("test-bundle", "1.2.3", demo=False)
TARGET_P = {"normal": 0.2, "target": 0.7, "others": 0.1}
NORMAL_P = {"normal": 0.9, "target": 0.05, "others": 0.05}


def _findings(target_name: str) -> tuple[FindingResult, ...]:
    """Every catalogue finding; only `target_name`'s member says target."""
    return tuple(
        FindingResult(
            f.name,
            f.tier,
            MemberCall.TARGET if f.name == target_name else MemberCall.NORMAL,
            TARGET_P if f.name == target_name else NORMAL_P,
        )
        for f in THESIS_CATALOGUE
    )


def _result(verdict: Verdict, purged: tuple[str, ...] = ()) -> StudyResult:
    abnormal = verdict is Verdict.ABNORMAL
    return StudyResult(
        study_instance_uid=generate_uid(),
        verdict=verdict,
        reason=None,
        risk_tier="urgent" if abnormal else None,
        abnormality_score=0.8 if abnormal else -0.4,
        threshold=0.1,
        findings=_findings("consolidation"),
        bundle=BUNDLE,
        purged_instances=purged,
    )


def _source(result: StudyResult) -> Dataset:
    return make_dataset(chest_pixels(96, seed=3), study_uid=result.study_instance_uid)


def _sr(result: StudyResult, tmp_path: Path) -> tuple[Dataset, Path]:
    sr = build_triage_sr(
        result,
        [_source(result)],
        bundle_name=BUNDLE.name,
        bundle_version=BUNDLE.version,
        finding_codes=CODES,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
    )
    path = tmp_path / f"sr-{result.verdict.value}.dcm"
    sr.save_as(path, enforce_file_format=True)
    return pydicom.dcmread(path), path


def _content_items(items) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from _content_items(item.get("ContentSequence", []))


def _finding_values(sr: Dataset) -> dict[str, str]:
    """Finding meaning -> code value of its qualitative evaluation in the SR."""
    meanings = {meaning for _, _, meaning in CODES.values()}
    return {
        item.ConceptNameCodeSequence[0].CodeMeaning: item.ConceptCodeSequence[0].CodeValue
        for item in _content_items(sr.ContentSequence)
        if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeMeaning in meanings
    }


def _texts(sr: Dataset) -> list[str]:
    return [i.TextValue for i in _content_items(sr.ContentSequence) if i.ValueType == "TEXT"]


def _dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def test_a_definite_normal_study_flags_nothing_in_any_output(tmp_path):
    from scxnn_node.dicom.summary import summary_lines

    result = _result(Verdict.DEFINITE_NORMAL)
    assert result.findings[5].call is MemberCall.TARGET  # the member did say target
    assert result.flagged_findings == []
    calls = {f["name"]: f["call"] for f in result.to_dict()["findings"]}
    assert "target" not in calls.values()
    assert calls["consolidation"] == "below_operating_point"
    assert calls["pneumothorax"] == "normal"

    sr, path = _sr(result, tmp_path)
    values = _finding_values(sr)
    assert len(values) == len(THESIS_CATALOGUE)
    assert PRESENT.value not in values.values()
    assert values["Lung consolidation"] == BELOW_OPERATING_POINT.value
    assert sr.SeriesDescription == "AI TRIAGE: DEFINITE NORMAL"
    assert _dciodvfy_errors(path) == []

    text = " | ".join(summary_lines(result))
    assert "DEFINITE NORMAL" in text
    assert "consolidation" not in text and "ABNORMAL" not in text


def test_an_abnormal_study_reports_its_target_finding_present_in_every_output(tmp_path):
    from scxnn_node.dicom.summary import summary_lines

    result = _result(Verdict.ABNORMAL)
    assert [f.name for f in result.flagged_findings] == ["consolidation"]
    calls = {f["name"]: f["call"] for f in result.to_dict()["findings"]}
    assert calls["consolidation"] == "target"
    assert set(calls.values()) == {"target", "normal"}

    sr, path = _sr(result, tmp_path)
    values = _finding_values(sr)
    assert values["Lung consolidation"] == PRESENT.value
    assert list(values.values()).count(PRESENT.value) == 1
    assert sr.SeriesDescription == "AI TRIAGE: URGENT - consolidation"
    assert _dciodvfy_errors(path) == []

    lines = summary_lines(result)
    assert lines[0] == "ABNORMAL - URGENT"
    assert any(line.startswith("consolidation (urgent)") for line in lines)


def test_a_critical_finding_flagged_by_the_safety_net_alone_is_listed_not_absent(tmp_path):
    from scxnn_node.dicom.summary import summary_lines

    # The pneumothorax member said normal; the safety net fired on its target probability.
    findings = _findings("none")
    result = StudyResult(
        study_instance_uid=generate_uid(),
        verdict=Verdict.ABNORMAL,
        reason="critical safety net: pneumothorax",
        risk_tier="critical",
        abnormality_score=-0.4,
        threshold=0.1,
        findings=findings,
        bundle=BUNDLE,
        safety_net_fired=("pneumothorax",),
    )
    assert [f.name for f in result.flagged_findings] == ["pneumothorax"]
    calls = {f["name"]: f["call"] for f in result.to_dict()["findings"]}
    assert calls["pneumothorax"] == "safety_net"
    sr, path = _sr(result, tmp_path)
    assert _finding_values(sr)["Pneumothorax"] != "2667000"  # not Absent
    assert _dciodvfy_errors(path) == []
    assert any(line.startswith("pneumothorax (critical)") for line in summary_lines(result))


@pytest.mark.parametrize("verdict", [Verdict.DEFINITE_NORMAL, Verdict.ABNORMAL])
def test_a_result_without_purged_images_says_so_in_the_sr_and_the_summary(tmp_path, verdict):
    from scxnn_node.dicom.summary import summary_lines

    result = _result(verdict, purged=(generate_uid(), generate_uid()))
    note = "Not analysed: 2 earlier image(s) no longer held by the node"
    sr, path = _sr(result, tmp_path)
    assert note in _texts(sr)
    assert _dciodvfy_errors(path) == []
    assert note in summary_lines(result)
    whole = _result(verdict)
    assert not [t for t in _texts(_sr(whole, tmp_path)[0]) if t.startswith("Not analysed")]
    assert not [line for line in summary_lines(whole) if line.startswith("Not analysed")]


def test_the_summary_image_renders_the_composed_lines(tmp_path):
    result = _result(Verdict.ABNORMAL, purged=(generate_uid(),))
    image = chest_pixels(96, seed=3, bits=8).astype("uint8")
    tall = render_summary(result, image)
    assert tall.dtype.name == "uint8" and tall.shape[1] == 768
    shorter = render_summary(_result(Verdict.ABNORMAL), image)
    assert tall.shape[0] > shorter.shape[0]  # one more line: the purged note
    sc = build_summary_image(
        result,
        _source(result),
        image,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
    )
    path = tmp_path / "summary.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert _dciodvfy_errors(path) == []


def test_the_worker_notes_purged_images_in_the_sr_of_a_late_instance(node_parts):  # noqa: F811
    config, db, spool, worker = node_parts
    study = generate_uid()
    _receive(db, spool, study, seed=4)
    assert enqueue_quiet_studies(db, 0, worker.manifest.version) == 1
    assert worker.process_next()
    with db.session() as s:
        first = s.execute(select(Result)).scalar_one().id
        long_ago = db.now() - timedelta(days=2)
        s.execute(update(Instance).values(received_at=long_ago))
        s.execute(update(Study).values(last_received_at=long_ago))
    assert Cleaner(config, db, spool).purge_spool() == 1
    _receive(db, spool, study, seed=5)  # a late instance of the reported study
    assert enqueue_quiet_studies(db, 0, worker.manifest.version) == 1
    assert worker.process_next()
    with db.session() as s:
        second = s.execute(select(Result).where(Result.id != first)).scalar_one().id
    note = "Not analysed: 1 earlier image(s) no longer held by the node"
    assert note in _texts(_sr_of(db, spool, second))
    assert not [t for t in _texts(_sr_of(db, spool, first)) if t.startswith("Not analysed")]


def test_a_source_without_modality_still_gives_valid_outputs(tmp_path):
    """Found by bench/fuzz.py: an image without Modality (Type 1, but real senders omit it) was
    analysed, then building its SR raised AttributeError and the study ended `failed`."""
    result = _result(Verdict.ABNORMAL)
    source = _source(result)
    del source.Modality
    image = chest_pixels(96, seed=3, bits=8).astype("uint8")
    sr = build_triage_sr(
        result,
        [source],
        bundle_name=BUNDLE.name,
        bundle_version=BUNDLE.version,
        finding_codes=CODES,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
    )
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    assert _dciodvfy_errors(path) == []
    summary = build_summary_image(
        result,
        source,
        image,
        series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
    )
    assert summary.SOPInstanceUID
    assert "Modality" not in source  # the caller's header is left as it came
