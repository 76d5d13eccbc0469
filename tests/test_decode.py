"""Pixel decoding: real chest files, every transfer syntax encoded by real encoders, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import DATA
from dicom_factory import chest_pixels, dcmtk, make_dataset, write
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
)

from scxnn_node.imaging.decode import ImageRejected, RejectReason, load_image, read_dataset


def test_real_dx_implicit_vr_secondary_capture():
    image = load_image(DATA / "nih_dx_no_finding.dcm")
    assert image.pixels.shape == (1024, 1024)
    assert image.pixels.dtype == np.uint8  # 8-bit, no rescale: the stored integers, as they are
    assert image.transfer_syntax == ImplicitVRLittleEndian
    assert image.pixels.std() > 10  # a real radiograph, not a flat array
    assert "PixelData" not in image.dataset


def test_real_cr_jpeg_baseline():
    image = load_image(DATA / "siim_cr_negative.dcm")
    assert image.pixels.shape == (1024, 1024)
    assert image.transfer_syntax == JPEGBaseline8Bit
    assert 0 <= image.pixels.min() < image.pixels.max() <= 255


def test_real_monochrome1_is_inverted_so_bone_is_bright():
    mono2 = load_image(DATA / "siim_cr_negative.dcm").pixels
    mono1 = load_image(DATA / "siim_cr_fake_monochrome1.dcm").pixels
    # Same stored pixels, MONOCHROME1: decoding mirrors them within their range.
    np.testing.assert_array_equal(mono1, mono2.max() + mono2.min() - mono2)


@pytest.fixture
def source_12bit(tmp_path: Path) -> tuple[Path, np.ndarray]:
    pixels = chest_pixels(128, seed=1, bits=12)
    return write(make_dataset(pixels, bits_stored=12), tmp_path / "src.dcm"), pixels


@pytest.fixture
def source_8bit(tmp_path: Path) -> tuple[Path, np.ndarray]:
    pixels = chest_pixels(128, seed=2, bits=8)
    return write(make_dataset(pixels, bits_stored=8), tmp_path / "src8.dcm"), pixels


# (dcmtk tool, options, expected transfer syntax UID, lossless?)
LOSSLESS_12BIT = [
    ("dcmconv", ["+ti"], "1.2.840.10008.1.2"),
    ("dcmconv", ["+te"], "1.2.840.10008.1.2.1"),
    ("dcmconv", ["+tb"], "1.2.840.10008.1.2.2"),
    ("dcmconv", ["+td"], "1.2.840.10008.1.2.1.99"),
    ("dcmcjpeg", ["+el"], "1.2.840.10008.1.2.4.57"),
    ("dcmcjpeg", ["+e1"], "1.2.840.10008.1.2.4.70"),
    ("dcmcjpls", ["+el"], "1.2.840.10008.1.2.4.80"),
    ("dcmcrle", [], "1.2.840.10008.1.2.5"),
]


@pytest.mark.parametrize(("tool", "options", "syntax"), LOSSLESS_12BIT, ids=lambda v: str(v))
def test_lossless_syntaxes_decode_exactly(tool, options, syntax, source_12bit, tmp_path):
    src, pixels = source_12bit
    out = tmp_path / "encoded.dcm"
    dcmtk(tool, *options, src, out)
    assert str(pydicom.dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
    np.testing.assert_array_equal(load_image(out).pixels, pixels.astype(np.float32))


def test_jpeg_extended_12bit_lossy(source_12bit, tmp_path):
    src, pixels = source_12bit
    out = tmp_path / "ext.dcm"
    dcmtk("dcmcjpeg", "+ee", "+rm", src, out)  # +rm: scaling kept as rescale
    assert pydicom.dcmread(out).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.51"
    decoded = load_image(out).pixels
    assert np.abs(decoded.astype(np.int64) - pixels).mean() < 0.01 * 4095


def test_jpeg_baseline_8bit_lossy(source_8bit, tmp_path):
    src, pixels = source_8bit
    out = tmp_path / "base.dcm"
    dcmtk("dcmcjpeg", "+eb", "+rm", src, out)
    decoded = load_image(out).pixels
    assert np.abs(decoded.astype(np.int64) - pixels).mean() < 3


def test_jpeg_ls_near_lossless(source_12bit, tmp_path):
    src, pixels = source_12bit
    out = tmp_path / "jls.dcm"
    dcmtk("dcmcjpls", "+en", "+md", "2", src, out)
    assert pydicom.dcmread(out).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.81"
    assert np.abs(load_image(out).pixels.astype(np.int64) - pixels).max() <= 2


def test_jpeg2000_lossless_and_lossy(tmp_path):
    pixels = chest_pixels(128, seed=3, bits=12)
    lossless = make_dataset(pixels)
    lossless.compress(JPEG2000Lossless)
    np.testing.assert_array_equal(load_image(write(lossless, tmp_path / "j2kl.dcm")).pixels, pixels)
    lossy = make_dataset(pixels)
    lossy.compress(JPEG2000, j2k_cr=[5])
    decoded = load_image(write(lossy, tmp_path / "j2k.dcm")).pixels
    assert 0 < np.abs(decoded.astype(np.int64) - pixels).mean() < 0.01 * 4095


def test_16bit_monochrome1_jpeg2000(tmp_path):
    """The DESIGN's hard case: 16-bit MONOCHROME1 in JPEG 2000."""
    pixels = chest_pixels(128, seed=4, bits=16)
    ds = make_dataset(65535 - pixels, bits_stored=16, photometric="MONOCHROME1")
    ds.compress(JPEG2000Lossless)
    decoded = load_image(write(ds, tmp_path / "m1.dcm")).pixels
    # Inverted back: the same picture as the MONOCHROME2 original, up to an offset.
    np.testing.assert_array_equal(decoded - decoded.min(), pixels - pixels.min())


def test_signed_pixels_with_rescale(tmp_path):
    stored = chest_pixels(96, seed=5, bits=12).astype(np.int16) - 2048
    ds = make_dataset(stored, bits_stored=12, rescale=(2.0, -1024.0))
    decoded = load_image(write(ds, tmp_path / "signed.dcm")).pixels
    np.testing.assert_allclose(decoded, stored.astype(np.float32) * 2 - 1024)
    assert decoded.min() < -1024  # negative stored values survived as negative


def test_big_endian_written_by_pydicom_reads(tmp_path, source_12bit):
    src, pixels = source_12bit
    out = tmp_path / "be.dcm"
    dcmtk("dcmconv", "+tb", src, out)
    assert pydicom.dcmread(out).file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    np.testing.assert_array_equal(load_image(out).pixels, pixels)


# Refusals -------------------------------------------------------------------------------


def _reason(path: Path) -> RejectReason:
    with pytest.raises(ImageRejected) as info:
        load_image(path)
    assert info.value.message  # a sentence for the PACS admin
    return info.value.reason


def test_refuses_multi_frame(tmp_path):
    pixels = chest_pixels(64, bits=12)
    ds = make_dataset(np.concatenate([pixels, pixels]))
    ds.Rows = 64
    ds.NumberOfFrames = 2
    assert _reason(write(ds, tmp_path / "mf.dcm")) is RejectReason.MULTI_FRAME


def test_refuses_colour(tmp_path):
    ds = make_dataset(chest_pixels(64, bits=8), bits_stored=8)
    rgb = np.repeat(chest_pixels(64, bits=8)[..., None], 3, axis=2)
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.PixelData = rgb.tobytes()
    assert _reason(write(ds, tmp_path / "rgb.dcm")) is RejectReason.COLOUR


def test_refuses_missing_pixel_data(tmp_path):
    ds = make_dataset(chest_pixels(64, bits=12))
    del ds.PixelData
    assert _reason(write(ds, tmp_path / "nopix.dcm")) is RejectReason.NO_PIXEL_DATA


@pytest.mark.parametrize("shape", [(32, 128), (128, 40)])
def test_refuses_too_small(tmp_path, shape):
    ds = make_dataset(np.zeros(shape, np.uint16))
    assert _reason(write(ds, tmp_path / "small.dcm")) is RejectReason.BAD_DIMENSIONS


def test_refuses_too_large_before_decoding(tmp_path):
    ds = make_dataset(np.zeros((64, 64), np.uint16))
    ds.Rows = 9000  # the header alone decides; no 9000-row array is ever built
    assert _reason(write(ds, tmp_path / "huge.dcm")) is RejectReason.BAD_DIMENSIONS


def test_refuses_corrupt_compressed_data(tmp_path):
    ds = make_dataset(chest_pixels(64, bits=8), bits_stored=8)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([b"\xff\xd8" + b"\x00garbage" * 50 + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    assert _reason(write(ds, tmp_path / "corrupt.dcm")) is RejectReason.UNDECODABLE


def test_refuses_non_dicom(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("this is not an image\n" * 20)
    assert _reason(path) is RejectReason.NOT_DICOM


def test_refuses_truncated_file(tmp_path):
    data = (DATA / "nih_dx_no_finding.dcm").read_bytes()
    path = tmp_path / "truncated.dcm"
    path.write_bytes(data[: len(data) // 2])
    assert _reason(path) in (RejectReason.NOT_DICOM, RejectReason.UNDECODABLE)


def test_reads_bare_dataset_without_preamble(tmp_path, source_12bit):
    src, _pixels = source_12bit
    ds = pydicom.dcmread(src)
    path = tmp_path / "bare.dcm"
    ds.save_as(path, enforce_file_format=False, implicit_vr=False, little_endian=True)
    raw = path.read_bytes()
    if raw[128:132] == b"DICM":  # make sure we test the no-preamble case
        path.write_bytes(raw[132:])
    assert read_dataset(path).SOPInstanceUID == ds.SOPInstanceUID


def _modality_values_by_pydicom(ds: pydicom.Dataset) -> np.ndarray:
    """pydicom's own modality LUT, in float64: what the node's values must equal."""
    from pydicom.pixels import apply_modality_lut

    return np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)


@pytest.mark.parametrize(
    "stored_dtype, rescale, photometric, kept",
    [
        (np.uint16, None, "MONOCHROME2", np.uint16),  # no rescale: the stored integers
        (np.uint16, (1.0, 0.0), "MONOCHROME2", np.uint16),
        (np.uint16, (1.0, -1024.0), "MONOCHROME2", np.int32),  # an integer shift
        (np.int16, (1.0, 0.0), "MONOCHROME1", np.int16),  # inverted over a full signed range
        (np.uint16, (1.0, 0.0), "MONOCHROME1", np.uint16),  # max + min beyond 65535
        (np.uint16, (0.5, 0.0), "MONOCHROME2", np.float32),  # fractions: float32
    ],
)
def test_modality_values_keep_integers_and_equal_pydicoms(
    tmp_path, stored_dtype, rescale, photometric, kept
):
    rng = np.random.default_rng(7)
    info = np.iinfo(stored_dtype)
    stored = rng.integers(info.min, info.max, (96, 96), endpoint=True).astype(stored_dtype)
    stored[0, :2] = info.min, info.max  # the whole range: a mirror that must not wrap
    ds = make_dataset(stored, bits_stored=16, photometric=photometric, rescale=rescale)
    path = write(ds, tmp_path / "m.dcm")
    decoded = load_image(path).pixels
    assert decoded.dtype == kept
    expected = _modality_values_by_pydicom(pydicom.dcmread(path))
    if photometric == "MONOCHROME1":
        expected = expected.max() + expected.min() - expected
    np.testing.assert_array_equal(decoded.astype(np.float64), expected)
