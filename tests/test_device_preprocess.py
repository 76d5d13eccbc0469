"""Preprocessing in torch on a device (imaging/device_preprocess.py): OpenCV's pixels, bit for
bit, whatever the image, the spec or the device; a failing device costs no instance.

Everything runs on the CPU's torch here (the same operations a CUDA device runs); the same
checks on CUDA run where one is lent (bench/gpu_session.sh runs this file there).
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import DATA
from dicom_factory import chest_pixels, make_dataset, write
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from scxnn_node.decode_pool import DecodePool, decode_spooled_instance
from scxnn_node.imaging import device_preprocess
from scxnn_node.imaging.decode import load_image
from scxnn_node.imaging.device_preprocess import (
    clahe_as_opencv,
    preprocess_on_device,
    preprocess_or_fall_back,
    resize_area_as_opencv,
)
from scxnn_node.imaging.preprocess import PreprocessSpec, preprocess_with_windowed_mean
from scxnn_node.triage import prepare_instance

DEVICES = ["cpu"] + (["cuda:0"] if torch.cuda.is_available() else [])
REAL_FILES = sorted(DATA.glob("*.dcm"))


def _equal_to_cpu(pixels: np.ndarray, spec: PreprocessSpec, device: str) -> None:
    expected, expected_mean = preprocess_with_windowed_mean(pixels, spec)
    got, mean = preprocess_on_device(pixels, spec, device)
    assert got.dtype == np.uint8 and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    assert mean == expected_mean


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: p.stem)
@pytest.mark.parametrize("size", [1024, 256])
def test_real_radiographs_give_opencvs_pixels(path: Path, size: int, device: str):
    _equal_to_cpu(load_image(path).pixels, PreprocessSpec(size=size), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", [2500, 3000, 2048])
def test_detector_sized_images_give_opencvs_pixels(side: int, device: str):
    """What a site sends: 12-bit, 2-3k px, off-square; 2048 -> 1024 is OpenCV's halving path."""
    pixels = cv2.resize(
        load_image(DATA / "nih_dx_no_finding.dcm").pixels.astype(np.float32),
        (side - 160, side),
        interpolation=cv2.INTER_CUBIC,
    )
    stored = np.clip(pixels * 16, 0, 4095).astype(np.uint16)
    _equal_to_cpu(stored, PreprocessSpec(), device)


_DTYPES = st.sampled_from([np.uint8, np.uint16, np.int16, np.int32, np.float32, np.int64])


@st.composite
def _images(draw: st.DrawFn) -> np.ndarray:
    dtype = np.dtype(draw(_DTYPES))
    height, width = draw(st.integers(1, 90)), draw(st.integers(1, 90))
    if dtype.kind == "f":
        elements = st.floats(-3000, 3000, width=32)
    else:
        info = np.iinfo(dtype)
        elements = st.integers(max(int(info.min), -70000), min(int(info.max), 70000))
    return draw(arrays(dtype, (height, width), elements=elements))


@st.composite
def _specs(draw: st.DrawFn) -> PreprocessSpec:
    lower = draw(st.floats(0, 20))
    return PreprocessSpec(
        size=draw(st.integers(32, 96)),
        lower_percentile=lower,
        upper_percentile=draw(st.floats(lower + 1, 100)),
        clahe_clip_limit=draw(st.floats(0.01, 40)),
        clahe_tile_grid=draw(st.integers(1, 16)),
        interpolation=draw(st.sampled_from(["area", "area", "linear", "cubic"])),
    )


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=200, deadline=None)
@given(pixels=_images(), spec=_specs())
def test_any_image_and_spec_give_opencvs_pixels(
    pixels: np.ndarray, spec: PreprocessSpec, device: str
):
    """Shapes that no grid divides, one-pixel sides (reflection past the edge), flat images,
    values over more than 16 bits (windowed on the host), fractions, every interpolation."""
    _equal_to_cpu(pixels, spec, device)


@settings(max_examples=150, deadline=None)
@given(
    image=arrays(
        np.uint8,
        st.tuples(st.integers(1, 200), st.integers(1, 200)),
        elements=st.integers(0, 255),
    ),
    clip=st.floats(0.01, 60),
    grid=st.integers(1, 20),
)
def test_clahe_is_opencvs(image: np.ndarray, clip: float, grid: int):
    expected = cv2.createCLAHE(clipLimit=clip, tileGridSize=(grid, grid)).apply(image)
    got = clahe_as_opencv(torch.from_numpy(image), clip, grid).numpy()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_clahe_of_smooth_large_image_is_opencvs(device: str):
    """Smooth gradients put many pixels near the rounding midpoints: float32 order matters."""
    rows, columns = np.mgrid[0:1500, 0:1500]
    image = ((np.sin(rows / 97.0) * np.cos(columns / 53.0) + 1) * 127.5).astype(np.uint8)
    expected = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(image)
    got = clahe_as_opencv(torch.from_numpy(image).to(device), 2.0, 8).cpu().numpy()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "side,size",
    [(2500, 1024), (2048, 1024), (3072, 1024), (4096, 1024), (1025, 1024), (999, 333), (65, 32)],
)
def test_area_resize_is_opencvs(side: int, size: int, device: str):
    rng = np.random.default_rng(side)
    noise = rng.integers(0, 256, (side, side), dtype=np.uint8)
    for image in (noise, cv2.GaussianBlur(noise, (0, 0), 3)):
        expected = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
        got = resize_area_as_opencv(torch.from_numpy(image).to(device), size).cpu().numpy()
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("shape", [(61, 61), (200, 37), (37, 200), (130, 131)])
def test_clahe_in_blocks_of_a_few_rows_is_opencvs(shape: tuple[int, int], monkeypatch):
    """Images far larger than a block are done block by block: blocks of 97 pixels (one row,
    or a few, ending anywhere in a tile) must give the pixels of one block."""
    monkeypatch.setattr(device_preprocess, "_BLOCK_PIXELS", 97)
    image = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    for grid in (1, 3, 8):
        expected = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(grid, grid)).apply(image)
        got = clahe_as_opencv(torch.from_numpy(image), 2.0, grid).numpy()
        np.testing.assert_array_equal(got, expected)


def test_area_resize_refuses_what_it_does_not_shrink():
    with pytest.raises(ValueError, match="shrinks a square image"):
        resize_area_as_opencv(torch.zeros((10, 12), dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="shrinks a square image"):
        resize_area_as_opencv(torch.zeros((10, 10), dtype=torch.uint8), 10)


def test_a_failing_device_preprocesses_on_the_cpu(caplog, monkeypatch):
    """A device that fails (here torch's meta device, which holds no data to copy back) costs
    time, not the instance: the CPU's pixels, one warning, and the device is not asked again."""
    monkeypatch.setattr(device_preprocess, "_failed_on", set())
    pixels = load_image(DATA / "siim_cr_negative.dcm").pixels
    spec = PreprocessSpec(size=128)
    expected, expected_mean = preprocess_with_windowed_mean(pixels, spec)
    with caplog.at_level(logging.WARNING, logger=device_preprocess.__name__):
        for _ in range(2):
            got, mean = preprocess_or_fall_back(pixels, spec, "meta")
            np.testing.assert_array_equal(got, expected)
            assert mean == expected_mean
    failures = [r for r in caplog.records if "preprocessing on meta failed" in r.message]
    assert len(failures) == 1
    with pytest.raises(ValueError, match="2-D grayscale"):
        preprocess_or_fall_back(np.zeros((4, 4, 3), np.uint8), spec, "cpu")


def test_an_image_beyond_the_devices_memory_goes_to_the_cpu_alone(caplog, monkeypatch):
    """Out of device memory is about one image (the process's share of the device is capped):
    that image is preprocessed on the CPU, the next ones on the device again. The device's
    refusal is played by a stand-in: no CUDA device here."""
    monkeypatch.setattr(device_preprocess, "_failed_on", set())
    calls = []
    on_device = device_preprocess.preprocess_on_device

    def first_out_of_memory(pixels, spec, device):
        calls.append(pixels.shape)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return on_device(pixels, spec, "cpu")

    monkeypatch.setattr(device_preprocess, "preprocess_on_device", first_out_of_memory)
    pixels = load_image(DATA / "nih_dx_no_finding.dcm").pixels
    spec = PreprocessSpec(size=128)
    expected, _ = preprocess_with_windowed_mean(pixels, spec)
    with caplog.at_level(logging.WARNING, logger=device_preprocess.__name__):
        for _ in range(3):
            np.testing.assert_array_equal(
                preprocess_or_fall_back(pixels, spec, "cuda:0")[0], expected
            )
    assert len(calls) == 3  # the device was asked again after the refusal
    assert "cuda:0" not in device_preprocess._failed_on
    assert [r.message for r in caplog.records if "out of this process's device memory" in r.message]


def test_a_device_that_cannot_start_is_not_used(caplog, monkeypatch):
    """No such CUDA device (index 99, on any machine): the start says so and never raises, and
    every image is preprocessed on the CPU without asking the device again."""
    monkeypatch.setattr(device_preprocess, "_failed_on", set())
    with caplog.at_level(logging.WARNING, logger=device_preprocess.__name__):
        device_preprocess.warm_up("cuda:99")
    assert "cuda:99" in device_preprocess._failed_on
    assert [r for r in caplog.records if "cuda:99 did not start" in r.message]
    pixels = load_image(DATA / "siim_cr_negative.dcm").pixels
    spec = PreprocessSpec(size=64)
    got, _ = preprocess_or_fall_back(pixels, spec, "cuda:99")
    np.testing.assert_array_equal(got, preprocess_with_windowed_mean(pixels, spec)[0])


@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: p.stem)
def test_prepare_instance_on_a_device_is_the_same_instance(path: Path):
    spec = PreprocessSpec(size=256)
    on_cpu = prepare_instance(path, spec)
    on_device = prepare_instance(path, spec, preprocess_device="cpu")
    np.testing.assert_array_equal(on_device.image, on_cpu.image)
    assert on_device.windowed_mean == on_cpu.windowed_mean
    assert on_device.flags == on_cpu.flags


@pytest.mark.parametrize("device", ["cpu", "cuda:99"])
def test_a_decode_process_preprocessing_on_a_device_gives_the_inline_pixels(tmp_path, device):
    """The pool's own processes (spawned, torch imported there only for this) with a
    preprocessing device, one that works and one that cannot start: the same prepared images
    as decodes inline on the CPU, and the pool stays whole."""
    spec = PreprocessSpec(size=128)
    jobs = []
    for seed in range(3):
        ds = make_dataset(chest_pixels(300, seed=seed)[:, :260])
        path = write(ds, tmp_path / f"instance{seed}.dcm")
        jobs.append((path, str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), spec))
    with DecodePool(1, preprocess_device=device) as pool:
        pool.start()
        decoded = [pool.submit(*job, None).result(timeout=120) for job in jobs]
        assert pool._executor is not None and not pool._executor._broken
    for job, there in zip(jobs, decoded, strict=True):
        inline = decode_spooled_instance(*job)
        assert there.unusable is None and inline.unusable is None
        np.testing.assert_array_equal(there.prepared.image, inline.prepared.image)
        assert there.prepared.windowed_mean == inline.prepared.windowed_mean
