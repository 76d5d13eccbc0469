"""From a study's DICOM instances to its triage result: select, decode, preprocess, infer.

The CLI's `infer` and the node's worker both call `prepare_instance` and `triage_study` (the
worker's pipeline `triage_studies`, several studies in one pass of the engine), so there is one
path from pixels to verdict and it always uses the bundle's preprocessing spec. No torch is
imported here: the worker's decode processes use `prepare_instance` alone (and import torch
only to preprocess on a GPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np
from pydicom.dataset import Dataset

from scxnn_node.imaging.decode import decode_pixels, read_dataset
from scxnn_node.imaging.preprocess import PreprocessSpec, preprocess_with_windowed_mean
from scxnn_node.imaging.selection import SelectionPolicy, assess_eligibility
from scxnn_node.model.decision import result_from_logits
from scxnn_node.model.result import StudyResult

if TYPE_CHECKING:  # the engine brings torch; decode processes must not pay for it
    from scxnn_node.model.engine import InferenceEngine


@dataclass(frozen=True)
class PreparedInstance:
    """One instance ready for the ensemble, or skipped by policy with the reason."""

    study_instance_uid: str
    sop_instance_uid: str
    image: np.ndarray | None  # uint8 (size, size) when analysed
    skip_reason: str | None = None
    flags: tuple[str, ...] = ()
    header: Dataset | None = None  # the instance's attributes without pixel data
    windowed_mean: float | None = None  # mean intensity after windowing (drift watch)

    @property
    def analysed(self) -> bool:
        return self.image is not None


def prepare_instance(
    source: str | Path | BinaryIO | Dataset,
    spec: PreprocessSpec,
    policy: SelectionPolicy | None = None,
    preprocess_device: str | None = None,
) -> PreparedInstance:
    """Read, select and preprocess one instance. Raises ImageRejected for unusable pixels.
    `preprocess_device` (a torch device, "cuda:0"): preprocess there, the same pixels
    (imaging/device_preprocess.py); None: OpenCV on the CPU."""
    ds = source if isinstance(source, Dataset) else read_dataset(source)
    study = str(ds.get("StudyInstanceUID", "") or "")
    sop = str(ds.get("SOPInstanceUID", "") or "")
    eligibility = assess_eligibility(ds, policy)
    if not eligibility.analyse:
        return PreparedInstance(study, sop, None, eligibility.reason, eligibility.flags)
    decoded = decode_pixels(ds)
    if preprocess_device is None:
        image, windowed_mean = preprocess_with_windowed_mean(decoded.pixels, spec)
    else:  # torch is imported only where asked: decode processes of a GPU worker
        from scxnn_node.imaging.device_preprocess import preprocess_or_fall_back

        image, windowed_mean = preprocess_or_fall_back(decoded.pixels, spec, preprocess_device)
    return PreparedInstance(
        study, sop, image, None, eligibility.flags, decoded.dataset, windowed_mean
    )


def triage_study(
    engine: InferenceEngine, study_instance_uid: str, instances: Sequence[PreparedInstance]
) -> StudyResult:
    """Run the ensemble on a study's analysable instances; not_analysed if there are none."""
    return triage_studies(engine, [(study_instance_uid, instances)])[0]


def triage_studies(
    engine: InferenceEngine,
    studies: Sequence[tuple[str, Sequence[PreparedInstance]]],
) -> list[StudyResult]:
    """Triage several studies with one pass of the engine over all their analysable images
    (the engine batches across studies); each study's result comes from its own images' logits
    alone, as if it had been triaged by itself."""
    analysed = [[i for i in instances if i.analysed] for _, instances in studies]
    images = [i.image for study in analysed for i in study]
    logits = engine.member_logits(np.stack(images)) if images else None  # type: ignore[arg-type]
    results = []
    start = 0
    for (study_instance_uid, instances), own in zip(studies, analysed, strict=True):
        if not own:
            reasons = sorted({i.skip_reason or "no image" for i in instances})
            reason = (
                "no usable frontal chest image: " + "; ".join(reasons)
                if reasons
                else ("no usable frontal chest image")
            )
            results.append(engine.not_analysed_result(study_instance_uid, reason))
            continue
        assert logits is not None
        notes = []
        unknown_views = sum("view_unknown" in i.flags for i in own)
        if unknown_views:
            notes.append(f"view position unknown on {unknown_views} image(s); analysed as frontal")
        own_logits = logits[start : start + len(own)]
        start += len(own)
        results.append(
            result_from_logits(
                engine.bundle,
                study_instance_uid,
                own_logits,
                [i.sop_instance_uid for i in own],
                notes,
            )
        )
    return results
