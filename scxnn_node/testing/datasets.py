"""What the harness sends: generated chest radiographs, Part 10 files written whatever their
values, byte-level mutations of a file's dataset, and the real radiographs shipped with the node."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import split_dataset

from scxnn_node.store.assembly import InstanceRecord

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
SAMPLES = Path(__file__).resolve().parents[1] / "samples"


def chest_pixels(size: int, seed: int) -> np.ndarray:
    """A 12-bit chest-like picture: a bright body, two dark lungs, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    body = np.exp(-(((x - 0.5) / 0.42) ** 6 + ((y - 0.55) / 0.48) ** 6))
    lungs = sum(np.exp(-(((x - cx) / 0.14) ** 2 + ((y - 0.5) / 0.28) ** 2)) for cx in (0.33, 0.67))
    image = 2600 * body - 1500 * lungs + 300 + rng.normal(0, 60, (size, size))
    return np.clip(image, 0, 4095).astype(np.uint16)


def chest_dataset(
    *,
    sop_uid: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    omit: Iterable[str] = (),
    size: int = 96,
    seed: int = 0,
    **values: Any,
) -> Dataset:
    """A single-frame DX chest PA (Explicit VR Little Endian) with file meta; `values` set or
    replace elements by keyword, `omit` leaves elements out (e.g. "SeriesInstanceUID")."""
    pixels = chest_pixels(size, seed)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = "Audit^Synthetic"
    ds.PatientID = "AUDIT-1"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20260101", "120000", "A1"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        for keyword in omit:
            if keyword in ds:
                delattr(ds, keyword)
    return ds


def _legal_uid(value: Any) -> str | None:
    text_value = str(value) if isinstance(value, str) else ""
    return text_value if 0 < len(text_value) <= 64 and "\\" not in text_value else None


def write_part10(ds: Dataset, path: Path) -> Path:
    """Write as a Part 10 file whatever the values (over-long or odd UIDs included). The file
    meta names the dataset's SOP class and instance where they are usable as such (the C-STORE
    command carries them), a stand-in otherwise; the dataset is written as it is."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _legal_uid(ds.get("SOPClassUID")) or DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = _legal_uid(ds.get("SOPInstanceUID")) or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    head, body = DicomBytesIO(), DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_file_meta_info(head, meta, enforce_standard=True)
        write_dataset(body, ds)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\0" * 128 + b"DICM" + head.getvalue() + body.getvalue())
    return path


@dataclass(frozen=True)
class Edit:
    """One byte-level change to a dataset: overwrite, insert or delete at an offset (taken
    modulo the dataset's length), or truncate there."""

    kind: str  # overwrite | insert | delete | truncate
    at: int
    data: bytes = b""


def mutate_file(source: Path, target: Path, edits: Sequence[Edit]) -> Path:
    """`source` with its dataset bytes (not its file meta, which the C-STORE command needs)
    changed by `edits`, written to `target`."""
    raw = source.read_bytes()
    _, offset = split_dataset(source)
    body = bytearray(raw[offset:])
    for edit in edits:
        at = edit.at % (len(body) + 1)
        if edit.kind == "overwrite":
            body[at : at + len(edit.data)] = edit.data
        elif edit.kind == "insert":
            body[at:at] = edit.data
        elif edit.kind == "delete":
            del body[at : at + max(1, len(edit.data))]
        elif edit.kind == "truncate":
            del body[at:]
        else:
            raise ValueError(f"unknown edit {edit.kind!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(raw[:offset] + bytes(body))
    return target


def sample_files() -> list[Path]:
    """The real chest radiographs shipped with the node."""
    return sorted(SAMPLES.glob("*.dcm"))


def stored_instance_record(study_uid: str, sop_uid: str) -> InstanceRecord:
    """What the SCP records for a chest image of `study_uid` (no file behind it): for tests of
    the study's state machine that go straight to the store."""
    return InstanceRecord(
        sop_instance_uid=sop_uid,
        study_instance_uid=study_uid,
        series_instance_uid=study_uid + ".1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        path=f"instances/x/{sop_uid}.dcm",
        size=1,
        calling_ae="PACS",
    )
