"""Studies of a manifest: its images grouped by study id, with the reference standard merged
over each study's images (evaluation reports per study, as the node triages)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from training.dataset import ManifestEntry


@dataclass(frozen=True)
class Study:
    """The images of one study and its reference standard, merged over them: a finding is
    present if any image shows it, absent if every image is known without it."""

    study_id: str
    entries: tuple[ManifestEntry, ...]

    @property
    def labels(self) -> dict[str, int | None]:
        merged: dict[str, int | None] = {}
        for finding in self.entries[0].labels:
            values = [e.label(finding) for e in self.entries]
            merged[finding] = 1 if 1 in values else 0 if all(v == 0 for v in values) else None
        return merged

    @property
    def other_disease(self) -> str:
        return "; ".join(sorted({e.other_disease for e in self.entries if e.other_disease}))

    @property
    def abnormal(self) -> int | None:
        """1 if any image is abnormal, 0 if every image is normal, else None."""
        values = [e.abnormal for e in self.entries]
        return 1 if 1 in values else 0 if all(v == 0 for v in values) else None


def group_studies(entries: Iterable[ManifestEntry]) -> list[Study]:
    """Entries grouped by study, in the order each study first appears."""
    groups: dict[str, list[ManifestEntry]] = {}
    for e in entries:
        groups.setdefault(e.study_key, []).append(e)
    return [Study(key, tuple(members)) for key, members in groups.items()]
