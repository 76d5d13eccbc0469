"""DICOM pixel decoding: any single-frame grayscale image a real sender produces, bone bright.

pydicom does the parsing and, through the pylibjpeg plugins, every compressed transfer syntax
(JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE); deflate and big endian are pydicom's
own; JPEG and JPEG 2000 go to the GPU first where it is enabled (imaging/gpu_decode.py). This
module only decides what is acceptable and turns stored values into modality values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, pixel_array

from scxnn_node.imaging import gpu_decode

log = logging.getLogger(__name__)

MIN_DIMENSION = 64
MAX_DIMENSION = 8192
GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")


class RejectReason(StrEnum):
    """Why an image cannot be analysed at all (as opposed to skipped by policy)."""

    NOT_DICOM = "not_dicom"
    NO_PIXEL_DATA = "no_pixel_data"
    MULTI_FRAME = "multi_frame"
    COLOUR = "colour"
    BAD_DIMENSIONS = "bad_dimensions"
    UNDECODABLE = "undecodable"


class ImageRejected(Exception):
    """A DICOM object whose pixels this node cannot use; `reason` is machine-readable."""

    def __init__(self, reason: RejectReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason.value}: {self.message}"


@dataclass(frozen=True)
class DecodedImage:
    """Pixels in modality units with bone bright (MONOCHROME1 already inverted), plus the header."""

    # Shape (rows, columns): the stored integers where the modality transform keeps them
    # integers (none, a LUT, or slope 1 with an integer intercept: radiographs), else float32.
    pixels: np.ndarray
    dataset: Dataset  # header without pixel data
    photometric: str
    transfer_syntax: str

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.get("SOPInstanceUID", ""))

    @property
    def study_instance_uid(self) -> str:
        return str(self.dataset.get("StudyInstanceUID", ""))


def read_dataset(source: str | Path | BinaryIO) -> Dataset:
    """Parse a DICOM file (Part 10, or a bare dataset as some senders write) or refuse it."""
    try:
        return pydicom.dcmread(source)
    except InvalidDicomError:
        pass
    except Exception as exc:  # pydicom raises many types on truncated or corrupt input
        raise ImageRejected(RejectReason.NOT_DICOM, f"cannot parse DICOM: {exc}") from exc
    if hasattr(source, "seek"):
        source.seek(0)  # type: ignore[union-attr]
    try:
        ds = pydicom.dcmread(source, force=True)
        # A forced read of arbitrary bytes "succeeds" with junk; real data has these.
        if "SOPClassUID" not in ds and "PixelData" not in ds:
            raise ValueError("no SOP Class UID and no Pixel Data")
        return ds
    except Exception as exc:
        raise ImageRejected(RejectReason.NOT_DICOM, f"not a DICOM file ({exc})") from exc


def check_pixel_module(ds: Dataset) -> None:
    """Refuse, before decoding, what the pixel module says this node cannot analyse."""
    if "PixelData" not in ds:
        kind = (
            "float pixel data"
            if ("FloatPixelData" in ds or "DoubleFloatPixelData" in ds)
            else ("no pixel data")
        )
        raise ImageRejected(RejectReason.NO_PIXEL_DATA, f"object has {kind} (not an image)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageRejected(
            RejectReason.MULTI_FRAME, f"multi-frame image ({frames} frames); only single frames"
        )
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if samples != 1 or photometric not in GRAYSCALE:
        raise ImageRejected(
            RejectReason.COLOUR,
            f"colour or non-grayscale image (Photometric Interpretation {photometric or 'missing'},"
            f" Samples per Pixel {samples}); only MONOCHROME1/MONOCHROME2",
        )
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if not (MIN_DIMENSION <= rows <= MAX_DIMENSION and MIN_DIMENSION <= cols <= MAX_DIMENSION):
        raise ImageRejected(
            RejectReason.BAD_DIMENSIONS,
            f"image is {rows}x{cols} pixels; each side must be {MIN_DIMENSION}..{MAX_DIMENSION}",
        )


def decode_pixels(ds: Dataset) -> DecodedImage:
    """Decode a parsed dataset's pixels to modality values with bone bright."""
    check_pixel_module(ds)
    transfer_syntax = (
        str(getattr(ds.file_meta, "TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    )
    try:
        stored = _stored_values(ds, transfer_syntax)
    except Exception as exc:
        tsname = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        label = tsname.name if tsname is not None else "unknown transfer syntax"
        raise ImageRejected(
            RejectReason.UNDECODABLE, f"pixel data could not be decoded ({label}): {exc}"
        ) from exc
    if stored.ndim != 2:
        raise ImageRejected(
            RejectReason.UNDECODABLE, f"decoded pixel array has shape {stored.shape}, expected 2-D"
        )
    values = modality_values(stored, ds)
    if values.dtype.kind == "f" and not np.isfinite(values).all():
        raise ImageRejected(RejectReason.UNDECODABLE, "pixel values are not finite after rescale")
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    if photometric == "MONOCHROME1":
        # MONOCHROME1 shows low values bright; mirror within the image's own range. Integers:
        # max - (v - min), whose every step stays in [0, max - min] (modulo the dtype's width
        # for signed ones, which the result, within [min, max], undoes).
        if values.dtype.kind == "f":
            values = values.max() + values.min() - values
        else:
            values = values.max() - (values - values.min())
    header = ds.copy()
    del header.PixelData
    return DecodedImage(
        pixels=values, dataset=header, photometric=photometric, transfer_syntax=transfer_syntax
    )


def modality_values(stored: np.ndarray, ds: Dataset) -> np.ndarray:
    """pydicom's modality LUT, with integer results kept as integers: the windowing takes them
    through a histogram and a lookup table, where a float32 copy would cost it a pass to prove
    them integral (2500 px: about 40 ms of 90) besides the copy. Float32 where the rescale
    makes fractions. Same values either way (integers below 2**24 are exact in float32)."""
    if stored.dtype.kind in "iu" and not ds.get("ModalityLUTSequence"):
        if "RescaleSlope" not in ds or "RescaleIntercept" not in ds:
            return stored  # pydicom applies no rescale then either
        try:
            slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        except (TypeError, ValueError):
            slope, intercept = float("nan"), float("nan")  # left to pydicom, as before
        if slope == 1 and intercept == 0:
            return stored
        if slope == 1 and intercept.is_integer():
            wide = np.int32 if stored.dtype.itemsize <= 2 else np.int64
            return stored.astype(wide) + wide(intercept)
    values = apply_modality_lut(stored, ds)
    return values if values.dtype.kind in "iu" else np.asarray(values, dtype=np.float32)


def _stored_values(ds: Dataset, transfer_syntax: str) -> np.ndarray:
    """The stored pixel values: the GPU plugin first where enabled, else (or when it refuses or
    fails) the CPU plugins."""
    if gpu_decode.accepts(ds, transfer_syntax):
        try:
            return pixel_array(ds, decoding_plugin=gpu_decode.PLUGIN)
        except Exception as exc:
            log.info("GPU decoding refused (%s); decoding on the CPU", type(exc).__name__)
    return ds.pixel_array


def load_image(source: str | Path | BinaryIO) -> DecodedImage:
    """Read and decode one DICOM file; ImageRejected carries a reason a PACS admin understands."""
    return decode_pixels(read_dataset(source))
