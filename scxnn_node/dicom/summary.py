"""A Secondary Capture summary image every viewer shows: verdict banner, tier, findings, bundle.

Many PACS viewers do not render SR; this grayscale image carries the same verdict as pixels, and
the same findings as the SR: only those StudyResult.flagged_findings names (none in a
definite-normal study), plus the SR's note on images not analysed.
"""

from __future__ import annotations

import cv2
import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from scxnn_node import __version__
from scxnn_node.dicom.sr import (
    MANUFACTURER,
    purged_note,
    sanitised_evidence,
    series_description,
    without_name_warnings,
)
from scxnn_node.model.manifest import NOT_FOR_CLINICAL_USE
from scxnn_node.model.result import StudyResult, Verdict

WIDTH = 768
FONT = cv2.FONT_HERSHEY_SIMPLEX


def summary_lines(result: StudyResult) -> list[str]:
    """The burned-in text: the banner's headline first, then the footer lines. Findings are
    listed only as StudyResult.flagged_findings gives them (none in a definite-normal study)."""
    if result.verdict is Verdict.ABNORMAL:
        headline = f"ABNORMAL - {(result.risk_tier or 'unspecified').replace('_', '-').upper()}"
    elif result.verdict is Verdict.DEFINITE_NORMAL:
        headline = "DEFINITE NORMAL"
    else:
        headline = "NOT ANALYSED"
    lines = [headline]
    for finding in result.flagged_findings[:5]:
        lines.append(
            f"{finding.name.replace('_', ' ')} ({finding.tier.value.replace('_', '-')}): "
            f"{finding.probabilities['target']:.2f}"
        )
    if result.verdict is Verdict.ABNORMAL and len(lines) == 1:
        lines.append("abnormal, unspecified (no catalogue finding named)")
    note = purged_note(result)
    if note:
        lines.append(note)
    if result.abnormality_score is not None:
        lines.append(f"score {result.abnormality_score:.3f}, threshold {result.threshold:.3f}")
    lines.append(f"model {result.bundle.name} {result.bundle.version}, scxnn-node {__version__}")
    if result.bundle.demo:
        lines.append(NOT_FOR_CLINICAL_USE + " (demo model)")
    return lines


def render_summary(result: StudyResult, image: np.ndarray) -> np.ndarray:
    """uint8 (H, WIDTH) picture: banner, the (windowed) radiograph, then summary_lines' footer."""
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError("render_summary expects a 2-D uint8 image")
    scale = WIDTH / image.shape[1]
    body = cv2.resize(
        image, (WIDTH, max(1, round(image.shape[0] * scale))), interpolation=cv2.INTER_AREA
    )
    headline, *lines = summary_lines(result)
    banner = np.zeros((110, WIDTH), np.uint8)
    cv2.putText(banner, "AI TRIAGE", (16, 36), FONT, 0.9, 200, 2, cv2.LINE_AA)
    cv2.putText(banner, headline, (16, 88), FONT, 1.5, 255, 3, cv2.LINE_AA)
    footer = np.zeros((20 + 34 * len(lines), WIDTH), np.uint8)
    for i, line in enumerate(lines):
        cv2.putText(footer, line, (16, 34 + 34 * i), FONT, 0.75, 230, 2, cv2.LINE_AA)
    return np.ascontiguousarray(np.vstack([banner, body, footer]))


def build_summary_image(
    result: StudyResult,
    source: Dataset,
    image: np.ndarray,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    series_number: int = 9902,
) -> hd.sc.SCImage:
    """Secondary Capture in the source's study, with the verdict in its Series Description."""
    pixels = render_summary(result, image)
    with without_name_warnings():
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=sanitised_evidence(source),
            pixel_array=pixels,
            photometric_interpretation="MONOCHROME2",
            bits_allocated=8,
            coordinate_system="PATIENT",
            series_instance_uid=series_instance_uid,
            series_number=series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer=MANUFACTURER,
            patient_orientation=("L", "F"),
            contributing_equipment=[
                hd.ContributingEquipment(
                    manufacturer=MANUFACTURER,
                    purpose_of_reference=codes.DCM.ProcessingEquipment,
                    manufacturer_model_name=f"{result.bundle.name} {result.bundle.version}"[:64],
                    software_versions=[__version__, result.bundle.version],
                )
            ],
        )
    sc.SeriesDescription = series_description(result, result.bundle.demo)
    sc.BurnedInAnnotation = "YES"
    sc.Laterality = None  # Type 2C in General Series: present and empty (both sides imaged)
    charset = source.get("SpecificCharacterSet")
    if charset:
        sc.SpecificCharacterSet = charset
    return sc
