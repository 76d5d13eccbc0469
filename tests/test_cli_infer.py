"""`scxnn-train demo-bundle` then `scxnn-node infer` from the command line, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA
from dicom_factory import chest_pixels, make_dataset, write

from scxnn_node.model.bundle import load_bundle
from scxnn_node.model.manifest import verify_bundle

STUDY_KEYS = [
    "study_instance_uid",
    "verdict",
    "reason",
    "risk_tier",
    "abnormality_score",
    "threshold",
    "findings",
    "bundle",
    "safety_net_fired",
]


def _infer(bundle: Path, *paths: Path, json_out: bool = True) -> subprocess.CompletedProcess:
    args = [
        sys.executable,
        "-m",
        "scxnn_node.cli",
        "infer",
        *map(str, paths),
        "--bundle",
        str(bundle),
    ]
    if json_out:
        args.append("--json")
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def test_demo_bundle_is_marked_and_verifies(demo_bundle_dir):
    manifest = verify_bundle(demo_bundle_dir)
    assert manifest.demo is True
    assert "NOT FOR CLINICAL USE" in manifest.intended_use
    assert manifest.architecture == "densenet_small"
    assert len(manifest.findings) == 13
    assert manifest.operating_point.validation["sensitivity"] >= 0.99
    assert len(load_bundle(demo_bundle_dir).member_weights) == 13


def test_infer_real_files_json_shape(demo_bundle_dir):
    files = sorted(DATA.glob("*.dcm"))
    run = _infer(demo_bundle_dir, *files)
    assert run.returncode == 0, run.stderr
    studies = json.loads(run.stdout)["studies"]
    assert list(json.loads(run.stdout)) == ["studies"]
    # The two SIIM files share a study: three files, two studies.
    assert len(studies) == 2
    for study in studies:
        assert list(study) == STUDY_KEYS
        assert study["verdict"] in ("definite_normal", "abnormal")
        assert study["bundle"] == {"name": "scxnn-demo", "version": "0.1.0", "demo": True}
        assert len(study["findings"]) == 13
        for finding in study["findings"]:
            assert list(finding) == ["name", "tier", "call", "probabilities"]
            assert list(finding["probabilities"]) == ["normal", "target", "others"]
            assert abs(sum(finding["probabilities"].values()) - 1) < 1e-4
        assert (study["risk_tier"] is None) == (study["verdict"] != "abnormal")
    nih = next(s for s in studies if s["study_instance_uid"].startswith("1.3.6.1.4.1.11129"))
    assert "view position unknown" in nih["reason"]


def test_infer_text_output_says_not_for_clinical_use(demo_bundle_dir):
    run = _infer(demo_bundle_dir, DATA / "siim_cr_negative.dcm", json_out=False)
    assert run.returncode == 0
    assert "NOT FOR CLINICAL USE" in run.stdout


def test_non_chest_and_lateral_studies_are_not_analysed(demo_bundle_dir, tmp_path):
    knee = write(make_dataset(chest_pixels(128, bits=12), body_part="KNEE"), tmp_path / "knee.dcm")
    lateral = write(make_dataset(chest_pixels(128, bits=12), view="LL"), tmp_path / "lat.dcm")
    run = _infer(demo_bundle_dir, knee, lateral)
    assert run.returncode == 0, run.stderr
    studies = json.loads(run.stdout)["studies"]
    assert [s["verdict"] for s in studies] == ["not_analysed", "not_analysed"]
    assert "KNEE" in studies[0]["reason"] and "lateral" in studies[1]["reason"]
    assert studies[0]["findings"] == [] and studies[0]["abnormality_score"] is None


def test_unusable_file_gives_nonzero_exit_and_one_line_reason(demo_bundle_dir, tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_text("not dicom at all\n" * 10)
    run = _infer(demo_bundle_dir, junk, DATA / "siim_cr_negative.dcm")
    assert run.returncode == 1
    lines = [line for line in run.stderr.splitlines() if "junk.dcm" in line]
    assert len(lines) == 1 and "not_dicom" in lines[0]
    # The usable file was still triaged.
    assert len(json.loads(run.stdout)["studies"]) == 1


def test_infer_refuses_tampered_bundle(demo_bundle_dir, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(demo_bundle_dir, copy)
    (copy / "second_stage.json").write_text('{"type": "svm"}')
    run = _infer(copy, DATA / "siim_cr_negative.dcm")
    assert run.returncode == 2 and "second_stage.json" in run.stderr


@pytest.mark.parametrize("syntax", ["+ti", "+tb", "+td"])
def test_infer_accepts_any_transfer_syntax(demo_bundle_dir, tmp_path, syntax):
    from dicom_factory import dcmtk

    src = write(make_dataset(chest_pixels(128, seed=9, bits=12)), tmp_path / "src.dcm")
    out = tmp_path / "out.dcm"
    dcmtk("dcmconv", syntax, src, out)
    run = _infer(demo_bundle_dir, src, out)
    assert run.returncode == 0, run.stderr
    (study,) = json.loads(run.stdout)["studies"]  # same study, same pixels
    assert study["verdict"] in ("definite_normal", "abnormal")
