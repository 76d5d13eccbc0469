"""The batched engine and how logits become a study result."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from scxnn_node.model.bundle import load_bundle
from scxnn_node.model.decision import result_from_logits
from scxnn_node.model.engine import InferenceEngine, max_batch_for_memory
from scxnn_node.model.member import MemberNet
from scxnn_node.model.options import EngineOptions
from scxnn_node.model.result import UNSPECIFIED_TIER, MemberCall, StudyResult, Verdict


@pytest.fixture(scope="module")
def bundle(small_bundle_dir):
    return load_bundle(small_bundle_dir)


def _images(n, size=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def test_logits_match_a_plain_forward_pass(bundle):
    engine = InferenceEngine(bundle, EngineOptions(batch_size=2))
    images = _images(3)
    logits = engine.member_logits(images)
    assert logits.shape == (3, 3, 3)
    reference = MemberNet("densenet_small", with_decoder=False).eval()
    reference.load_state_dict(bundle.member_weights["nodule"])
    with torch.no_grad():
        expected = reference(torch.from_numpy(images).unsqueeze(1).float() / 255).numpy()
    np.testing.assert_allclose(logits[:, 1], expected, atol=1e-4)


def test_batch_size_and_layout_do_not_change_results(bundle):
    images = _images(5, seed=1)
    a = InferenceEngine(bundle, EngineOptions(batch_size=1, channels_last=False)).member_logits(
        images
    )
    b = InferenceEngine(bundle, EngineOptions(batch_size=4, channels_last=True)).member_logits(
        images
    )
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_bf16_autocast_on_cpu_stays_close(bundle):
    images = _images(2, seed=2)
    fp32 = InferenceEngine(bundle, EngineOptions(precision="fp32")).member_logits(images)
    bf16 = InferenceEngine(bundle, EngineOptions(precision="bf16")).member_logits(images)
    assert np.abs(fp32 - bf16).max() < 0.25


def test_compile_backend_matches_eager(bundle):
    images = _images(3, seed=3)  # 3 images in batches of 2: a full and a partial batch
    eager = InferenceEngine(bundle, EngineOptions(batch_size=2, backend="eager"))
    compiled = InferenceEngine(bundle, EngineOptions(batch_size=2, backend="compile"))
    np.testing.assert_allclose(
        compiled.member_logits(images), eager.member_logits(images), atol=1e-4
    )
    with pytest.raises(ValueError, match="backend"):
        EngineOptions(backend="tensorrt")


def test_engine_refuses_wrong_input(bundle):
    engine = InferenceEngine(bundle, EngineOptions(batch_size=1))
    with pytest.raises(ValueError, match="uint8"):
        engine.member_logits(np.zeros((1, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="device"):
        EngineOptions(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            InferenceEngine(bundle, EngineOptions(device="cuda:0"))


def test_memory_bound_batch():
    assert max_batch_for_memory("densenet121", 1024, 1 << 30) == 1
    assert max_batch_for_memory("densenet121", 1024, 64 << 30) == 16
    assert 1 < max_batch_for_memory("densenet121", 1024, 4 << 30) < 16


def _logits(calls: dict[int, str], n_members=3) -> np.ndarray:
    """One image's logits with a confident call per member (default normal)."""
    out = np.zeros((1, n_members, 3))
    for m in range(n_members):
        out[0, m, ["normal", "target", "others"].index(calls.get(m, "normal"))] = 6.0
    return out


def _at(bundle, threshold: float):
    """The same bundle with another operating threshold."""
    op = replace(bundle.manifest.operating_point, threshold=threshold)
    return replace(bundle, manifest=replace(bundle.manifest, operating_point=op))


def test_critical_target_gives_critical_tier(bundle):
    result = result_from_logits(
        _at(bundle, -1e9), "1.2.3", _logits({0: "target", 1: "target"}), ["x"]
    )
    assert result.verdict is Verdict.ABNORMAL
    assert result.risk_tier == "critical"  # pneumothorax beats nodule
    assert [f.name for f in result.flagged_findings] == ["pneumothorax", "nodule"]
    assert result.findings[0].call is MemberCall.TARGET
    assert result.findings[2].call is MemberCall.NORMAL


def test_only_others_gives_abnormal_unspecified(bundle):
    result = result_from_logits(
        _at(bundle, -1e9), "1.2.3", _logits({0: "others", 2: "others"}), ["x"]
    )
    assert result.verdict is Verdict.ABNORMAL
    assert result.risk_tier == UNSPECIFIED_TIER
    assert "abnormal, unspecified" in result.reason


def test_below_threshold_is_definite_normal_without_tier(bundle):
    result = result_from_logits(_at(bundle, 1e9), "1.2.3", _logits({1: "target"}), ["x"])
    assert result.verdict is Verdict.DEFINITE_NORMAL and result.risk_tier is None
    assert result.threshold == 1e9


def test_study_of_several_images_takes_the_worst(bundle):
    bundle = _at(bundle, -1e9)
    logits = np.concatenate([_logits({}), _logits({2: "target"}), _logits({0: "others"})])
    result = result_from_logits(bundle, "1.2.3", logits, ["a", "b", "c"])
    calls = {f.name: f.call for f in result.findings}
    assert calls == {
        "pneumothorax": MemberCall.OTHERS,
        "nodule": MemberCall.NORMAL,
        "cardiomegaly": MemberCall.TARGET,
    }
    assert result.risk_tier == "cardiomegaly"
    assert result.findings[2].probabilities["target"] > 0.99  # from the image that saw it
    single = [
        result_from_logits(bundle, "1.2.3", logits[i : i + 1], ["a"]).abnormality_score
        for i in range(3)
    ]
    assert result.abnormality_score == pytest.approx(max(single))


def test_result_validation():
    from scxnn_node.model.result import BundleIdentity

    ident = BundleIdentity("b", "1.0.0", False)
    with pytest.raises(ValueError, match="reason"):
        StudyResult("1", Verdict.NOT_ANALYSED, None, None, None, None, (), ident)
    with pytest.raises(ValueError, match="risk_tier"):
        StudyResult("1", Verdict.NOT_ANALYSED, "x", "critical", None, None, (), ident)


def test_fused_member_equals_the_member():
    """Folding BN and the concatenation buffer change nothing but speed (both layouts)."""
    from scxnn_node.model.fused import FusedMember

    torch.manual_seed(0)
    member = MemberNet("densenet121", with_decoder=False).eval()
    for module in member.modules():  # non-trivial running statistics, as after training
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    fused = FusedMember(member).eval()
    x = torch.rand(2, 1, 96, 96)
    with torch.inference_mode():
        expected = member(x)
        torch.testing.assert_close(fused(x), expected, atol=1e-4, rtol=1e-4)
        fused_cl = fused.to(memory_format=torch.channels_last)
        got = fused_cl(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_default_batch_size_on_cpu_is_one_at_full_resolution():
    from scxnn_node.model.engine import default_batch_size

    cpu = torch.device("cpu")
    assert default_batch_size(cpu, "densenet121", 1024) == 1
    assert default_batch_size(cpu, "densenet_small", 64) > 1


def test_gpu_only_options_are_refused_on_the_cpu_with_their_name():
    from scxnn_node.config import ModelSection

    with pytest.raises(ValueError, match="cuda_graph"):
        EngineOptions(device="cpu", backend="cuda_graph")
    with pytest.raises(ValueError, match="member_streams"):
        EngineOptions(device="cpu", member_streams=2)
    with pytest.raises(ValueError, match="compile_mode"):
        EngineOptions(compile_mode="fastest")
    assert EngineOptions(device="cuda:0", backend="cuda_graph", member_streams=4).member_streams
    # config.yaml's model section applies the same rules at load, per device.
    with pytest.raises(ValueError, match="cuda_graph"):
        ModelSection(devices=["cuda:0", "cpu"], backend="cuda_graph")
    section = ModelSection(
        devices=["cuda:1"], backend="compile", compile_mode="max-autotune", member_streams=3
    )
    options = section.engine_options("cuda:1", None)
    assert (options.backend, options.compile_mode, options.member_streams) == (
        "compile",
        "max-autotune",
        3,
    )


def test_cuda_graph_shapes_cover_every_batch_with_few_graphs():
    from scxnn_node.model.cuda_graph import graph_shapes

    for batch_size in (1, 2, 7, 16, 48):
        shapes = graph_shapes(batch_size)
        assert shapes[-1] == batch_size and shapes == sorted(set(shapes))
        assert len(shapes) <= batch_size.bit_length() + 1
        for n in range(1, batch_size + 1):  # the graph a batch of n replays
            shape = next(s for s in shapes if s >= n)
            assert shape < 2 * n or shape == batch_size


def test_auto_backend_is_the_measured_fastest_per_device():
    from scxnn_node.model.options import resolve_backend

    assert resolve_backend("auto", "cpu", "auto") == "onnx"
    assert resolve_backend("auto", "cpu", "bf16") == "eager"  # ONNX Runtime here is fp32 only
    assert resolve_backend("auto", "cuda:0", "auto") == "compile"  # replayed in CUDA graphs
    assert resolve_backend("eager", "cuda:1", "bf16") == "eager"  # an explicit choice stands


class _CompilerMissing(torch.nn.Module):
    """What torch.compile gives where Inductor cannot build its kernels: fails when called."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("InductorError: no working C compiler found")


def test_auto_falls_back_when_compile_fails_but_a_named_compile_fails(bundle, monkeypatch, caplog):
    import scxnn_node.model.engine as engine_module

    monkeypatch.setattr(  # auto resolved as on CUDA
        engine_module,
        "resolve_backend",
        lambda backend, *_: "compile" if backend == "auto" else backend,
    )
    monkeypatch.setattr(torch, "compile", lambda module, **_: _CompilerMissing())
    images = _images(3, seed=7)
    engine = InferenceEngine(bundle, EngineOptions(batch_size=2, backend="auto"))
    assert engine.backend == "eager" and "torch.compile failed" in caplog.text
    expected = InferenceEngine(bundle, EngineOptions(batch_size=2, backend="eager"))
    np.testing.assert_allclose(
        engine.member_logits(images), expected.member_logits(images), atol=1e-5
    )
    with pytest.raises(RuntimeError, match="C compiler"):
        InferenceEngine(bundle, EngineOptions(batch_size=2, backend="compile"))


def test_members_are_built_on_one_thread_and_the_count_comes_back(bundle, monkeypatch):
    """Thousands of tiny operations: a thread pool costs more than it gives (README, "Speed")."""
    import scxnn_node.model.engine as engine_module
    from scxnn_node.model.fused import FusedMember

    seen: list[int] = []

    def counting(member):
        seen.append(torch.get_num_threads())
        return FusedMember(member)

    monkeypatch.setattr(engine_module, "FusedMember", counting)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        InferenceEngine(bundle, EngineOptions(batch_size=2, backend="eager"))
        assert seen and set(seen) == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
