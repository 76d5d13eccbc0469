"""Drift watch's reference for a run: the calibration part's study scores and verdicts, and the
input statistics of its images (scxnn_node/drift_reference.py), which export puts in the
bundle's manifest.

The images' statistics are measured as the node measures them: the mean intensity after the
bundle's percentile window, and from a DICOM source its rows, columns, bits stored and
manufacturer (a PNG/JPEG source has no such header, so it adds to the mean intensity only).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from scxnn_node.drift_reference import (
    DriftReference,
    ImageStatistics,
    build_drift_reference,
    image_statistics,
)
from scxnn_node.imaging.decode import load_image
from scxnn_node.imaging.preprocess import PreprocessSpec, preprocess_with_windowed_mean
from training.calibrate import RunCalibration
from training.source_images import is_raster, read_source_pixels


def source_image_statistics(path: Path, spec: PreprocessSpec) -> ImageStatistics:
    """One training image's statistics, computed by the node's own functions."""
    if is_raster(path):
        pixels, header = read_source_pixels(path), None
    else:
        decoded = load_image(path)
        pixels, header = decoded.pixels, decoded.dataset
    _image, windowed_mean = preprocess_with_windowed_mean(pixels, spec)
    return image_statistics(header, windowed_mean)


def _statistics(args: tuple[Path, PreprocessSpec]) -> ImageStatistics:
    return source_image_statistics(*args)


def calibration_drift_reference(
    images: Sequence[Path],
    calibration: RunCalibration,
    spec: PreprocessSpec,
    workers: int = 1,
) -> DriftReference:
    """The reference of a run's calibration part; `images` are the validation images' files in
    the order `calibrate` was given them."""
    rows = sorted({int(r) for study in calibration.calibration_studies for r in study})
    todo = [(Path(images[r]), spec) for r in rows]
    if workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            stats = list(pool.map(_statistics, todo, chunksize=8))
    else:
        stats = [_statistics(item) for item in todo]
    return build_drift_reference(
        calibration.study_scores.tolist(), calibration.study_definite_normal.tolist(), stats
    )
