"""The node's own study path over a manifest's studies: select, preprocess, infer, aggregate.

DICOM rows go through `scxnn_node.triage.prepare_instance`, as a received instance does: the
selection policy reads the header (a lateral view is skipped), decoding and preprocessing use
the bundle's spec. PNG/JPEG rows have no header, so they are taken as frontal chest images; the
preprocessing cache holds exactly what the node's one preprocessing function makes of them.
Each study's instances then go to `triage_study`, the same call the node's worker makes.
"""

from __future__ import annotations

from collections.abc import Sequence

from tqdm import tqdm

from scxnn_node.imaging.decode import ImageRejected
from scxnn_node.imaging.preprocess import PreprocessSpec
from scxnn_node.imaging.selection import SelectionPolicy
from scxnn_node.model.engine import InferenceEngine
from scxnn_node.model.result import StudyResult
from scxnn_node.triage import PreparedInstance, prepare_instance, triage_study
from training.cache import CachedImage
from training.dataset import ManifestEntry
from training.source_images import is_raster
from training.studies import Study


def instance_for(
    entry: ManifestEntry,
    cached: CachedImage,
    spec: PreprocessSpec,
    policy: SelectionPolicy | None = None,
) -> PreparedInstance:
    """One manifest row as the node would prepare it; a DICOM the node would reject is an
    instance skipped with the node's reason."""
    if is_raster(entry.image):
        return PreparedInstance(entry.study_key, f"row-{entry.row}", cached.load_image())
    try:
        return prepare_instance(entry.image, spec, policy)
    except ImageRejected as exc:
        return PreparedInstance(entry.study_key, f"row-{entry.row}", None, str(exc))


def triage_studies(
    engine: InferenceEngine,
    studies: Sequence[Study],
    cached: dict[int, CachedImage],
    policy: SelectionPolicy | None = None,
    progress: bool = False,
) -> list[StudyResult]:
    """The node's result for each study, in order."""
    spec = engine.manifest.preprocessing
    results = []
    for study in tqdm(studies, desc="studies", unit="study", disable=not progress):
        instances = [instance_for(e, cached[e.row], spec, policy) for e in study.entries]
        results.append(triage_study(engine, study.study_id, instances))
    return results
