"""Importers: public dataset layouts -> a manifest (see training/dataset.py).

Each takes a small YAML mapping from the dataset's own class names to catalogue findings.
A mapping value is a finding name, `normal` (the class means no finding), `other:<name>` (a
disease outside the catalogue, recorded in other_disease) or `ignore` (the class is dropped
from the labels). Every importer writes the manifest and returns its path; the manifest is then
validated by `load_manifest` like any other.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scxnn_node.config import ConfigError, read_yaml_mapping
from scxnn_node.findings import THESIS_CATALOGUE
from scxnn_node.imaging.decode import read_dataset
from training.dataset import (
    RASTER_SUFFIXES,
    RLE_PREFIX,
    ManifestRow,
    decode_siim_rle,
    encode_siim_rle,
    write_manifest,
)

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

    def labels_for(self, names: Iterable[str], source: str) -> tuple[dict[str, int | None], str]:
        """Exhaustive labels over the mapped findings for an image showing `names`, and its
        outside-catalogue disease (if any)."""
        labels: dict[str, int | None] = dict.fromkeys(self.findings, 0)
        others = []
        for name in names:
            target = self.target(name, source)
            if target in labels:
                labels[target] = 1
            elif target.startswith(OTHER_PREFIX):
                others.append(target[len(OTHER_PREFIX) :])
        return labels, "; ".join(sorted(set(others)))


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


def _patient_from(name: str, pattern: str | None, source: str) -> str:
    if not pattern:
        return Path(name).stem
    match = re.search(pattern, name)
    if not match:
        raise DatasetImportError(f"{source}: patient pattern {pattern!r} does not match {name!r}")
    return match.group(1) if match.groups() else match.group(0)


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.resolve().relative_to(base.resolve()))
    except ValueError:
        return str(path.resolve())


def import_class_folders(
    root: str | Path,
    mapping_path: str | Path,
    out: str | Path,
    labels_csv: str | Path | None = None,
    patient_regex: str | None = None,
    patient_column: str | None = None,
) -> Path:
    """One class per image: either sub-folders named by class (root/<class>/*.png), or a
    labels CSV with `image` and `label` columns (the layout of the Kermany sample). The
    patient id comes from `patient_regex` applied to the file name (or to `patient_column` of
    the labels CSV); without a pattern each image is its own patient."""
    root, out = Path(root), Path(out)
    mapping, options = read_mapping(mapping_path)
    patient_regex = patient_regex or options.get("patient_regex")
    patient_column = patient_column or options.get("patient_column")
    found: list[tuple[Path, str, str]] = []  # image, class, name for the patient pattern
    if labels_csv is not None:
        with open(labels_csv, newline="") as fh:
            reader = csv.DictReader(fh)
            for col in ("image", "label", *([patient_column] if patient_column else [])):
                if col not in (reader.fieldnames or []):
                    raise DatasetImportError(f"{labels_csv}: no column {col!r}")
            for row in reader:
                image = root / row["image"]
                found.append(
                    (image, row["label"], row[patient_column] if patient_column else image.name)
                )
    else:
        for folder in sorted(p for p in root.iterdir() if p.is_dir()):
            for image in sorted(folder.iterdir()):
                if image.suffix.lower() in (*RASTER_SUFFIXES, ".dcm"):
                    found.append((image, folder.name, image.name))
    if not found:
        raise DatasetImportError(f"{root}: no images found")
    rows = []
    for image, label, name in found:
        if mapping.target(label, str(image)) == IGNORE:
            continue
        labels, other = mapping.labels_for([label], str(image))
        rows.append(
            ManifestRow(
                image=_relative(image, out.parent),
                patient_id=_patient_from(name, patient_regex, str(image)),
                labels=labels,
                other_disease=other,
            )
        )
    return write_manifest(out, rows, mapping.findings)


def import_generic_csv(source: str | Path, mapping_path: str | Path, out: str | Path) -> Path:
    """A labels table of another dataset. The mapping file says which columns hold what:

    image_column: Image Index          # required
    patient_column: Patient ID         # optional; default: the image's file stem
    image_root: images                 # optional, relative to the source CSV
    label_kind: hard                   # or weak; or label_kind_column
    split_column: split                # optional, values train/val/test
    # either one column per finding (CheXpert-like):
    columns: {Pneumothorax: pneumothorax, Cardiomegaly: cardiomegaly}
    positive: ["1", "1.0"]             # other values than positive/negative = unknown
    negative: ["0", "0.0"]
    # or one multi-label column (NIH-like):
    labels_column: Finding Labels
    separator: "|"
    classes: {Pneumothorax: pneumothorax, No Finding: normal, Pneumonia: other:pneumonia}
    """
    source, out = Path(source), Path(out)
    try:
        options = read_yaml_mapping(mapping_path)
    except ConfigError as exc:
        raise DatasetImportError(str(exc)) from None
    image_column = options.get("image_column")
    if not image_column:
        raise DatasetImportError(f"{mapping_path}: needs image_column")
    image_root = source.parent / str(options.get("image_root", "."))
    per_column = options.get("columns")
    multi = options.get("labels_column")
    if bool(per_column) == bool(multi):
        raise DatasetImportError(
            f"{mapping_path}: give exactly one of 'columns' or 'labels_column'"
        )
    positive = {str(v) for v in options.get("positive", ["1", "1.0"])}
    negative = {str(v) for v in options.get("negative", ["0", "0.0"])}
    if per_column:
        column_map = ClassMapping({str(k): str(v) for k, v in per_column.items()})
        findings = column_map.findings
    else:
        class_map, _ = read_mapping(mapping_path)
        findings = class_map.findings
    rows = []
    with open(source, newline="") as fh:
        reader = csv.DictReader(fh)
        needed = [image_column, *(per_column or {}), *([multi] if multi else [])]
        for key in ("patient_column", "label_kind_column", "split_column"):
            if options.get(key):
                needed.append(options[key])
        missing = [c for c in needed if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetImportError(f"{source}: columns {missing} not found")
        for line, row in enumerate(reader, start=2):
            where = f"{source} row {line}"
            if per_column:
                labels: dict[str, int | None] = {}
                other = ""
                for column, target in column_map.classes.items():
                    value = row[column].strip()
                    v = 1 if value in positive else 0 if value in negative else None
                    if target in findings:
                        # Several source columns may map to one finding: any positive wins.
                        prev = labels.get(target)
                        labels[target] = v if prev is None or v == 1 else prev
                    elif target.startswith(OTHER_PREFIX) and v == 1:
                        other = target[len(OTHER_PREFIX) :]
            else:
                names = [n.strip() for n in row[multi].split(options.get("separator", "|"))]
                labels, other = class_map.labels_for([n for n in names if n], where)
            image = image_root / row[image_column]
            patient = (
                row[options["patient_column"]] if options.get("patient_column") else image.stem
            )
            kind = (
                row[options["label_kind_column"]]
                if options.get("label_kind_column")
                else str(options.get("label_kind", "hard"))
            )
            rows.append(
                ManifestRow(
                    image=_relative(image, out.parent),
                    patient_id=patient,
                    labels=labels,
                    label_kind=kind,
                    split=row[options["split_column"]] if options.get("split_column") else "",
                    other_disease=other,
                )
            )
    return write_manifest(out, rows, findings)


def import_chestx_det(
    annotations: str | Path,
    images: str | Path,
    mapping_path: str | Path,
    out: str | Path,
    patient_regex: str | None = None,
) -> Path:
    """ChestX-Det style JSON: a list of {"file_name", "syms": [class, ...], "polygons":
    [[[x, y], ...], ...]} with one polygon per sym. Each mapped finding's polygons become a
    polygon JSON mask next to the manifest (out_dir/masks/)."""
    out, images = Path(out), Path(images)
    mapping, options = read_mapping(mapping_path)
    patient_regex = patient_regex or options.get("patient_regex")
    try:
        items = json.loads(Path(annotations).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetImportError(f"{annotations}: unreadable ({exc})") from None
    if not isinstance(items, list):
        raise DatasetImportError(f"{annotations}: expected a JSON list of images")
    mask_dir = out.parent / "masks"
    mask_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for n, item in enumerate(items):
        where = f"{annotations} item {n}"
        try:
            name, syms = item["file_name"], list(item.get("syms", []))
            polygons = list(item.get("polygons", []))
        except (TypeError, KeyError):
            raise DatasetImportError(f"{where}: needs file_name, syms and polygons") from None
        if len(polygons) != len(syms):
            raise DatasetImportError(f"{where}: {len(syms)} syms but {len(polygons)} polygons")
        labels, other = mapping.labels_for(syms, where)
        by_finding: dict[str, list[Any]] = {}
        for sym, polygon in zip(syms, polygons, strict=True):
            target = mapping.target(sym, where)
            if target in labels and polygon:
                by_finding.setdefault(target, []).append(polygon)
        masks = {}
        for finding, polys in by_finding.items():
            mask_file = mask_dir / f"{Path(name).stem}.{finding}.json"
            mask_file.write_text(json.dumps({"polygons": polys}))
            masks[finding] = _relative(mask_file, out.parent)
        rows.append(
            ManifestRow(
                image=_relative(images / name, out.parent),
                patient_id=_patient_from(name, patient_regex, where),
                labels=labels,
                masks=masks,
                other_disease=other,
            )
        )
    return write_manifest(out, rows, mapping.findings)


def import_siim(rle_csv: str | Path, images: str | Path, out: str | Path) -> Path:
    """SIIM-ACR pneumothorax: a CSV of ImageId, EncodedPixels (-1 for none; several rows for
    several lesions) and DICOM files named <ImageId>.dcm anywhere under `images`. The patient
    id is the DICOM PatientID; masks are kept as RLE in the manifest (merged per image)."""
    rle_csv, images, out = Path(rle_csv), Path(images), Path(out)
    files = {p.stem: p for p in images.rglob("*.dcm")}
    runs: dict[str, list[str]] = {}
    with open(rle_csv, newline="") as fh:
        reader = csv.reader(fh)
        header = [h.strip() for h in next(reader, [])]
        if header[:2] != ["ImageId", "EncodedPixels"]:
            raise DatasetImportError(f"{rle_csv}: expected columns ImageId, EncodedPixels")
        for row in reader:
            if len(row) < 2:
                continue
            image_id, rle = row[0].strip(), row[1].strip()
            runs.setdefault(image_id, [])
            if rle and rle != "-1":
                runs[image_id].append(rle)
    rows = []
    for image_id, lesions in runs.items():
        path = files.get(image_id)
        if path is None:
            raise DatasetImportError(f"{rle_csv}: no DICOM file {image_id}.dcm under {images}")
        ds = read_dataset(path)
        masks = {}
        if lesions:
            shape = (int(ds.Rows), int(ds.Columns))
            merged = np.zeros(shape, np.uint8)
            for rle in lesions:
                merged |= decode_siim_rle(rle, shape)
            masks["pneumothorax"] = RLE_PREFIX + encode_siim_rle(merged)
        rows.append(
            ManifestRow(
                image=_relative(path, out.parent),
                patient_id=str(ds.get("PatientID", "")) or image_id,
                labels={"pneumothorax": int(bool(lesions))},
                masks=masks,
            )
        )
    return write_manifest(out, rows, ["pneumothorax"])
