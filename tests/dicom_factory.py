"""DICOM files written by the tests: real encoders (pydicom, dcmtk) over synthetic pixels."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)


def make_dataset(
    pixels: np.ndarray,
    *,
    bits_stored: int = 12,
    photometric: str = "MONOCHROME2",
    modality: str = "DX",
    body_part: str | None = "CHEST",
    view: str | None = "PA",
    study_uid: str | None = None,
    sop_class: str = DigitalXRayImageStorageForPresentation,
    rescale: tuple[float, float] | None = None,
) -> Dataset:
    """A single-frame grayscale image dataset with file meta (Explicit VR Little Endian)."""
    pixels = np.asarray(pixels)
    signed = pixels.dtype.kind == "i"
    bits_allocated = 8 if pixels.dtype.itemsize == 1 else 16
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Test^Synthetic"
    ds.PatientID = "TEST-0001"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = "20260101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "A1"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality
    if body_part is not None:
        ds.BodyPartExamined = body_part
    if view is not None:
        ds.ViewPosition = view
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()
    return ds


def write(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def dcmtk(tool: str, *args: str | Path) -> None:
    """Run a dcmtk tool; fail loudly (dcmtk is installed by .ci/run)."""
    exe = shutil.which(tool)
    if exe is None:
        raise RuntimeError(f"{tool} (dcmtk) is not installed")
    subprocess.run([exe, *map(str, args)], check=True, capture_output=True)


def chest_pixels(size: int = 128, seed: int = 0, bits: int = 12) -> np.ndarray:
    """A synthetic chest-like image as unsigned integers of `bits` bits."""
    from training.synthetic import synthesise_case

    case = synthesise_case(np.random.default_rng(seed), size, [], ["nodule"])
    scaled = case.pixels.astype(np.float64) / 4095 * (2**bits - 1)
    return np.rint(scaled).astype(np.uint8 if bits <= 8 else np.uint16)
