"""Reading a dataset's image files, DICOM or PNG/JPEG: their size and their gray pixels."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from scxnn_node.imaging.decode import load_image, read_dataset

RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")


def is_raster(path: Path) -> bool:
    return path.suffix.lower() in RASTER_SUFFIXES


def image_shape(path: Path) -> tuple[int, int]:
    """(rows, columns) of an image file without decoding its pixels."""
    if is_raster(path):
        with Image.open(path) as im:
            return im.height, im.width
    ds = read_dataset(path)
    return int(ds.Rows), int(ds.Columns)


def read_source_pixels(path: Path) -> np.ndarray:
    """Pixels of a DICOM (modality units, bone bright) or PNG/JPEG (colour made gray)."""
    if not is_raster(path):
        return load_image(path).pixels
    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ValueError(f"{path}: not a readable PNG/JPEG image")
    if pixels.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if pixels.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        pixels = cv2.cvtColor(pixels, code)
    return pixels
