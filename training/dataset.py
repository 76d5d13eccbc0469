"""Dataset manifests: the one table the training pipeline reads.

A manifest is a CSV file (UTF-8, header row). Paths are relative to the manifest's directory
unless absolute. Columns:

    image         path of a DICOM file (any other suffix than .png/.jpg/.jpeg) or PNG/JPEG
    patient_id    splits are made per patient, never per image
    label_kind    hard (reliable labels, masks where drawn) or weak (e.g. report-mined labels)
    split         train, val, test, or empty for the automatic patient-level 8:1:1 split
    <finding>     one column per finding of the catalogue: 1, 0, or empty for unknown
    mask_<finding>  optional lesion mask of a present finding: a PNG, a .json file of polygons
                  or "rle:" + a SIIM-style run-length string (formats: training/masks.py)
    other_disease optional: the name of a disease outside the catalogue shown by the image
                  (the image is abnormal; it feeds the thesis's Table 9)
    no_finding    optional: 1 when the source states that the image shows no finding at all
                  (its empty finding cells then read as 0); 0 when the source's labels are
                  not exhaustive (an importer writes 0 unless the source says "no finding" or
                  labels every catalogue finding absent); empty when the finding columns are
                  all the manifest claims to know
    study_id      optional: images of one study share it (evaluation reports per study, as
                  the node triages: training/studies.py); empty: the image is a study of its
                  own

An image is abnormal when a finding is 1 or other_disease names a disease. It is normal only
when no_finding is 1, or no_finding is empty and every finding column is 0; otherwise its
status is unknown and it is never used as a normal (second stage, threshold, evaluation, a
member's normal class).

Two rows with the same file content are refused (the error names both rows): a copy of an
image under another patient would straddle the patient-level split. Importers drop such copies
with a warning (training/importers.py). Files are compared by size first and hashed only when
sizes collide (training/file_content.py), so a large manifest is not read twice; empty files
are left to the cache, which reports them as unreadable.

Validation names the row and column of every problem it finds and reports them all at once.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from scxnn_node.atomic_file import write_atomically
from scxnn_node.findings import THESIS_CATALOGUE
from training.file_content import duplicate_content
from training.masks import is_rle, mask_problem
from training.source_images import image_shape

SPLITS = ("train", "val", "test")
LABEL_KINDS = ("hard", "weak")
MASK_PREFIX = "mask_"
NO_FINDING = "no_finding"
STUDY_ID = "study_id"
BASE_COLUMNS = (
    "image",
    "patient_id",
    "label_kind",
    "split",
    "other_disease",
    "no_finding",
    "study_id",
)
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


def abnormal_status(
    labels: Iterable[int | None], other_disease: str = "", no_finding: bool | None = None
) -> int | None:
    """1 if any finding (or a disease outside the catalogue) is present; 0 if the source states
    no finding, or makes no statement (`no_finding` None) and every finding is known absent;
    None when that cannot be told."""
    values = list(labels)
    if other_disease or any(v == 1 for v in values):
        return 1
    if no_finding is True:
        return 0
    if no_finding is None and all(v == 0 for v in values):
        return 0
    return None


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
    no_finding: bool | None = None  # the source's own statement; None: none made
    study_id: str = ""

    def label(self, finding: str) -> int | None:
        return self.labels.get(finding)

    @property
    def abnormal(self) -> int | None:
        return abnormal_status(self.labels.values(), self.other_disease, self.no_finding)

    @property
    def study_key(self) -> str:
        """The study this image belongs to: its study_id, or a study of its own."""
        return self.study_id or f"row-{self.row}"


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


def _parse_no_finding(value: str) -> bool | None:
    label = _parse_label(value)
    return None if label is None else bool(label)


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
    study_patients: dict[str, dict[str, int]] = {}
    image_values: dict[int, str] = {}
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
        other_disease = (row.get("other_disease") or "").strip()
        try:
            no_finding = _parse_no_finding(row.get(NO_FINDING) or "")
        except ValueError as exc:
            problems.append(f"{where}, column '{NO_FINDING}': {exc}")
            no_finding = None
        if no_finding:
            present = [f for f, v in labels.items() if v == 1]
            if present:
                problems.append(
                    f"{where}, column '{NO_FINDING}': 1 (no finding) but {', '.join(present)} "
                    f"{'is' if len(present) == 1 else 'are'} 1"
                )
            if other_disease:
                problems.append(
                    f"{where}, column '{NO_FINDING}': 1 (no finding) but other_disease names "
                    f"{other_disease!r}"
                )
            # "No finding at all" answers every finding the row leaves empty.
            labels = {f: 0 if v is None else v for f, v in labels.items()}
        study_id = (row.get(STUDY_ID) or "").strip()
        if study_id and patient:
            study_patients.setdefault(study_id, {}).setdefault(patient, line)
        masks: dict[str, str] = {}
        for column, finding in mask_columns.items():
            value = (row.get(column) or "").strip()
            if not value or finding not in labels:
                continue
            if labels[finding] != 1:
                problems.append(f"{where}, column {column!r}: a mask for a finding not labelled 1")
                continue
            masks[finding] = value if is_rle(value) else str(_resolve(root, value))
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
                        issue = mask_problem(spec, shape)
                        if issue:
                            problems.append(f"{where}, column '{MASK_PREFIX}{finding}': {issue}")
        if split is not None and patient:
            patient_splits.setdefault(patient, {}).setdefault(split, line)
        image_values[line] = image_value
        entries.append(
            ManifestEntry(
                row=line,
                image=image,
                patient_id=patient,
                label_kind=kind,
                split=split,
                labels=labels,
                masks=masks,
                other_disease=other_disease,
                no_finding=no_finding,
                study_id=study_id,
            )
        )
    for study, patients in sorted(study_patients.items()):
        if len(patients) > 1:
            ordered_patients = sorted(patients.items(), key=lambda x: x[1])
            where = ", ".join(f"{p} (row {r})" for p, r in ordered_patients)
            problems.append(f"study {study!r} spans patients: {where}")
    if check_files:
        for first, later in duplicate_content([e.image for e in entries]):
            a, b = entries[first].row, entries[later].row
            problems.append(
                f"row {b}, column 'image': same content as row {a} "
                f"({image_values[b]}, {image_values[a]})"
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
    no_finding: bool | None = None
    study_id: str = ""


def write_manifest(path: str | Path, rows: Iterable[ManifestRow], findings: Sequence[str]) -> Path:
    """Write rows as a manifest CSV with a column per finding and mask columns where used."""
    path = Path(path)
    rows = list(rows)
    mask_findings = [f for f in findings if any(f in r.masks for r in rows)]
    with_other = any(r.other_disease for r in rows)
    with_no_finding = any(r.no_finding is not None for r in rows)
    with_study = any(r.study_id for r in rows)
    header = ["image", "patient_id", "label_kind", "split", *findings]
    header += [MASK_PREFIX + f for f in mask_findings]
    if with_other:
        header.append("other_disease")
    if with_no_finding:
        header.append(NO_FINDING)
    if with_study:
        header.append(STUDY_ID)

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(header)
            for r in rows:
                line = [r.image, r.patient_id, r.label_kind, r.split]
                line += ["" if r.labels.get(f) is None else str(int(r.labels[f])) for f in findings]
                line += [r.masks.get(f, "") for f in mask_findings]
                if with_other:
                    line.append(r.other_disease)
                if with_no_finding:
                    line.append("" if r.no_finding is None else str(int(r.no_finding)))
                if with_study:
                    line.append(r.study_id)
                writer.writerow(line)

    return write_atomically(path, write)
