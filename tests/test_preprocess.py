"""The thesis's preprocessing: one function, parameters in a frozen spec."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DATA
from dicom_factory import chest_pixels, make_dataset

from scxnn_node.imaging.decode import decode_pixels, load_image
from scxnn_node.imaging.preprocess import (
    PreprocessSpec,
    preprocess_image,
    preprocess_mask,
    window_to_uint8,
)

SPEC = PreprocessSpec(size=128)


def test_shape_dtype_range_on_real_image():
    out = preprocess_image(load_image(DATA / "nih_dx_no_finding.dcm").pixels, SPEC)
    assert out.shape == (128, 128) and out.dtype == np.uint8
    assert int(out.max()) - int(out.min()) > 200  # windowed to (nearly) the full range


def test_default_spec_is_the_thesis():
    spec = PreprocessSpec()
    assert (spec.size, spec.lower_percentile, spec.upper_percentile) == (1024, 0.5, 99.5)


def test_window_clips_at_percentiles():
    values = np.arange(10000, dtype=np.float64).reshape(100, 100)
    out = window_to_uint8(values, SPEC)
    lo, hi = np.percentile(values, [0.5, 99.5])
    assert (out[values <= lo] == 0).all() and (out[values >= hi] == 255).all()
    assert 0 < out[50, 50] < 255


def test_aspect_ratio_kept_and_padding_centred():
    img = np.full((100, 200), 1000, np.uint16)
    img[30:70, 80:120] = 3000  # a 40 x 40 square
    img += np.random.default_rng(0).integers(0, 50, img.shape, dtype=np.uint16)
    out = preprocess_image(img, PreprocessSpec(size=100, interpolation="area"))
    bright = out > 200
    rows, cols = np.nonzero(bright)
    height, width = np.ptp(rows) + 1, np.ptp(cols) + 1
    assert abs(height - width) <= 2  # the square is still square
    assert abs(height - 20) <= 2  # 200 px -> 100 px halves it
    # The wide image sits in the middle: 25 padded rows above and below, uniform.
    assert out[:24].std() == 0 and out[-24:].std() == 0
    assert out[30:70].std() > 0


def test_invariant_to_linear_intensity_change():
    pixels = chest_pixels(160, seed=7, bits=12).astype(np.float64)
    a = preprocess_image(pixels, SPEC)
    b = preprocess_image(pixels * 2 + 100, SPEC)
    np.testing.assert_array_equal(a, b)


def test_monochrome1_and_monochrome2_give_the_same_output():
    pixels = chest_pixels(160, seed=8, bits=12)
    mono2 = decode_pixels(make_dataset(pixels, photometric="MONOCHROME2"))
    mono1 = decode_pixels(make_dataset(4095 - pixels, photometric="MONOCHROME1"))
    np.testing.assert_array_equal(
        preprocess_image(mono1.pixels, SPEC), preprocess_image(mono2.pixels, SPEC)
    )


def test_deterministic():
    pixels = load_image(DATA / "siim_cr_negative.dcm").pixels
    np.testing.assert_array_equal(preprocess_image(pixels, SPEC), preprocess_image(pixels, SPEC))


def test_flat_image_gives_zeros_not_nan():
    out = preprocess_image(np.full((80, 80), 7.0), SPEC)
    assert out.shape == (128, 128) and out.std() == 0  # uniform, finite


def test_mask_follows_the_image_geometry():
    img = np.full((120, 240), 500, np.uint16)
    img[40:80, 100:140] = 3500
    mask = (img > 1000).astype(np.uint8)
    spec = PreprocessSpec(size=120)
    out_img = preprocess_image(img, spec)
    out_mask = preprocess_mask(mask, spec)
    assert out_mask.shape == (120, 120) and set(np.unique(out_mask)) == {0, 1}
    assert out_img[out_mask == 1].mean() > out_img[out_mask == 0].mean() + 100
    rows, cols = np.nonzero(out_mask)
    assert rows.min() >= 30 + 19 and cols.min() >= 49  # padded by 60 rows, then halved


@pytest.mark.parametrize(
    ("kwargs", "attribute"),
    [
        ({"size": 8}, "size"),
        ({"lower_percentile": 60, "upper_percentile": 50}, "lower_percentile"),
        ({"clahe_clip_limit": 0}, "clahe_clip_limit"),
        ({"clahe_tile_grid": 0}, "clahe_tile_grid"),
        ({"interpolation": "magic"}, "interpolation"),
    ],
)
def test_spec_validation_names_the_attribute(kwargs, attribute):
    with pytest.raises(ValueError, match=attribute):
        PreprocessSpec(**kwargs)


def test_spec_round_trip_and_cache_key():
    spec = PreprocessSpec(size=256, clahe_clip_limit=3.0)
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    assert spec.cache_key == PreprocessSpec.from_dict(spec.to_dict()).cache_key
    assert spec.cache_key != PreprocessSpec(size=256).cache_key
    with pytest.raises(ValueError, match="unknown keys"):
        PreprocessSpec.from_dict({**spec.to_dict(), "gamma": 1})
    with pytest.raises(AttributeError):
        spec.size = 5  # frozen
