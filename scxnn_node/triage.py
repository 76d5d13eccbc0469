"""From a study's DICOM instances to its triage result: select, decode, preprocess, infer.

The CLI's `infer` and the node's worker both call `prepare_instance` and `triage_study`, so
there is one path from pixels to verdict and it always uses the bundle's preprocessing spec.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from pydicom.dataset import Dataset

from scxnn_node.imaging.decode import decode_pixels, read_dataset
from scxnn_node.imaging.preprocess import PreprocessSpec, preprocess_image
from scxnn_node.imaging.selection import SelectionPolicy, assess_eligibility
from scxnn_node.model.engine import InferenceEngine
from scxnn_node.model.result import StudyResult


@dataclass(frozen=True)
class PreparedInstance:
    """One instance ready for the ensemble, or skipped by policy with the reason."""

    study_instance_uid: str
    sop_instance_uid: str
    image: np.ndarray | None  # uint8 (size, size) when analysed
    skip_reason: str | None = None
    flags: tuple[str, ...] = ()
    header: Dataset | None = None  # the instance's attributes without pixel data

    @property
    def analysed(self) -> bool:
        return self.image is not None


def prepare_instance(
    source: str | Path | BinaryIO | Dataset,
    spec: PreprocessSpec,
    policy: SelectionPolicy | None = None,
) -> PreparedInstance:
    """Read, select and preprocess one instance. Raises ImageRejected for unusable pixels."""
    ds = source if isinstance(source, Dataset) else read_dataset(source)
    study = str(ds.get("StudyInstanceUID", "") or "")
    sop = str(ds.get("SOPInstanceUID", "") or "")
    eligibility = assess_eligibility(ds, policy)
    if not eligibility.analyse:
        return PreparedInstance(study, sop, None, eligibility.reason, eligibility.flags)
    decoded = decode_pixels(ds)
    return PreparedInstance(
        study,
        sop,
        preprocess_image(decoded.pixels, spec),
        None,
        eligibility.flags,
        decoded.dataset,
    )


def triage_study(
    engine: InferenceEngine, study_instance_uid: str, instances: Sequence[PreparedInstance]
) -> StudyResult:
    """Run the ensemble on a study's analysable instances; not_analysed if there are none."""
    analysed = [i for i in instances if i.analysed]
    if not analysed:
        reasons = sorted({i.skip_reason or "no image" for i in instances})
        reason = (
            "no usable frontal chest image: " + "; ".join(reasons)
            if reasons
            else ("no usable frontal chest image")
        )
        return engine.not_analysed_result(study_instance_uid, reason)
    notes = []
    unknown_views = sum("view_unknown" in i.flags for i in analysed)
    if unknown_views:
        notes.append(f"view position unknown on {unknown_views} image(s); analysed as frontal")
    images = np.stack([i.image for i in analysed])  # type: ignore[misc]
    return engine.triage(study_instance_uid, images, [i.sop_instance_uid for i in analysed], notes)
