"""The thesis's preprocessing: one function, parameters in a frozen spec."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import DATA
from dicom_factory import chest_pixels, make_dataset
from hypothesis import given, settings
from hypothesis import strategies as st

from scxnn_node.imaging.decode import decode_pixels, load_image
from scxnn_node.imaging.preprocess import (
    PreprocessSpec,
    linear_percentiles,
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


def _window_in_float64(values: np.ndarray, lower: float, upper: float) -> np.ndarray:
    """The definition: np.percentile, clip, min-max to 0..255 in float64, round."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = np.percentile(values, [lower, upper])
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((np.clip(values, lo, hi) - lo) / (hi - lo) * 255.0).astype(np.uint8)


_integer_images = st.tuples(
    st.sampled_from([np.uint8, np.uint16, np.int16, np.float32, np.float64]),
    st.integers(1, 260),  # up to 67,600 pixels: the lookup runs in blocks of 32,768
    st.integers(1, 260),
    st.integers(-40000, 40000),  # lowest value (clipped to the dtype)
    st.integers(0, 65535),  # spread
    st.integers(0, 2**32 - 1),
)


@settings(max_examples=300, deadline=None)
@given(
    image=_integer_images,
    lower=st.floats(0, 50, allow_nan=False),
    width=st.floats(0.001, 50, allow_nan=False),
    sparse=st.booleans(),
)
def test_windowing_integers_by_histogram_equals_the_float64_definition(
    image, lower, width, sparse
):
    """Bit for bit, for every dtype a decoder gives, narrow and wide, sparse and dense values."""
    dtype, rows, columns, lowest, spread, seed = image
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        lowest = int(np.clip(lowest, info.min, info.max))
        spread = min(spread, info.max - lowest)
    values = lowest + rng.integers(0, spread + 1, (rows, columns))
    if sparse:  # a few distinct values far apart: histogram gaps, ties at the percentiles
        values = lowest + rng.choice([0, spread // 3, spread], (rows, columns))
    pixels = values.astype(dtype)
    spec = PreprocessSpec(size=64, lower_percentile=lower, upper_percentile=lower + width)
    expected = _window_in_float64(pixels, spec.lower_percentile, spec.upper_percentile)
    np.testing.assert_array_equal(window_to_uint8(pixels, spec), expected)


@settings(max_examples=200, deadline=None)
@given(
    counts=st.lists(st.integers(0, 50), min_size=1, max_size=60).filter(lambda c: sum(c) > 0),
    percentiles=st.lists(st.floats(0, 100, allow_nan=False), min_size=1, max_size=4),
)
def test_percentiles_from_a_histogram_are_numpys(counts, percentiles):
    values = np.repeat(np.arange(len(counts), dtype=np.float64), counts)
    got = linear_percentiles(np.asarray(counts), tuple(percentiles))
    assert got == list(np.percentile(values, percentiles))


def test_fractional_and_wide_images_take_the_float64_way():
    rng = np.random.default_rng(3)
    fractional = rng.normal(0, 1, (50, 50)).astype(np.float32)  # rescaled, not integers
    wide = rng.integers(0, 2**20, (50, 50)).astype(np.int32)  # spans more than 2**16 values
    for pixels in (fractional, wide):
        np.testing.assert_array_equal(
            window_to_uint8(pixels, SPEC), _window_in_float64(pixels, 0.5, 99.5)
        )


def test_windowing_real_radiographs_equals_the_float64_definition():
    for name in ("nih_dx_no_finding.dcm", "siim_cr_negative.dcm"):
        pixels = load_image(DATA / name).pixels
        np.testing.assert_array_equal(
            window_to_uint8(pixels, SPEC), _window_in_float64(pixels, 0.5, 99.5)
        )
