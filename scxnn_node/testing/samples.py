"""Many distinct instances made from one real chest DX that ships with the node."""

from __future__ import annotations

from pathlib import Path

SAMPLE_DX = Path(__file__).resolve().parents[1] / "samples" / "nih_dx_no_finding.dcm"


def sample_copies(directory: Path, count: int, per_study: int = 1) -> list[Path]:
    """`count` copies of a real 1 MB chest DX, each a new instance, `per_study` per study."""
    import pydicom
    from pydicom.uid import generate_uid

    directory.mkdir(parents=True, exist_ok=True)
    template = pydicom.dcmread(SAMPLE_DX)
    files = []
    for i in range(count):
        if i % per_study == 0:
            template.StudyInstanceUID = generate_uid()
        template.SOPInstanceUID = generate_uid()
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        path = directory / f"{i:05d}.dcm"
        template.save_as(path)
        files.append(path)
    return files
