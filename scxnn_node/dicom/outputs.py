"""A triaged study's DICOM outputs, built and encoded: the SR and the summary image as Part 10
bytes, with the UIDs the result's record names them by.

Plain data in, bytes out, so that a worker can build them in its decode processes (the CPU
cost of a study's outputs, about 0.1 CPU-s, is several times a GPU engine's pass) as well as on
its own thread.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from scxnn_node.dicom.sr import build_triage_sr
from scxnn_node.dicom.summary import build_summary_image
from scxnn_node.model.result import StudyResult
from scxnn_node.store.results import SrReference


@dataclass(frozen=True)
class EncodedOutputs:
    """An SR and a summary image, encoded, and the UIDs that name them."""

    sr: bytes
    summary: bytes
    sr_reference: SrReference
    summary_series_instance_uid: str
    summary_sop_instance_uid: str


@dataclass(frozen=True)
class StudyOutputs:
    """What a triaged study's SR and summary image are built from: the result, the analysed
    images' headers (the first one's `image` goes on the summary), the bundle's names and
    finding codes, and the study's earlier SR that this one amends (None: the first)."""

    result: StudyResult
    sources: list[Dataset]
    image: np.ndarray
    bundle_name: str
    bundle_version: str
    finding_codes: dict[str, tuple[str, str, str]]
    predecessor: SrReference | None

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("StudyOutputs.sources needs at least one analysed image")

    def encode(self) -> EncodedOutputs:
        sr = build_triage_sr(
            self.result,
            self.sources,
            bundle_name=self.bundle_name,
            bundle_version=self.bundle_version,
            finding_codes=self.finding_codes,
            series_instance_uid=generate_uid(),
            sop_instance_uid=generate_uid(),
            predecessor=self.predecessor,
        )
        summary_series_uid, summary_uid = generate_uid(), generate_uid()
        summary = build_summary_image(
            self.result,
            self.sources[0],
            self.image,
            series_instance_uid=summary_series_uid,
            sop_instance_uid=summary_uid,
        )
        reference = SrReference(
            sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.SOPClassUID, sr.SOPInstanceUID
        )
        return EncodedOutputs(
            part10_bytes(sr), part10_bytes(summary), reference, summary_series_uid, summary_uid
        )


def part10_bytes(dataset: Dataset) -> bytes:
    """A dataset as a DICOM Part 10 file's bytes."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
