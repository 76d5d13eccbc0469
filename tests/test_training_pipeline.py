"""The training command line end to end: synth -> fit -> export -> node engine -> evaluate."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import DATA
from trainkit import FINDINGS, small_config_data

from scxnn_node.imaging.decode import load_image
from scxnn_node.imaging.preprocess import preprocess_image
from scxnn_node.model.bundle import load_bundle
from scxnn_node.model.engine import InferenceEngine
from scxnn_node.model.manifest import verify_bundle
from training.cli import main as train_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _cli(*args: str | Path) -> int:
    return train_cli(["--log-level", "WARNING", "--no-progress", *map(str, args)])


def _config(path: Path, **overrides: object) -> Path:
    path.write_text(yaml.safe_dump(small_config_data(name="pipeline-test", **overrides)))
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pipeline")
    data = root / "data"
    assert _cli("synth", "--out", data, "--count", 60, "--size", 64, "--findings", *FINDINGS) == 0
    config = _config(root / "config.yaml")
    run = root / "run"
    # One member on its own (as on a separate machine), then the rest and the second stage.
    assert (
        _cli(
            "fit",
            "--config",
            config,
            "--manifest",
            data / "manifest.csv",
            "--out",
            run,
            "--member",
            "nodule",
        )
        == 0
    )
    assert (run / "members" / "nodule" / "done.json").exists()
    assert not (run / "members" / "pneumothorax").exists()
    assert not (run / "second_stage.json").exists()
    nodule_weights = (run / "members" / "nodule" / "member.safetensors").read_bytes()
    assert _cli("fit", "--config", config, "--manifest", data / "manifest.csv", "--out", run) == 0
    # the finished member was kept, not retrained
    assert (run / "members" / "nodule" / "member.safetensors").read_bytes() == nodule_weights
    return {"root": root, "data": data, "config": config, "run": run}


def test_fit_writes_members_metrics_and_second_stage(trained_run: dict[str, Path]):
    run = trained_run["run"]
    for finding in FINDINGS:
        d = run / "members" / finding
        rows = _csv_rows(d / "metrics.csv")
        assert [r["stage"] for r in rows] == ["hard", "hard", "weak"]
        assert all(float(r["train_loss"]) > 0 for r in rows)
        assert (d / "checkpoint.pt").exists() and (d / "val_logits.npy").exists()
    op = json.loads((run / "operating_point.json").read_text())
    assert op["validation"]["rule"] == "neyman_pearson_order_statistic"
    assert op["validation"]["sensitivity"] >= 0.9
    dataset = json.loads((run / "dataset.json").read_text())
    assert sum(s["images"] for s in dataset["splits"].values()) == 60
    resolved = _csv_rows(run / "dataset" / "manifest.csv")
    assert {r["split"] for r in resolved} == {"train", "val", "test"}


def test_export_verifies_and_loads_in_the_engine(trained_run: dict[str, Path], tmp_path: Path):
    run, data = trained_run["run"], trained_run["data"]
    bundle_dir = tmp_path / "bundle-1.0.0"
    assert _cli("export", "--run", run, "--out", bundle_dir, "--version", "1.0.0") == 0
    manifest = verify_bundle(bundle_dir)
    assert manifest.version == "1.0.0" and manifest.demo is True
    assert manifest.findings.names == FINDINGS
    assert manifest.preprocessing.size == 32
    expected_sha = hashlib.sha256((data / "manifest.csv").read_bytes()).hexdigest()
    assert manifest.training_data.manifest_sha256 == expected_sha
    assert manifest.changelog[0].startswith(
        "1.0.0: trained from manifest sha256 " + expected_sha[:12]
    )
    assert manifest.operating_point.validation["rule"] == "neyman_pearson_order_statistic"
    assert "training/validation_metrics.json" in manifest.files
    assert {"MODEL_CARD.md", "temperatures.json", "safety_net.json"} <= set(manifest.files)
    assert manifest.precision == "fp32"  # a CPU config serves at fp32
    bundle = load_bundle(bundle_dir)
    assert bundle.temperatures is not None and bundle.safety_net is not None
    assert bundle.safety_net.findings == ["pneumothorax"]  # the one critical member
    assert not any(k.startswith("decoder.") for k in bundle.member_weights["nodule"])
    engine = InferenceEngine(bundle)
    image = preprocess_image(
        load_image(DATA / "siim_cr_negative.dcm").pixels, manifest.preprocessing
    )
    result = engine.triage("1.2.3", image[None], ["1.2.3.4"])
    assert [f.name for f in result.findings] == FINDINGS
    # bundles are immutable; a new version is a new directory and can carry the history on
    assert _cli("export", "--run", run, "--out", bundle_dir, "--version", "1.0.1") == 1
    newer = tmp_path / "bundle-1.0.1"
    assert (
        _cli(
            "export",
            "--run",
            run,
            "--out",
            newer,
            "--version",
            "1.0.1",
            "--changelog",
            "1.0.1: same weights, re-exported",
            "--previous",
            bundle_dir,
        )
        == 0
    )
    assert verify_bundle(newer).changelog == (
        "1.0.1: same weights, re-exported",
        *manifest.changelog,
    )


def test_evaluate_writes_report_figures_and_consistent_metrics(
    trained_run: dict[str, Path], tmp_path: Path
):
    run = trained_run["run"]
    bundle_dir = tmp_path / "bundle"
    assert _cli("export", "--run", run, "--out", bundle_dir, "--version", "0.1.0") == 0
    out = tmp_path / "eval"
    assert (
        _cli(
            "evaluate",
            "--bundle",
            bundle_dir,
            "--manifest",
            run / "dataset" / "manifest.csv",
            "--out",
            out,
            "--workers",
            1,
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "sensitivity",
        "specificity",
        "sensitivity_ci",
        "specificity_ci",
        "per_tier",
        "per_finding",
        "confusion",
        "outside_catalogue",
    ):
        assert key in metrics
    assert metrics["split"] == "test"
    for figure in ("roc.png", "confusion.png", "reliability.png"):
        assert (out / figure).read_bytes()[:8] == PNG_MAGIC
    # one calibration error per member, a proportion
    assert set(metrics["calibration_error"]) <= set(metrics["per_finding"])
    assert metrics["calibration_error"]
    assert all(0.0 <= e <= 1.0 for e in metrics["calibration_error"].values())
    report = (out / "report.md").read_text()
    assert "Table 2" in report and "Table 3" in report and "Table 9" in report
    # metrics.json agrees with the per-image predictions it came from
    rows = _csv_rows(out / "predictions.csv")
    test_rows = [r for r in _csv_rows(run / "dataset" / "manifest.csv") if r["split"] == "test"]
    assert len(rows) == len(test_rows) == metrics["n_images"]
    tp = sum(r["abnormal"] == "1" and r["ai_abnormal"] == "1" for r in rows)
    fn = sum(r["abnormal"] == "1" and r["ai_abnormal"] == "0" for r in rows)
    tn = sum(r["abnormal"] == "0" and r["ai_abnormal"] == "0" for r in rows)
    assert metrics["confusion"]["ai_abnormal"]["abnormal"] == tp
    assert metrics["confusion"]["ai_normal"]["abnormal"] == fn
    assert metrics["confusion"]["ai_normal"]["normal"] == tn
    if tp + fn:
        assert metrics["sensitivity"] == pytest.approx(tp / (tp + fn))


def test_fit_refuses_bad_requests(trained_run: dict[str, Path], tmp_path: Path, capsys):
    data, run = trained_run["data"], trained_run["run"]
    other = _config(tmp_path / "other.yaml", seed=5)
    assert _cli("fit", "--config", other, "--manifest", data / "manifest.csv", "--out", run) == 1
    assert "made with another config" in capsys.readouterr().err
    wide = _config(tmp_path / "wide.yaml", findings=[*FINDINGS, "atelectasis"])
    narrow = tmp_path / "narrow.csv"
    with open(data / "manifest.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    keep = [i for i, h in enumerate(rows[0]) if h != "atelectasis" and h != "mask_atelectasis"]
    with open(narrow, "w", newline="") as fh:
        csv.writer(fh).writerows([[r[i] for i in keep] for r in rows])
    # the narrowed manifest's image paths are relative to the data folder
    narrow_in_data = data / "narrow.csv"
    narrow_in_data.write_bytes(narrow.read_bytes())
    assert _cli("fit", "--config", wide, "--manifest", narrow_in_data, "--out", tmp_path / "r") == 1
    assert "['atelectasis'], which have no label column" in capsys.readouterr().err
    assert (
        _cli(
            "fit",
            "--config",
            other,
            "--manifest",
            data / "manifest.csv",
            "--out",
            tmp_path / "r2",
            "--member",
            "atelectasis",
        )
        == 1
    )
    assert "not one of the config's findings" in capsys.readouterr().err


def test_one_member_on_two_processes_with_torchrun(trained_run: dict[str, Path], tmp_path: Path):
    """DistributedDataParallel over gloo on this CPU: two ranks share each epoch."""
    torchrun = Path(sys.executable).with_name("torchrun")
    run = tmp_path / "ddp-run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "training.cli",
            "--no-progress",
            "fit",
            "--config",
            str(trained_run["config"]),
            "--manifest",
            str(trained_run["data"] / "manifest.csv"),
            "--out",
            str(run),
            "--member",
            "cardiomegaly",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=Path(__file__).parents[1],
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 of 2" in proc.stderr and "rank 1 of 2" in proc.stderr
    d = run / "members" / "cardiomegaly"
    assert (d / "done.json").exists() and (d / "member.safetensors").exists()
    rows = _csv_rows(d / "metrics.csv")
    assert [r["stage"] for r in rows] == ["hard", "hard", "weak"]


def test_import_command_validates_what_it_writes(tmp_path: Path, capsys):
    root = tmp_path / "ds"
    for cls in ("normal", "viral_pneumonia"):
        (root / cls).mkdir(parents=True)
        (root / cls / "person1_x.png").write_bytes(b"")  # empty: found, but not an image
    mapping = tmp_path / "map.yaml"
    mapping.write_text("classes: {normal: normal, viral_pneumonia: interstitial_opacity}\n")
    out = tmp_path / "manifest.csv"
    assert _cli("import-folders", "--root", root, "--mapping", mapping, "--out", out) == 0
    assert "2 images, findings ['interstitial_opacity']" in capsys.readouterr().out
    mapping.write_text("classes: {normal: normal}\n")
    assert _cli("import-folders", "--root", root, "--mapping", mapping, "--out", out) == 1
    assert "class 'viral_pneumonia' is not in the mapping" in capsys.readouterr().err


def test_fit_sets_thresholds_on_patients_the_svm_never_saw(trained_run: dict[str, Path]):
    run = trained_run["run"]
    roles = _csv_rows(run / "image_roles.csv")
    resolved = {r["image"]: r for r in _csv_rows(run / "dataset" / "manifest.csv")}
    assert {r["role"] for r in roles} == {"train", "fit", "calibration", "test"}
    assert len(roles) == len(resolved) == 60
    for r in roles:  # validation images are cut; the other splits keep their name
        split = resolved[r["image"]]["split"]
        assert r["role"] in (("fit", "calibration") if split == "val" else (split,))
    fit = {r["patient_id"] for r in roles if r["role"] == "fit"}
    calibration = {r["patient_id"] for r in roles if r["role"] == "calibration"}
    assert fit and calibration and not fit & calibration
    v = json.loads((run / "operating_point.json").read_text())["validation"]
    assert v["threshold_set_on"] == "calibration" and v["threshold_unit"] == "image"
    assert v["n_calibration_images"] == sum(r["role"] == "calibration" for r in roles)
    assert v["n_fit_images"] == sum(r["role"] == "fit" for r in roles)
    assert v["n_abnormal"] + v["n_normal"] <= v["n_calibration_images"]
    assert v["precision"] == "fp32"
    metrics = json.loads((run / "validation_metrics.json").read_text())
    assert metrics["n_images"] == v["n_calibration_images"]
    temperatures = json.loads((run / "temperatures.json").read_text())["temperatures"]
    assert sorted(temperatures) == sorted(FINDINGS) and all(t > 0 for t in temperatures.values())
    net = json.loads((run / "safety_net.json").read_text())
    assert [t["finding"] for t in net["thresholds"]] == ["pneumothorax"]
    done = json.loads((run / "members" / "nodule" / "done.json").read_text())
    assert done["val_logits_precision"] == "fp32"
    assert done["epoch_selected_on"] == "fit part of validation"


def test_export_refuses_a_clinical_bundle_without_its_guarantee(
    trained_run: dict[str, Path], tmp_path: Path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(trained_run["run"], run, ignore=shutil.ignore_patterns("cache"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "demo": False}))
    out = tmp_path / "clinical"
    assert _cli("export", "--run", run, "--out", out, "--version", "1.0.0") == 1
    err = capsys.readouterr().err
    assert "guarantee is not met" in err and "--not-for-clinical-use" in err
    assert "second stage:" in err and "safety net pneumothorax:" in err
    assert not out.exists()
    assert (
        _cli("export", "--run", run, "--out", out, "--version", "1.0.0", "--not-for-clinical-use")
        == 0
    )
    manifest = verify_bundle(out)
    assert manifest.demo is True  # the demo marking: every output says NOT FOR CLINICAL USE
    assert manifest.intended_use.startswith("NOT FOR CLINICAL USE (second stage:")
    card = (out / "MODEL_CARD.md").read_text()
    for part in ("## Intended use", "## Training data", "## Calibration set",
                 "## Guarantee achieved", "## Results on the calibration set", "## Limitations"):
        assert part in card
    assert "NOT met" in card and "NOT FOR CLINICAL USE" in card
    calibration = json.loads((run / "calibration.json").read_text())
    cal = calibration["split"]["calibration"]
    assert f"{cal['patients']} patients ({cal['images']} images)" in card
    result = InferenceEngine(load_bundle(out)).triage(
        "1.2.3", np.zeros((1, 32, 32), np.uint8), ["1.2.3.4"]
    )
    assert result.bundle.demo is True


def test_export_refuses_a_run_without_a_held_out_second_stage(
    trained_run: dict[str, Path], tmp_path: Path, capsys
):
    run = tmp_path / "run"
    shutil.copytree(trained_run["run"], run, ignore=shutil.ignore_patterns("cache"))
    (run / "safety_net.json").unlink()  # as in a run fitted before the held-out second stage
    assert _cli("export", "--run", run, "--out", tmp_path / "b", "--version", "1.0.0") == 1
    assert "no held-out second stage yet" in capsys.readouterr().err


def test_export_keeps_salted_provenance_and_evaluate_refuses_seen_patients(
    trained_run: dict[str, Path], tmp_path: Path, capsys
):
    run = trained_run["run"]
    bundle_dir = tmp_path / "bundle"
    assert _cli("export", "--run", run, "--out", bundle_dir, "--version", "0.2.0") == 0
    manifest = verify_bundle(bundle_dir)
    assert "training/provenance.json" in manifest.files
    record = json.loads((bundle_dir / "training" / "provenance.json").read_text())
    resolved = _csv_rows(run / "dataset" / "manifest.csv")
    seen = [r for r in resolved if r["split"] in ("train", "val")]
    assert len(record["images"]) == len(seen)
    assert not {r["patient_id"] for r in resolved} & set(record["patients"])  # hashes only
    out = tmp_path / "eval"
    args = ["evaluate", "--bundle", bundle_dir, "--manifest", run / "dataset" / "manifest.csv"]
    assert _cli(*args, "--out", out, "--split", "train", "--workers", 1) == 1
    assert "a patient the bundle was trained or calibrated on" in capsys.readouterr().err
    assert _cli(*args, "--out", out, "--workers", 1, "--precision", "fp32") == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["training_overlap_checked"] is True
    assert metrics["study"]["level"] == "study"
    assert metrics["study"]["n_studies"] == metrics["n_images"]  # no study_id: one per image
    assert metrics["engine"] == {"device": "cpu", "precision": "fp32"}
