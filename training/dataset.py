"""Dataset manifests: the one table the training pipeline reads.

A manifest is a CSV file (UTF-8, header row). Paths are relative to the manifest's directory
unless absolute. Columns:

    image         path of a DICOM file (any other suffix than .png/.jpg/.jpeg) or PNG/JPEG
    patient_id    splits are made per patient, never per image
    label_kind    hard (reliable labels, masks where drawn) or weak (e.g. report-mined labels)
    split         train, val, test, or empty for the automatic patient-level 8:1:1 split
    <finding>     one column per finding of the catalogue: 1, 0, or empty for unknown
    mask_<finding>  optional lesion mask of a present finding: a PNG (non-zero = lesion, the
                  image's size), a .json file of polygons in image pixels
                  ({"polygons": [[[x, y], ...], ...]}), or "rle:" + a SIIM-style run-length
                  string (start/length pairs, starts relative to the previous run's end,
                  pixels counted column by column)
    other_disease optional: the name of a disease outside the catalogue shown by the image
                  (the image is abnormal; it feeds the thesis's Table 9)

Validation names the row and column of every problem it finds and reports them all at once.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from scxnn_node.findings import THESIS_CATALOGUE
from scxnn_node.imaging.decode import load_image, read_dataset

SPLITS = ("train", "val", "test")
LABEL_KINDS = ("hard", "weak")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_PREFIX = "mask_"
RLE_PREFIX = "rle:"
BASE_COLUMNS = ("image", "patient_id", "label_kind", "split", "other_disease")
REQUIRED_COLUMNS = ("image", "patient_id")


class ManifestError(Exception):
    """A manifest that cannot be used; one line per problem, each naming its row and column."""

    def __init__(self, path: str | Path, problems: Sequence[str]) -> None:
        self.path = str(path)
        self.problems = list(problems)
        shown = self.problems[:20]
        more = len(self.problems) - len(shown)
        tail = f"\n  ... and {more} more" if more > 0 else ""
        super().__init__(f"{path}: {len(self.problems)} problem(s)\n  " + "\n  ".join(shown) + tail)


@dataclass(frozen=True)
class ManifestEntry:
    """One image of a manifest, its labels and masks; paths already resolved."""

    row: int  # line number in the CSV file (header is line 1)
    image: Path
    patient_id: str
    label_kind: str
    split: str | None
    labels: dict[str, int | None]
    masks: dict[str, str] = field(default_factory=dict)  # finding -> resolved path or rle:...
    other_disease: str = ""

    def label(self, finding: str) -> int | None:
        return self.labels.get(finding)

    @property
    def abnormal(self) -> int | None:
        """1 if any finding (or a disease outside the catalogue) is present, 0 if every
        finding is known absent, None when that cannot be told."""
        values = list(self.labels.values())
        if self.other_disease or any(v == 1 for v in values):
            return 1
        if all(v == 0 for v in values):
            return 0
        return None


@dataclass(frozen=True)
class DatasetManifest:
    path: Path
    sha256: str
    findings: tuple[str, ...]  # the finding columns, in catalogue order
    entries: tuple[ManifestEntry, ...]

    def split(self, name: str) -> list[ManifestEntry]:
        return [e for e in self.entries if e.split == name]

    def split_counts(self) -> dict[str, int]:
        return {s: sum(1 for e in self.entries if e.split == s) for s in SPLITS}

    def with_automatic_split(
        self, seed: int = 0, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
    ) -> DatasetManifest:
        """Give every entry without a split one, per patient: patients with only weak-label
        images train (as in the thesis); the rest are shuffled and cut 8:1:1."""
        assigned: dict[str, str] = {}
        for e in self.entries:
            if e.split is not None:
                assigned[e.patient_id] = e.split
        open_patients = sorted({e.patient_id for e in self.entries} - set(assigned))
        has_hard = {e.patient_id for e in self.entries if e.label_kind == "hard"}
        weak_only = [p for p in open_patients if p not in has_hard]
        hard = [p for p in open_patients if p in has_hard]
        order = np.random.default_rng(seed).permutation(len(hard))
        n_val = round(fractions[1] * len(hard))
        n_test = round(fractions[2] * len(hard))
        if len(hard) >= 3:  # every split gets a patient once there are enough of them
            n_val, n_test = max(n_val, 1), max(n_test, 1)
        n_train = len(hard) - n_val - n_test
        for rank, i in enumerate(order):
            split = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
            assigned[hard[i]] = split
        for p in weak_only:
            assigned[p] = "train"
        entries = tuple(replace(e, split=assigned[e.patient_id]) for e in self.entries)
        return replace(self, entries=entries)


def is_raster(path: Path) -> bool:
    return path.suffix.lower() in RASTER_SUFFIXES


def image_shape(path: Path) -> tuple[int, int]:
    """(rows, columns) of an image file without decoding its pixels."""
    if is_raster(path):
        with Image.open(path) as im:
            return im.height, im.width
    ds = read_dataset(path)
    return int(ds.Rows), int(ds.Columns)


def read_source_pixels(path: Path) -> np.ndarray:
    """Pixels of a DICOM (modality units, bone bright) or PNG/JPEG (colour made gray)."""
    if not is_raster(path):
        return load_image(path).pixels
    pixels = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise ValueError(f"{path}: not a readable PNG/JPEG image")
    if pixels.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if pixels.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        pixels = cv2.cvtColor(pixels, code)
    return pixels


def decode_siim_rle(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """SIIM-ACR run-length string -> 0/1 mask of `shape` (rows, columns)."""
    rows, cols = shape
    values = [int(v) for v in rle.split()]
    if len(values) % 2:
        raise ValueError("RLE needs start/length pairs (an even count of numbers)")
    flat = np.zeros(rows * cols, np.uint8)
    position = 0
    for start, length in zip(values[0::2], values[1::2], strict=True):
        if start < 0 or length < 0:
            raise ValueError("RLE starts and lengths must not be negative")
        position += start
        if position + length > flat.size:
            raise ValueError(f"RLE runs past the end of a {rows}x{cols} image")
        flat[position : position + length] = 1
        position += length
    return flat.reshape(cols, rows).T.copy()  # pixels counted column by column


def encode_siim_rle(mask: np.ndarray) -> str:
    """0/1 mask -> SIIM-ACR run-length string (the inverse of decode_siim_rle)."""
    flat = (np.asarray(mask) > 0).T.reshape(-1).astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], flat, [0]])))
    starts, ends = edges[0::2], edges[1::2]
    out, previous_end = [], 0
    for s, e in zip(starts, ends, strict=True):
        out += [int(s - previous_end), int(e - s)]
        previous_end = e
    return " ".join(str(v) for v in out)


def polygons_to_mask(
    polygons: Sequence[Sequence[Sequence[float]]], shape: tuple[int, int]
) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    for polygon in polygons:
        points = np.asarray(polygon, dtype=np.float64)
        if points.ndim != 2 or points.shape[1] != 2 or len(points) < 3:
            raise ValueError("a polygon is a list of at least 3 [x, y] points")
        cv2.fillPoly(mask, [np.rint(points).astype(np.int32)], 1)
    return mask


def read_polygon_file(path: Path) -> list[list[list[float]]]:
    data = json.loads(path.read_text())
    polygons = data.get("polygons") if isinstance(data, dict) else data
    if not isinstance(polygons, list):
        raise ValueError(f"{path}: expected {{'polygons': [...]}} or a list of polygons")
    return polygons


def read_mask(spec: str, shape: tuple[int, int]) -> np.ndarray:
    """A mask reference from a manifest -> 0/1 uint8 mask of the image's `shape`."""
    if spec.startswith(RLE_PREFIX):
        return decode_siim_rle(spec[len(RLE_PREFIX) :], shape)
    path = Path(spec)
    if path.suffix.lower() == ".json":
        return polygons_to_mask(read_polygon_file(path), shape)
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if mask is None:
        raise ValueError(f"{path}: not a readable mask image")
    if mask.shape != shape:
        raise ValueError(
            f"{path}: mask is {mask.shape[0]}x{mask.shape[1]}, image {shape[0]}x{shape[1]}"
        )
    return (mask > 0).astype(np.uint8)


def _check_mask(spec: str, shape: tuple[int, int]) -> str | None:
    """None if the mask fits the image, else what is wrong with it."""
    if not spec.startswith(RLE_PREFIX) and not Path(spec).is_file():
        return f"mask file not found: {spec}"
    try:
        if not spec.startswith(RLE_PREFIX) and Path(spec).suffix.lower() == ".png":
            with Image.open(spec) as im:
                size = (im.height, im.width)
            if size != shape:
                return (
                    f"mask size mismatch: mask is {size[0]}x{size[1]}, "
                    f"image is {shape[0]}x{shape[1]}"
                )
            return None
        if not read_mask(spec, shape).any():
            return "mask is empty (no lesion pixel inside the image)"
        return None
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        return str(exc)


def _parse_label(value: str) -> int | None:
    value = value.strip()
    if value == "":
        return None
    if value in ("1", "1.0"):
        return 1
    if value in ("0", "0.0"):
        return 0
    raise ValueError(f"expected 1, 0 or empty, got {value!r}")


def _resolve(root: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else root / p


def load_manifest(
    path: str | Path,
    known_findings: Sequence[str] = tuple(THESIS_CATALOGUE.names),
    check_files: bool = True,
) -> DatasetManifest:
    """Read and validate a manifest; raise ManifestError listing every problem."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestError(path, [f"cannot read manifest ({exc.strerror})"]) from None
    root = path.parent
    problems: list[str] = []
    reader = csv.DictReader(raw.decode("utf-8-sig").splitlines())
    columns = list(reader.fieldnames or [])
    missing = [c for c in REQUIRED_COLUMNS if c not in columns]
    if missing:
        raise ManifestError(path, [f"missing required column(s) {missing}"])
    finding_columns: list[str] = []
    mask_columns: dict[str, str] = {}
    for column in columns:
        if column in BASE_COLUMNS:
            continue
        if column.startswith(MASK_PREFIX):
            finding = column[len(MASK_PREFIX) :]
            if finding not in known_findings:
                problems.append(f"column {column!r}: unknown finding {finding!r}")
            mask_columns[column] = finding
        elif column in known_findings:
            finding_columns.append(column)
        else:
            problems.append(
                f"column {column!r}: unknown finding (known: {', '.join(known_findings)})"
            )
    for column, finding in mask_columns.items():
        if finding in known_findings and finding not in finding_columns:
            problems.append(f"column {column!r}: no label column {finding!r} beside it")
    if not finding_columns:
        problems.append("no finding columns: a manifest needs at least one")
    ordered = tuple(f for f in known_findings if f in finding_columns)

    entries: list[ManifestEntry] = []
    seen_images: dict[Path, int] = {}
    patient_splits: dict[str, dict[str, int]] = {}
    for line, row in enumerate(reader, start=2):
        where = f"row {line}"
        image_value = (row.get("image") or "").strip()
        patient = (row.get("patient_id") or "").strip()
        if not image_value:
            problems.append(f"{where}, column 'image': empty")
            continue
        if not patient:
            problems.append(f"{where}, column 'patient_id': empty")
        image = _resolve(root, image_value)
        if image in seen_images:
            problems.append(
                f"{where}, column 'image': {image_value} already listed on row {seen_images[image]}"
            )
        seen_images[image] = line
        kind = (row.get("label_kind") or "hard").strip() or "hard"
        if kind not in LABEL_KINDS:
            problems.append(f"{where}, column 'label_kind': expected hard or weak, got {kind!r}")
        split = (row.get("split") or "").strip() or None
        if split is not None and split not in SPLITS:
            problems.append(f"{where}, column 'split': expected train/val/test, got {split!r}")
        labels: dict[str, int | None] = {}
        for finding in ordered:
            try:
                labels[finding] = _parse_label(row.get(finding) or "")
            except ValueError as exc:
                problems.append(f"{where}, column {finding!r}: {exc}")
        masks: dict[str, str] = {}
        for column, finding in mask_columns.items():
            value = (row.get(column) or "").strip()
            if not value or finding not in labels:
                continue
            if labels[finding] != 1:
                problems.append(f"{where}, column {column!r}: a mask for a finding not labelled 1")
                continue
            masks[finding] = value if value.startswith(RLE_PREFIX) else str(_resolve(root, value))
        if check_files:
            if not image.is_file():
                problems.append(f"{where}, column 'image': file not found: {image}")
            elif masks:
                try:
                    shape = image_shape(image)
                except Exception as exc:
                    problems.append(f"{where}, column 'image': unreadable ({exc})")
                else:
                    for finding, spec in masks.items():
                        issue = _check_mask(spec, shape)
                        if issue:
                            problems.append(f"{where}, column '{MASK_PREFIX}{finding}': {issue}")
        if split is not None and patient:
            patient_splits.setdefault(patient, {}).setdefault(split, line)
        entries.append(
            ManifestEntry(
                row=line,
                image=image,
                patient_id=patient,
                label_kind=kind,
                split=split,
                labels=labels,
                masks=masks,
                other_disease=(row.get("other_disease") or "").strip(),
            )
        )
    for patient, splits in sorted(patient_splits.items()):
        if len(splits) > 1:
            where = ", ".join(
                f"{s} (row {r})" for s, r in sorted(splits.items(), key=lambda x: x[1])
            )
            problems.append(f"patient {patient!r} is in more than one split: {where}")
    # A patient with some rows split and others empty would straddle splits after the automatic
    # split too; the automatic split follows the explicit one, so only true conflicts remain.
    if not entries and not problems:
        problems.append("no rows")
    if problems:
        raise ManifestError(path, problems)
    return DatasetManifest(
        path=path,
        sha256=hashlib.sha256(raw).hexdigest(),
        findings=ordered,
        entries=tuple(entries),
    )


@dataclass
class ManifestRow:
    """A row being written by an importer or the synthetic generator."""

    image: str
    patient_id: str
    labels: dict[str, int | None]
    label_kind: str = "hard"
    split: str = ""
    masks: dict[str, str] = field(default_factory=dict)
    other_disease: str = ""


def write_manifest(path: str | Path, rows: Iterable[ManifestRow], findings: Sequence[str]) -> Path:
    """Write rows as a manifest CSV with a column per finding and mask columns where used."""
    path = Path(path)
    rows = list(rows)
    mask_findings = [f for f in findings if any(f in r.masks for r in rows)]
    with_other = any(r.other_disease for r in rows)
    header = ["image", "patient_id", "label_kind", "split", *findings]
    header += [MASK_PREFIX + f for f in mask_findings]
    if with_other:
        header.append("other_disease")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for r in rows:
            line = [r.image, r.patient_id, r.label_kind, r.split]
            line += ["" if r.labels.get(f) is None else str(int(r.labels[f])) for f in findings]
            line += [r.masks.get(f, "") for f in mask_findings]
            if with_other:
                line.append(r.other_disease)
            writer.writerow(line)
    tmp.replace(path)
    return path
