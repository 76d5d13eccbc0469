"""How an importer reads a dataset's labels: its class names mapped to catalogue findings, and
what the source thereby says about one image (training/importers.py reads the formats).

A mapping value is a finding name, `normal` (the class means no finding at all), `other:<name>`
(a disease outside the catalogue, recorded in other_disease) or `ignore` (an image showing the
class is dropped: what it shows is neither named nor known to be absent).

An image is written as normal (no_finding 1) only when the source says so (a class or column
mapped to `normal`), or labels every catalogue finding absent. Anything else without a present
finding gets no_finding 0: its mapped findings are known absent, but whatever the mapping leaves
out (an unmapped column, a finding the dataset never labels) may be there, so it never serves as
a normal image.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scxnn_node.config import ConfigError, read_yaml_mapping
from scxnn_node.findings import THESIS_CATALOGUE

NORMAL = "normal"
IGNORE = "ignore"
OTHER_PREFIX = "other:"


class DatasetImportError(Exception):
    """Source data an importer cannot use; the message names the file and the problem."""


@dataclass(frozen=True)
class ClassMapping:
    """Dataset class name -> finding / normal / other:<name> / ignore."""

    classes: dict[str, str]

    def __post_init__(self) -> None:
        bad = {
            k: v
            for k, v in self.classes.items()
            if v not in (NORMAL, IGNORE)
            and not v.startswith(OTHER_PREFIX)
            and v not in THESIS_CATALOGUE.names
        }
        if bad:
            raise DatasetImportError(
                f"mapping: {bad} are not findings ({', '.join(THESIS_CATALOGUE.names)}), "
                f"'{NORMAL}', '{IGNORE}' or '{OTHER_PREFIX}<name>'"
            )

    @property
    def findings(self) -> list[str]:
        """The catalogue findings this mapping can label, in catalogue order."""
        used = set(self.classes.values())
        return [f for f in THESIS_CATALOGUE.names if f in used]

    def target(self, name: str, source: str) -> str:
        if name not in self.classes:
            raise DatasetImportError(f"{source}: class {name!r} is not in the mapping")
        return self.classes[name]

    def labels_for(
        self, names: Iterable[str], source: str, empty_is_normal: bool = False
    ) -> SourceLabels | None:
        """Labels for an image whose source lists the classes `names` and no others: the mapped
        findings are present or known absent. None when a class is mapped to `ignore` (the
        image is dropped). An empty list states no finding only with `empty_is_normal`."""
        labels: dict[str, int | None] = dict.fromkeys(self.findings, 0)
        others = []
        stated_normal = False
        names = list(names)
        for name in names:
            target = self.target(name, source)
            if target == IGNORE:
                return None
            if target == NORMAL:
                stated_normal = True
            elif target in labels:
                labels[target] = 1
            elif target.startswith(OTHER_PREFIX):
                others.append(target[len(OTHER_PREFIX) :])
        return SourceLabels.of(labels, others, stated_normal or (empty_is_normal and not names))


@dataclass(frozen=True)
class SourceLabels:
    """What a source says about one image, as the manifest will record it."""

    labels: dict[str, int | None]
    other_disease: str
    no_finding: bool

    @classmethod
    def of(
        cls, labels: dict[str, int | None], others: Iterable[str], stated_normal: bool
    ) -> SourceLabels:
        """No finding when nothing is present and the source says so, or when it labels every
        catalogue finding absent."""
        other = "; ".join(sorted(set(others)))
        present = other or any(v == 1 for v in labels.values())
        every_absent = all(labels.get(f) == 0 for f in THESIS_CATALOGUE.names)
        return cls(labels, other, not present and (stated_normal or every_absent))


def read_mapping(path: str | Path, key: str = "classes") -> tuple[ClassMapping, dict[str, Any]]:
    """A YAML mapping file: `classes: {dataset class: target}` plus importer options."""
    try:
        raw = read_yaml_mapping(path)
    except ConfigError as exc:
        raise DatasetImportError(str(exc)) from None
    classes = raw.get(key)
    if not isinstance(classes, dict) or not classes:
        raise DatasetImportError(f"{path}: needs a '{key}' mapping of dataset classes to findings")
    return ClassMapping({str(k): str(v) for k, v in classes.items()}), raw
