"""Bundles: written, verified, refused when anything is off, never unpickled."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SMALL_FINDINGS, build_random_bundle

from scxnn_node.model.bundle import load_bundle
from scxnn_node.model.manifest import (
    MANIFEST_FILE,
    BundleError,
    member_file,
    sha256_file,
    verify_bundle,
)


@pytest.fixture
def bundle_copy(small_bundle_dir, tmp_path) -> Path:
    target = tmp_path / "bundle"
    shutil.copytree(small_bundle_dir, target)
    return target


def test_written_bundle_verifies_and_loads(small_bundle_dir):
    manifest = verify_bundle(small_bundle_dir)
    assert manifest.findings.names == list(SMALL_FINDINGS)
    assert set(manifest.files) == {member_file(n) for n in SMALL_FINDINGS} | {"second_stage.json"}
    for rel, digest in manifest.files.items():
        assert sha256_file(small_bundle_dir / rel) == digest
    bundle = load_bundle(small_bundle_dir)
    assert set(bundle.member_weights) == set(SMALL_FINDINGS)
    assert bundle.second_stage.n_features == 9
    raw = json.loads((small_bundle_dir / MANIFEST_FILE).read_text())
    for key in (
        "format_version",
        "name",
        "version",
        "created",
        "findings",
        "preprocessing",
        "architecture",
        "operating_point",
        "training_data",
        "intended_use",
        "demo",
        "files",
    ):
        assert key in raw
    assert raw["findings"][0]["tier"] == "critical"


def test_altered_member_is_refused_by_name(bundle_copy):
    path = bundle_copy / member_file("nodule")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"nodule\.safetensors.*sha256"):
        verify_bundle(bundle_copy)
    with pytest.raises(BundleError, match=r"nodule\.safetensors"):
        load_bundle(bundle_copy)


def test_missing_file_is_refused(bundle_copy):
    (bundle_copy / "second_stage.json").unlink()
    with pytest.raises(BundleError, match=r"second_stage\.json"):
        load_bundle(bundle_copy)


def test_unlisted_file_is_refused(bundle_copy):
    (bundle_copy / "members" / "evil.pkl").write_bytes(b"\x80\x04not really")
    with pytest.raises(BundleError, match=r"evil\.pkl.*not listed"):
        verify_bundle(bundle_copy)


def test_wrong_format_version_is_refused(bundle_copy):
    path = bundle_copy / MANIFEST_FILE
    data = json.loads(path.read_text())
    data["format_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="format_version"):
        load_bundle(bundle_copy)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("version", "1.2", "semantic"),
        ("architecture", "vgg", "architecture"),
        ("demo", "yes", "demo"),
        ("findings", [{"name": "x", "tier": "deadly", "code": {}}], "tier"),
        ("preprocessing", {"size": 1024, "sharpen": True}, "unknown keys"),
    ],
)
def test_manifest_validation_names_the_key(bundle_copy, key, value, message):
    path = bundle_copy / MANIFEST_FILE
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))
    with pytest.raises(BundleError, match=message):
        verify_bundle(bundle_copy)


def test_bundles_are_immutable(small_bundle_dir):
    with pytest.raises(BundleError, match="already exists"):
        build_random_bundle(small_bundle_dir)


def test_second_stage_must_fit_the_members(bundle_copy):
    manifest = json.loads((bundle_copy / MANIFEST_FILE).read_text())
    manifest["findings"] = manifest["findings"][:2]  # 2 members, a 9-feature SVM
    del manifest["files"][member_file("cardiomegaly")]
    (bundle_copy / member_file("cardiomegaly")).unlink()
    (bundle_copy / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="9 features"):
        load_bundle(bundle_copy)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "scxnn_node.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_verify_and_show(small_bundle_dir, bundle_copy):
    ok = _cli("bundle", "verify", str(small_bundle_dir))
    assert ok.returncode == 0 and "intact" in ok.stdout
    show = _cli("bundle", "show", str(small_bundle_dir))
    assert show.returncode == 0
    assert "test-bundle" in show.stdout and "1.2.3" in show.stdout and "pneumothorax" in show.stdout
    assert "NOT FOR CLINICAL USE" in show.stdout
    shown = json.loads(_cli("bundle", "show", "--json", str(small_bundle_dir)).stdout)
    assert shown["version"] == "1.2.3"
    (bundle_copy / "second_stage.json").write_text("{}")
    bad = _cli("bundle", "verify", str(bundle_copy))
    assert bad.returncode == 1 and "second_stage.json" in bad.stderr
