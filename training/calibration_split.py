"""The validation patients cut in two: a part that fits the second stage and a part that sets
its thresholds, and the role every image of a run played.

The order-statistic guarantee of the operating point holds only for scores of images the
classifier never saw (DESIGN.md rule 8), so the thresholds are chosen on "calibration"
patients and the SVM is fitted on the others ("fit"). The cut is per patient (no patient's
images straddle it), seeded, and stratified: patients with an abnormal image, patients with
only normal images and patients of unknown status are each cut at the calibration fraction,
so both parts get abnormal and normal studies.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

ROLES = ("train", "fit", "calibration", "test")
ROLE_COLUMNS = ("image", "patient_id", "role")
#: The manifest split each role comes from.
_ROLE_OF_SPLIT = {"train": "train", "test": "test"}


@dataclass(frozen=True)
class FitCalibrationSplit:
    """Which validation patients fit the second stage and which set its thresholds."""

    fit_patients: frozenset[str]
    calibration_patients: frozenset[str]
    calibration_fraction: float
    seed: int

    def __post_init__(self) -> None:
        both = self.fit_patients & self.calibration_patients
        if both:
            raise ValueError(f"patients in both fit and calibration: {sorted(both)[:5]}")

    def role_of(self, patient_id: str) -> str:
        """'fit' or 'calibration'; KeyError for a patient outside the validation split."""
        if patient_id in self.calibration_patients:
            return "calibration"
        if patient_id in self.fit_patients:
            return "fit"
        raise KeyError(f"patient {patient_id!r} is not in the validation split")

    def calibration_mask(self, patient_ids: Sequence[str]) -> np.ndarray:
        """Boolean mask over rows (one patient id per row): True where the row calibrates."""
        return np.array([self.role_of(p) == "calibration" for p in patient_ids], dtype=bool)

    def fit_mask(self, patient_ids: Sequence[str]) -> np.ndarray:
        """Boolean mask over rows: True where the row fits the second stage."""
        return ~self.calibration_mask(patient_ids)

    def to_dict(self) -> dict[str, object]:
        return {
            "calibration_fraction": self.calibration_fraction,
            "seed": self.seed,
            "fit_patients": sorted(self.fit_patients),
            "calibration_patients": sorted(self.calibration_patients),
        }


def _patient_status(patient_ids: Sequence[str], abnormal: Sequence[int | None]) -> dict[str, str]:
    """Per patient: 'abnormal' if any image is, else 'normal' if any image is, else 'unknown'."""
    status: dict[str, str] = {}
    for patient, value in zip(patient_ids, abnormal, strict=True):
        current = status.get(patient, "unknown")
        if value == 1 or current == "abnormal":
            status[patient] = "abnormal"
        elif value == 0 or current == "normal":
            status[patient] = "normal"
        else:
            status[patient] = "unknown"
    return status


def split_fit_calibration(
    patient_ids: Sequence[str],
    abnormal: Sequence[int | None],
    calibration_fraction: float = 0.5,
    seed: int = 0,
) -> FitCalibrationSplit:
    """Cut the validation rows (one patient id and abnormal status per image) per patient,
    stratified by patient status, so that about `calibration_fraction` of each stratum's
    patients calibrate. Both parts get at least one abnormal and one normal patient; fewer
    than two of either in the validation split is an error, since the SVM needs both classes
    and the threshold needs abnormal studies it was not fitted on."""
    if len(patient_ids) != len(abnormal):
        raise ValueError("patient_ids and abnormal need one value per image")
    if not 0.0 < calibration_fraction < 1.0:
        raise ValueError(f"calibration_fraction must be in (0, 1), got {calibration_fraction!r}")
    status = _patient_status(patient_ids, abnormal)
    rng = np.random.default_rng(seed)
    fit: set[str] = set()
    calibration: set[str] = set()
    for stratum in ("abnormal", "normal", "unknown"):
        # Sorted first so the cut depends on the seed, not on the row order.
        patients = sorted(p for p, s in status.items() if s == stratum)
        if stratum != "unknown" and len(patients) < 2:
            raise ValueError(
                f"the validation split has {len(patients)} patient(s) with {stratum} images; "
                "fitting the second stage and calibrating its threshold on different patients "
                "needs at least 2"
            )
        n_calibration = round(calibration_fraction * len(patients))
        if len(patients) >= 2:  # both parts get a patient of every stratum that has two
            n_calibration = min(max(n_calibration, 1), len(patients) - 1)
        order = rng.permutation(len(patients))
        calibration.update(patients[i] for i in order[:n_calibration])
        fit.update(patients[i] for i in order[n_calibration:])
    return FitCalibrationSplit(
        fit_patients=frozenset(fit),
        calibration_patients=frozenset(calibration),
        calibration_fraction=float(calibration_fraction),
        seed=int(seed),
    )


class SplitImage(Protocol):
    """What an image needs to have a role: a manifest entry (training.dataset) fits."""

    @property
    def image(self) -> Path | str: ...

    @property
    def patient_id(self) -> str: ...

    @property
    def split(self) -> str | None: ...


@dataclass(frozen=True)
class ImageRole:
    """One image of a run and the part it played: train, fit, calibration or test."""

    image: str
    patient_id: str
    role: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"ImageRole.role must be one of {ROLES}, got {self.role!r}")


def image_roles(entries: Iterable[SplitImage], split: FitCalibrationSplit) -> list[ImageRole]:
    """The role of every entry: its manifest split, with validation cut into fit/calibration."""
    roles = []
    for entry in entries:
        if entry.split == "val":
            role = split.role_of(entry.patient_id)
        elif entry.split in _ROLE_OF_SPLIT:
            role = _ROLE_OF_SPLIT[entry.split]
        else:
            raise ValueError(
                f"image {entry.image}: split {entry.split!r} is not train, val or test"
            )
        roles.append(ImageRole(str(entry.image), entry.patient_id, role))
    return roles


def write_image_roles(path: str | Path, roles: Iterable[ImageRole]) -> Path:
    """CSV with columns image, patient_id, role."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(ROLE_COLUMNS)
        for r in roles:
            writer.writerow([r.image, r.patient_id, r.role])
    tmp.replace(path)
    return path


def read_image_roles(path: str | Path) -> list[ImageRole]:
    with Path(path).open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if tuple(reader.fieldnames or ()) != ROLE_COLUMNS:
            raise ValueError(f"{path}: columns must be {list(ROLE_COLUMNS)}")
        return [ImageRole(row["image"], row["patient_id"], row["role"]) for row in reader]
