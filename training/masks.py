"""Lesion masks as manifests reference them: a PNG, a polygon file, or a run-length string.

    PNG           non-zero = lesion, the image's size
    .json         polygons in image pixels: {"polygons": [[[x, y], ...], ...]} (or the bare list)
    "rle:" + ...  a SIIM-style run-length string: start/length pairs, starts relative to the
                  previous run's end, pixels counted column by column

Every reference reads as a 0/1 uint8 mask of its image's (rows, columns).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

RLE_PREFIX = "rle:"


def is_rle(spec: str) -> bool:
    """True for a run-length reference, False for a mask file's path."""
    return spec.startswith(RLE_PREFIX)


def decode_siim_rle(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """SIIM-ACR run-length string -> 0/1 mask of `shape` (rows, columns)."""
    rows, cols = shape
    values = [int(v) for v in rle.split()]
    if len(values) % 2:
        raise ValueError("RLE needs start/length pairs (an even count of numbers)")
    flat = np.zeros(rows * cols, np.uint8)
    position = 0
    for start, length in zip(values[0::2], values[1::2], strict=True):
        if start < 0 or length < 0:
            raise ValueError("RLE starts and lengths must not be negative")
        position += start
        if position + length > flat.size:
            raise ValueError(f"RLE runs past the end of a {rows}x{cols} image")
        flat[position : position + length] = 1
        position += length
    return flat.reshape(cols, rows).T.copy()  # pixels counted column by column


def encode_siim_rle(mask: np.ndarray) -> str:
    """0/1 mask -> SIIM-ACR run-length string (the inverse of decode_siim_rle)."""
    flat = (np.asarray(mask) > 0).T.reshape(-1).astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [0]])))
    starts, ends = edges[0::2], edges[1::2]
    out, previous_end = [], 0
    for s, e in zip(starts, ends, strict=True):
        out += [int(s - previous_end), int(e - s)]
        previous_end = e
    return " ".join(str(v) for v in out)


def polygons_to_mask(
    polygons: Sequence[Sequence[Sequence[float]]], shape: tuple[int, int]
) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    for polygon in polygons:
        points = np.asarray(polygon, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3:
            raise ValueError("a polygon is a list of at least 3 [x, y] points")
        cv2.fillPoly(mask, [np.rint(points).astype(np.int32)], 1)
    return mask


def read_polygon_file(path: Path) -> list[list[list[float]]]:
    data = json.loads(path.read_text())
    polygons = data.get("polygons") if isinstance(data, dict) else data
    if not isinstance(polygons, list):
        raise ValueError(f"{path}: expected {{'polygons': [...]}} or a list of polygons")
    return polygons


def read_mask(spec: str, shape: tuple[int, int]) -> np.ndarray:
    """A mask reference from a manifest -> 0/1 uint8 mask of the image's `shape`."""
    if is_rle(spec):
        return decode_siim_rle(spec[len(RLE_PREFIX) :], shape)
    path = Path(spec)
    if path.suffix.lower() == ".json":
        return polygons_to_mask(read_polygon_file(path), shape)
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"{path}: not a readable mask image")
    if mask.shape != shape:
        raise ValueError(
            f"{path}: mask is {mask.shape[0]}x{mask.shape[1]}, image {shape[0]}x{shape[1]}"
        )
    return (mask > 0).astype(np.uint8)


def mask_problem(spec: str, shape: tuple[int, int]) -> str | None:
    """None if the mask fits an image of `shape`, else what is wrong with it."""
    if not is_rle(spec) and not Path(spec).is_file():
        return f"mask file not found: {spec}"
    try:
        if not is_rle(spec) and Path(spec).suffix.lower() == ".png":
            with Image.open(spec) as im:
                size = (im.height, im.width)
            if size != shape:
                return (
                    f"mask size mismatch: mask is {size[0]}x{size[1]}, "
                    f"image is {shape[0]}x{shape[1]}"
                )
            return None
        if not read_mask(spec, shape).any():
            return "mask is empty (no lesion pixel inside the image)"
        return None
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        return str(exc)
