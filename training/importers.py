"""Importers: public dataset layouts -> a manifest (see training/dataset.py).

Each reads one layout (class folders, a labels CSV, ChestX-Det JSON, SIIM RLE) and takes a small
YAML mapping from the dataset's own class names to catalogue findings (training/class_mapping.py
says what a mapping value means and when an image counts as normal).

Copies (identical file content) are dropped with a warning naming both files; a copy carrying
other labels is an error. Without a patient column or pattern each image is its own patient
(its file stem), which the importer warns about: the patient-level split can then not keep one
person's images together. Every importer writes the manifest and returns its path; the manifest
is then validated by `load_manifest` like any other.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np

from scxnn_node.config import ConfigError, read_yaml_mapping
from scxnn_node.imaging.decode import read_dataset
from training.class_mapping import (
    IGNORE,
    NORMAL,
    OTHER_PREFIX,
    ClassMapping,
    DatasetImportError,
    SourceLabels,
    read_mapping,
)
from training.dataset import ManifestRow, write_manifest
from training.file_content import duplicate_content
from training.masks import RLE_PREFIX, decode_siim_rle, encode_siim_rle
from training.source_images import RASTER_SUFFIXES

log = logging.getLogger(__name__)


def _warn_stem_patients(count: int, source: str | Path) -> None:
    if count:
        log.warning(
            "%s: %d image(s) have no patient id and are each taken as their own patient (the "
            "file stem); give a patient column or pattern so that the patient-level split keeps "
            "one person's images together",
            source,
            count,
        )


def _warn_ignored(count: int, source: str | Path) -> None:
    if count:
        log.warning(
            "%s: %d image(s) dropped: a class of theirs is mapped to 'ignore'", source, count
        )


def _write_unique(
    out: Path, rows: list[ManifestRow], paths: list[Path], findings: list[str]
) -> Path:
    """Write the manifest without copies: a later file with the same content as an earlier one
    is dropped with a warning when its labels agree, and refused when they do not."""
    dropped: set[int] = set()
    for first, later in duplicate_content(paths):
        a, b = rows[first], rows[later]
        if (a.labels, a.other_disease, a.no_finding) != (b.labels, b.other_disease, b.no_finding):
            raise DatasetImportError(
                f"{paths[later]} has the same content as {paths[first]} but different labels"
            )
        log.warning("%s has the same content as %s; dropped", paths[later], paths[first])
        dropped.add(later)
    kept = [r for i, r in enumerate(rows) if i not in dropped]
    return write_manifest(out, kept, findings)


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
    rows, paths, ignored = [], [], 0
    for image, label, name in found:
        source = mapping.labels_for([label], str(image))
        if source is None:
            ignored += 1
            continue
        rows.append(
            ManifestRow(
                image=_relative(image, out.parent),
                patient_id=_patient_from(name, patient_regex, str(image)),
                labels=source.labels,
                other_disease=source.other_disease,
                no_finding=source.no_finding,
            )
        )
        paths.append(image)
    _warn_ignored(ignored, root)
    _warn_stem_patients(0 if patient_regex or patient_column else len(rows), root)
    return _write_unique(out, rows, paths, mapping.findings)


def import_generic_csv(source: str | Path, mapping_path: str | Path, out: str | Path) -> Path:
    """A labels table of another dataset. The mapping file says which columns hold what:

    image_column: Image Index          # required
    patient_column: Patient ID         # optional; default: the image's file stem
    image_root: images                 # optional, relative to the source CSV
    label_kind: hard                   # or weak; or label_kind_column
    split_column: split                # optional, values train/val/test
    # either one column per finding (CheXpert-like); a column mapped to normal states no
    # finding when positive, one mapped to ignore drops the image when positive:
    columns: {No Finding: normal, Pneumothorax: pneumothorax, Cardiomegaly: cardiomegaly}
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
    rows, paths, ignored = [], [], 0
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
                others: list[str] = []
                stated_normal = dropped = False
                for column, target in column_map.classes.items():
                    value = row[column].strip()
                    v = 1 if value in positive else 0 if value in negative else None
                    if target in findings:
                        # Several source columns may map to one finding: any positive wins.
                        prev = labels.get(target)
                        labels[target] = v if prev is None or v == 1 else prev
                    elif v != 1:
                        continue
                    elif target == NORMAL:
                        stated_normal = True
                    elif target == IGNORE:
                        dropped = True
                    elif target.startswith(OTHER_PREFIX):
                        others.append(target[len(OTHER_PREFIX) :])
                labelled: SourceLabels | None = (
                    None if dropped else SourceLabels.of(labels, others, stated_normal)
                )
            else:
                names = [n.strip() for n in row[multi].split(options.get("separator", "|"))]
                labelled = class_map.labels_for([n for n in names if n], where)
            if labelled is None:
                ignored += 1
                continue
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
                    labels=labelled.labels,
                    label_kind=kind,
                    split=row[options["split_column"]] if options.get("split_column") else "",
                    other_disease=labelled.other_disease,
                    no_finding=labelled.no_finding,
                )
            )
            paths.append(image)
    _warn_ignored(ignored, source)
    _warn_stem_patients(0 if options.get("patient_column") else len(rows), source)
    return _write_unique(out, rows, paths, findings)


def import_chestx_det(
    annotations: str | Path,
    images: str | Path,
    mapping_path: str | Path,
    out: str | Path,
    patient_regex: str | None = None,
) -> Path:
    """ChestX-Det style JSON: a list of {"file_name", "syms": [class, ...], "polygons":
    [[[x, y], ...], ...]} with one polygon per sym. Each mapped finding's polygons become a
    polygon JSON mask next to the manifest (out_dir/masks/). An image without syms is normal
    only when the mapping says `unannotated: normal` (the default, `unknown`, leaves open what
    the annotators did not look for)."""
    out, images = Path(out), Path(images)
    mapping, options = read_mapping(mapping_path)
    patient_regex = patient_regex or options.get("patient_regex")
    unannotated = str(options.get("unannotated", "unknown"))
    if unannotated not in ("normal", "unknown"):
        raise DatasetImportError(f"{mapping_path}: unannotated must be normal or unknown")
    try:
        items = json.loads(Path(annotations).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetImportError(f"{annotations}: unreadable ({exc})") from None
    if not isinstance(items, list):
        raise DatasetImportError(f"{annotations}: expected a JSON list of images")
    mask_dir = out.parent / "masks"
    mask_dir.mkdir(parents=True, exist_ok=True)
    rows, paths, ignored = [], [], 0
    for n, item in enumerate(items):
        where = f"{annotations} item {n}"
        try:
            name, syms = item["file_name"], list(item.get("syms", []))
            polygons = list(item.get("polygons", []))
        except (TypeError, KeyError):
            raise DatasetImportError(f"{where}: needs file_name, syms and polygons") from None
        if len(polygons) != len(syms):
            raise DatasetImportError(f"{where}: {len(syms)} syms but {len(polygons)} polygons")
        labelled = mapping.labels_for(syms, where, empty_is_normal=unannotated == "normal")
        if labelled is None:
            ignored += 1
            continue
        by_finding: dict[str, list[Any]] = {}
        for sym, polygon in zip(syms, polygons, strict=True):
            target = mapping.target(sym, where)
            if target in labelled.labels and polygon:
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
                labels=labelled.labels,
                masks=masks,
                other_disease=labelled.other_disease,
                no_finding=labelled.no_finding,
            )
        )
        paths.append(images / name)
    _warn_ignored(ignored, annotations)
    _warn_stem_patients(len(rows) if not patient_regex else 0, annotations)
    return _write_unique(out, rows, paths, mapping.findings)


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
    rows, paths, stem_patients = [], [], 0
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
        patient = str(ds.get("PatientID", "") or "").strip()
        stem_patients += not patient
        labels: dict[str, int | None] = {"pneumothorax": int(bool(lesions))}
        rows.append(
            ManifestRow(
                image=_relative(path, out.parent),
                patient_id=patient or image_id,
                labels=labels,
                masks=masks,
                # SIIM labels pneumothorax only: a negative image is not known to be normal.
                no_finding=SourceLabels.of(labels, (), stated_normal=False).no_finding,
            )
        )
        paths.append(path)
    _warn_stem_patients(stem_patients, rle_csv)
    return _write_unique(out, rows, paths, ["pneumothorax"])
