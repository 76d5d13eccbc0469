"""GPU decoding (imaging/gpu_decode.py): the same pixels as the CPU decoders, and the CPU as the
fallback whenever the GPU refuses.

The plugin's glue to pydicom (layout, checks, fallback) is tested everywhere with a stand-in
for nvImageCodec's decoder that decodes on the CPU (OpenJPEG) or fails; the real nvImageCodec on
a CUDA device is tested where both exist (bench/gpu_session.sh runs this file there).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import openjpeg
import pytest
import torch
from dicom_factory import chest_pixels, make_dataset, write
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import JPEG2000Lossless, JPEGBaseline8Bit

from scxnn_node.imaging import gpu_decode
from scxnn_node.imaging.decode import load_image
from scxnn_node.imaging.preprocess import PreprocessSpec
from scxnn_node.testing.samples import SAMPLE_DX
from scxnn_node.triage import prepare_instance

SAMPLES = SAMPLE_DX.parent
GPU = torch.cuda.is_available() and importlib.util.find_spec("nvidia.nvimgcodec") is not None


class _StandInImage:
    def __init__(self, pixels: np.ndarray) -> None:
        self.pixels = pixels

    def cpu(self) -> np.ndarray:
        return self.pixels[:, :, None]  # nvImageCodec gives (rows, columns, samples)


class _OpenJpegStandIn:
    """Decodes JPEG 2000 on the CPU as nvImageCodec would hand it over; counts its calls."""

    def __init__(self, result: str = "decode") -> None:
        self.result = result
        self.calls = 0

    def decode(self, src: bytes, params: object = None) -> _StandInImage | None:
        self.calls += 1
        if self.result == "none":
            return None
        if self.result == "raise":
            raise RuntimeError("device lost")
        return _StandInImage(openjpeg.decode(bytes(src)))


@pytest.fixture
def stand_in(monkeypatch):
    """The plugin registered with pydicom around a stand-in decoder; removed afterwards."""
    from pydicom.pixels import get_decoder

    def install(result: str = "decode") -> _OpenJpegStandIn:
        decoder = _OpenJpegStandIn(result)
        monkeypatch.setattr(gpu_decode, "_decoder", decoder)
        for syntax in gpu_decode.GPU_SYNTAXES:
            get_decoder(syntax).add_plugin(gpu_decode.PLUGIN, (gpu_decode.__name__, "decode_frame"))
        return decoder

    yield install
    gpu_decode.disable_gpu_decoding()


def _j2k_lossless(tmp_path: Path, bits: int, seed: int, name: str = "j2k.dcm"):
    pixels = chest_pixels(160, seed=seed, bits=bits)
    ds = make_dataset(pixels, bits_stored=bits)
    ds.compress(JPEG2000Lossless)
    return write(ds, tmp_path / name), pixels


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_plugin_hands_pydicom_the_same_pixels_as_the_cpu_path(tmp_path, stand_in, bits):
    path, pixels = _j2k_lossless(tmp_path, bits, seed=bits)
    cpu = load_image(path).pixels
    decoder = stand_in()
    via_plugin = load_image(path).pixels
    assert decoder.calls == 1  # the plugin, not the CPU path, decoded it
    np.testing.assert_array_equal(via_plugin, cpu)
    np.testing.assert_array_equal(via_plugin, pixels)


@pytest.mark.parametrize("result", ["none", "raise"])
def test_a_refusing_gpu_falls_back_to_the_cpu(tmp_path, stand_in, result):
    path, pixels = _j2k_lossless(tmp_path, 12, seed=7)
    decoder = stand_in(result)
    np.testing.assert_array_equal(load_image(path).pixels, pixels)
    assert decoder.calls == 1


def test_signed_and_unlisted_syntaxes_stay_on_the_cpu(tmp_path, stand_in):
    decoder = stand_in()
    stored = chest_pixels(96, seed=5, bits=12).astype(np.int16) - 2048
    signed = make_dataset(stored, bits_stored=12)
    signed.compress(JPEG2000Lossless)
    np.testing.assert_array_equal(load_image(write(signed, tmp_path / "s.dcm")).pixels, stored)
    assert decoder.calls == 0  # not offered to the GPU (pixel representation 1)
    load_image(SAMPLES / "nih_dx_no_finding.dcm")  # uncompressed: no plugin involved
    assert decoder.calls == 0


def test_without_nvimgcodec_or_a_device_decoding_stays_on_the_cpu(tmp_path):
    if GPU:
        pytest.skip("nvImageCodec and a device are here: GPU decoding would be enabled")
    assert gpu_decode.enable_gpu_decoding(0) is False
    path, pixels = _j2k_lossless(tmp_path, 12, seed=8)
    assert not gpu_decode.accepts(load_image(path).dataset, JPEG2000Lossless)
    np.testing.assert_array_equal(load_image(path).pixels, pixels)


def test_nvimgcodec_is_held_to_its_gpu_backends_and_one_cpu_thread(monkeypatch):
    """Left to choose, nvImageCodec decodes JPEG 2000 with its own CPU codec at full CPU cost."""
    made: list[dict] = []

    class Backend:
        def __init__(self, kind: str) -> None:
            self.kind = kind

    module = types.ModuleType("nvidia.nvimgcodec")
    module.Backend = Backend  # type: ignore[attr-defined]
    module.BackendKind = types.SimpleNamespace(  # type: ignore[attr-defined]
        CPU_ONLY="cpu", GPU_ONLY="gpu", HYBRID_CPU_GPU="hybrid", HW_GPU_ONLY="hw"
    )
    module.Decoder = lambda **kwargs: made.append(kwargs) or object()  # type: ignore[attr-defined]
    module.CodeStream = bytes  # type: ignore[attr-defined]
    module.DecodeParams = lambda **kwargs: kwargs  # type: ignore[attr-defined]
    module.ColorSpec = types.SimpleNamespace(UNCHANGED="unchanged")  # type: ignore[attr-defined]
    nvidia = types.ModuleType("nvidia")
    nvidia.nvimgcodec = module  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "nvidia", nvidia)
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", module)
    monkeypatch.setattr(gpu_decode, "_decoder", None)
    try:
        assert gpu_decode.enable_gpu_decoding(0)
    finally:
        gpu_decode.disable_gpu_decoding()
    (kwargs,) = made
    assert kwargs["device_id"] == 0 and kwargs["max_num_cpu_threads"] == 1
    assert sorted(b.kind for b in kwargs["backends"]) == ["gpu", "hybrid"]


@pytest.mark.skipif(not GPU, reason="needs nvImageCodec and a CUDA device (gpu_session.sh)")
class TestOnTheGpu:
    @pytest.fixture(autouse=True)
    def enabled(self):
        assert gpu_decode.enable_gpu_decoding(0)
        yield
        gpu_decode.disable_gpu_decoding()

    @pytest.mark.parametrize("bits", [8, 12, 16])
    def test_jpeg2000_lossless_gives_the_cpu_pixels(self, tmp_path, bits, caplog):
        path, pixels = _j2k_lossless(tmp_path, bits, seed=20 + bits)
        with caplog.at_level("INFO", logger="scxnn_node.imaging.decode"):
            np.testing.assert_array_equal(load_image(path).pixels, pixels)
        assert "GPU decoding refused" not in caplog.text  # the GPU decoded it, not our CPU

    def test_real_jpeg_baseline_radiograph_matches_the_cpu(self):
        path = SAMPLES / "siim_cr_negative.dcm"  # real CR, JPEG baseline
        gpu = load_image(path).pixels.astype(np.int64)  # stored uint8: no wrap below
        gpu_decode.disable_gpu_decoding()
        cpu = load_image(path).pixels
        # Lossy JPEG: the IDCTs of nvJPEG and libjpeg may round differently by a grey level.
        assert np.abs(gpu - cpu).max() <= 2 and np.abs(gpu - cpu).mean() < 0.1

    def test_real_radiograph_in_jpeg2000_preprocesses_identically(self, tmp_path):
        import pydicom

        ds = pydicom.dcmread(SAMPLES / "nih_dx_no_finding.dcm")
        ds.compress(JPEG2000Lossless)
        path = write(ds, tmp_path / "real-j2k.dcm")
        spec = PreprocessSpec(size=256)
        gpu = prepare_instance(path, spec).image
        gpu_decode.disable_gpu_decoding()
        np.testing.assert_array_equal(gpu, prepare_instance(path, spec).image)
        assert JPEGBaseline8Bit in gpu_decode.GPU_SYNTAXES


class _WrongShapeStandIn(_OpenJpegStandIn):
    """A GPU decoder that hands back the image transposed: the plugin must refuse it."""

    def decode(self, src: bytes, params: object = None) -> _StandInImage | None:
        self.calls += 1
        return _StandInImage(np.ascontiguousarray(openjpeg.decode(bytes(src)).T))


def test_a_gpu_image_of_another_shape_is_refused_and_the_cpu_decodes(tmp_path, stand_in):
    pixels = chest_pixels(160, seed=9, bits=12)[:, :120]  # not square: transposing shows
    ds = make_dataset(np.ascontiguousarray(pixels), bits_stored=12)
    ds.compress(JPEG2000Lossless)
    path = write(ds, tmp_path / "wide.dcm")
    decoder = stand_in()
    wrong = _WrongShapeStandIn()
    gpu_decode._decoder = wrong  # the fixture's monkeypatch restores it
    np.testing.assert_array_equal(load_image(path).pixels, pixels)
    assert wrong.calls == 1 and decoder.calls == 0


@settings(max_examples=15, deadline=None, derandomize=True)
@given(
    rows=st.integers(64, 200),
    columns=st.integers(64, 200),
    bits=st.integers(8, 16),
    seed=st.integers(0, 2**16),
)
def test_generated_images_come_through_the_plugin_as_the_cpu_decodes_them(
    rows, columns, bits, seed
):
    from pydicom.pixels import get_decoder

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 2**bits, (rows, columns)).astype(np.uint8 if bits <= 8 else np.uint16)
    ds = make_dataset(pixels, bits_stored=bits)
    ds.compress(JPEG2000Lossless)
    decoder = _OpenJpegStandIn()
    gpu_decode._decoder = decoder
    try:
        for syntax in gpu_decode.GPU_SYNTAXES:
            get_decoder(syntax).add_plugin(gpu_decode.PLUGIN, (gpu_decode.__name__, "decode_frame"))
        from scxnn_node.imaging.decode import decode_pixels

        np.testing.assert_array_equal(decode_pixels(ds).pixels, pixels)
        assert decoder.calls == 1
    finally:
        gpu_decode.disable_gpu_decoding()
