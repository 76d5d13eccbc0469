"""GPU backends against eager: CUDA graphs, member streams, torch.compile, half precision.

These need a CUDA device; on the CPU-only CI machine they do not run (their CPU-side rules are
in tests/test_engine.py). bench/gpu_session.sh runs this file first on the lent GPU machine and
keeps its log beside the figures.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from scxnn_node.findings import THESIS_CATALOGUE
from scxnn_node.model.bundle import load_bundle
from scxnn_node.model.decision import result_from_logits
from scxnn_node.model.engine import InferenceEngine
from scxnn_node.model.options import EngineOptions
from scxnn_node.testing.samples import SAMPLE_DX
from scxnn_node.triage import prepare_instance
from training.untrained import untrained_bundle

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (bench/gpu_session.sh runs it)"
)

# bf16 keeps 8 bits of mantissa: logits of a few units move by a few hundredths.
HALF_TOLERANCE = 0.1


@pytest.fixture(scope="module")
def bundle(small_bundle_dir):
    return load_bundle(small_bundle_dir)


@pytest.fixture(scope="module")
def densenet121():
    """The real architecture, 5 members, at a size the whole file runs in seconds."""
    return untrained_bundle("densenet121", 256, THESIS_CATALOGUE.names[:5])


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size), dtype=np.uint8)


def _engine(bundle, **options) -> InferenceEngine:
    return InferenceEngine(bundle, EngineOptions(device="cuda:0", **options))


def test_half_precision_on_the_gpu_stays_close_to_fp32_on_the_cpu(bundle):
    images = _images(5, bundle.manifest.preprocessing.size)
    cpu = InferenceEngine(bundle, EngineOptions(device="cpu", backend="eager"))
    gpu = _engine(bundle)  # auto: bf16 where supported
    assert gpu.precision in ("bf16", "fp16")
    difference = np.abs(gpu.member_logits(images) - cpu.member_logits(images)).max()
    assert difference < HALF_TOLERANCE


@pytest.mark.parametrize("arch", ["small", "densenet121"])
def test_cuda_graphs_equal_eager_for_full_and_partial_batches(arch, bundle, densenet121):
    b = bundle if arch == "small" else densenet121
    images = _images(7, b.manifest.preprocessing.size, seed=1)  # batches of 4: 4 + 3 (padded)
    eager = _engine(b, batch_size=4, backend="eager")
    graphed = _engine(b, batch_size=4, backend="cuda_graph")
    first = graphed.member_logits(images)
    np.testing.assert_allclose(first, eager.member_logits(images), atol=HALF_TOLERANCE / 4)
    # Replays read the new input: other images give other logits, the same images the same.
    other = _images(7, b.manifest.preprocessing.size, seed=2)
    np.testing.assert_allclose(
        graphed.member_logits(other), eager.member_logits(other), atol=HALF_TOLERANCE / 4
    )
    np.testing.assert_array_equal(graphed.member_logits(images), first)
    assert sorted(graphed.graphed.captured) == [1, 2, 4]  # all captured at start; 3 -> 4


def test_member_streams_equal_one_stream(densenet121):
    images = _images(3, 256, seed=3)
    one = _engine(densenet121, batch_size=2, backend="eager").member_logits(images)
    spread = _engine(densenet121, batch_size=2, member_streams=3, backend="eager")
    np.testing.assert_allclose(spread.member_logits(images), one, atol=1e-3)
    graphed = _engine(densenet121, batch_size=2, member_streams=3, backend="cuda_graph")
    np.testing.assert_allclose(graphed.member_logits(images), one, atol=HALF_TOLERANCE / 4)


def test_compile_equals_eager(bundle):
    images = _images(3, bundle.manifest.preprocessing.size, seed=4)
    eager = _engine(bundle, batch_size=2, backend="eager").member_logits(images)
    compiled = _engine(bundle, batch_size=2, backend="compile").member_logits(images)
    np.testing.assert_allclose(compiled, eager, atol=HALF_TOLERANCE / 4)


def test_compiled_members_replay_in_cuda_graphs(bundle):
    """Mode default: Inductor's kernels captured by our graphs, every shape, new input read."""
    images = _images(7, bundle.manifest.preprocessing.size, seed=5)  # 4 + 3 (padded to 4)
    eager = _engine(bundle, batch_size=4, backend="eager").member_logits(images)
    compiled = _engine(bundle, batch_size=4, backend="compile", member_streams=2)
    assert compiled.graphed is not None and sorted(compiled.graphed.captured) == [1, 2, 4]
    np.testing.assert_allclose(compiled.member_logits(images), eager, atol=HALF_TOLERANCE / 4)
    other = _images(2, bundle.manifest.preprocessing.size, seed=6)
    np.testing.assert_allclose(
        compiled.member_logits(other),
        _engine(bundle, batch_size=4, backend="eager").member_logits(other),
        atol=HALF_TOLERANCE / 4,
    )


def test_every_backend_gives_the_cpu_verdicts_on_the_sample_radiographs(bundle):
    spec = bundle.manifest.preprocessing
    prepared = [prepare_instance(path, spec) for path in sorted(SAMPLE_DX.parent.glob("*.dcm"))]
    prepared = [p for p in prepared if p.image is not None]
    assert len(prepared) >= 2
    images = np.stack([p.image for p in prepared])

    def verdicts(engine: InferenceEngine) -> list[tuple[str, str | None, float]]:
        logits = engine.member_logits(images)
        results = [
            result_from_logits(bundle, p.study_instance_uid, logits[i : i + 1], ["x"])
            for i, p in enumerate(prepared)
        ]
        return [(r.verdict.value, r.risk_tier, r.abnormality_score) for r in results]

    reference = verdicts(InferenceEngine(bundle, EngineOptions(device="cpu", backend="eager")))
    for options in (
        {"backend": "eager"},
        {"backend": "cuda_graph"},
        {"backend": "eager", "member_streams": 2},
        {"backend": "eager", "precision": "fp32"},
        {"backend": "compile"},
    ):
        got = verdicts(_engine(bundle, **options))
        assert [v[:2] for v in got] == [v[:2] for v in reference], options
        for (_, _, score), (_, _, expected) in zip(got, reference, strict=True):
            assert score == pytest.approx(expected, abs=0.02), options
