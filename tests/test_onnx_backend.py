"""The ONNX Runtime backend: same logits and verdicts as eager, and a cache that is checked."""

from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest

from scxnn_node.model import onnx_backend
from scxnn_node.model.bundle import load_bundle
from scxnn_node.model.engine import InferenceEngine
from scxnn_node.model.options import EngineOptions


@pytest.fixture(scope="module")
def bundle(small_bundle_dir):
    return load_bundle(small_bundle_dir)


@pytest.fixture(scope="module")
def eager(bundle):
    return InferenceEngine(bundle, EngineOptions(batch_size=2, backend="eager"))


def _images(n, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def _onnx_engine(bundle, cache_dir):
    return InferenceEngine(
        bundle, EngineOptions(batch_size=2, backend="onnx", onnx_cache_dir=cache_dir)
    )


def _cached_files(cache_dir):
    return sorted(p for p in cache_dir.iterdir() if not p.name.startswith("."))


def test_onnx_logits_and_verdicts_match_eager(bundle, eager, tmp_path):
    engine = _onnx_engine(bundle, tmp_path)
    assert engine.backend == "onnx"
    images = _images(5, seed=4)  # batches of 2: two full and one partial
    expected = eager.member_logits(images)
    logits = engine.member_logits(images)
    assert np.abs(expected).max() > 1e-3  # the comparison below compares something
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    for i in range(len(images)):
        uids = [f"1.2.3.{i}"]
        ours = engine.triage(f"1.2.{i}", images[i : i + 1], uids)
        theirs = eager.triage(f"1.2.{i}", images[i : i + 1], uids)
        assert ours.verdict == theirs.verdict
        assert ours.risk_tier == theirs.risk_tier
        assert ours.abnormality_score == pytest.approx(theirs.abnormality_score, abs=1e-4)


def test_onnx_without_a_cache_dir_exports_in_memory(bundle, eager):
    engine = InferenceEngine(bundle, EngineOptions(backend="onnx"))
    images = _images(2, seed=5)
    np.testing.assert_allclose(
        engine.member_logits(images), eager.member_logits(images), atol=1e-4
    )


def test_cache_is_reused_without_exporting_again(bundle, tmp_path, monkeypatch):
    first = _onnx_engine(bundle, tmp_path)
    files = _cached_files(tmp_path)
    assert len(files) == len(bundle.manifest.findings)
    stamps = {p.name: p.stat().st_mtime_ns for p in files}

    def no_export(*_args, **_kwargs):
        raise AssertionError("a cached member was exported again")

    monkeypatch.setattr(onnx_backend, "export_member", no_export)
    second = _onnx_engine(bundle, tmp_path)
    assert {p.name: p.stat().st_mtime_ns for p in _cached_files(tmp_path)} == stamps
    images = _images(3, seed=6)
    np.testing.assert_array_equal(second.member_logits(images), first.member_logits(images))


def test_a_cache_file_that_does_not_match_its_hash_is_rebuilt(bundle, eager, tmp_path, caplog):
    _onnx_engine(bundle, tmp_path)
    files = _cached_files(tmp_path)
    # Another member's graph under this member's name: a valid model that gives other logits,
    # so trusting it could not go unnoticed.
    victim, other = files[0], files[1]
    victim.write_bytes(other.read_bytes())
    with caplog.at_level(logging.WARNING, logger="scxnn_node.model.onnx_backend"):
        engine = _onnx_engine(bundle, tmp_path)
    assert "does not match its sha256" in caplog.text
    images = _images(3, seed=7)
    np.testing.assert_allclose(engine.member_logits(images), eager.member_logits(images), atol=1e-4)
    rebuilt = _cached_files(tmp_path)
    assert len(rebuilt) == len(files)
    for path in rebuilt:  # every file's name again names its own content
        assert path.name.split(".")[1] == onnx_backend.sha256_bytes(path.read_bytes())


def test_a_truncated_cache_file_is_rebuilt(bundle, eager, tmp_path):
    _onnx_engine(bundle, tmp_path)
    victim = _cached_files(tmp_path)[0]
    victim.write_bytes(victim.read_bytes()[:1000])
    engine = _onnx_engine(bundle, tmp_path)
    images = _images(2, seed=8)
    np.testing.assert_allclose(engine.member_logits(images), eager.member_logits(images), atol=1e-4)


def test_cache_key_names_what_the_graph_depends_on():
    key = onnx_backend.cache_key("a" * 64, "densenet121", 1024)
    assert key == onnx_backend.cache_key("a" * 64, "densenet121", 1024)
    assert key != onnx_backend.cache_key("b" * 64, "densenet121", 1024)
    assert key != onnx_backend.cache_key("a" * 64, "densenet_small", 1024)
    assert key != onnx_backend.cache_key("a" * 64, "densenet121", 512)


def test_onnx_runs_on_the_cpu_at_fp32_only():
    with pytest.raises(ValueError, match="onnx"):
        EngineOptions(device="cuda:0", backend="onnx")
    with pytest.raises(ValueError, match="onnx"):
        EngineOptions(backend="onnx", precision="bf16")
    assert EngineOptions(backend="onnx", precision="fp32").backend == "onnx"


def test_onnxruntime_is_imported_only_where_an_onnx_engine_is_built():
    code = (
        "import sys\n"
        "import scxnn_node.model.engine, scxnn_node.config, scxnn_node.cli\n"
        "print('onnxruntime' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert out.stdout.strip() == "False"
