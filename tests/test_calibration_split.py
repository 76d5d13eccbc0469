"""The validation split cut per patient into fit and calibration parts, and image roles."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from training.calibration_split import (
    ImageRole,
    image_roles,
    read_image_roles,
    split_fit_calibration,
    write_image_roles,
)


def _validation_rows(seed: int = 0, n_patients: int = 60) -> tuple[list[str], list[int | None]]:
    """Patients with 1-3 images; about a third abnormal, a few of unknown status."""
    rng = np.random.default_rng(seed)
    patients: list[str] = []
    abnormal: list[int | None] = []
    for p in range(n_patients):
        status = rng.choice(["abnormal", "normal", "unknown"], p=[0.35, 0.55, 0.1])
        for i in range(rng.integers(1, 4)):
            patients.append(f"P{p:03d}")
            if status == "abnormal":
                abnormal.append(1 if i == 0 else int(rng.integers(0, 2)))
            elif status == "normal":
                abnormal.append(0)
            else:
                abnormal.append(None)
    return patients, abnormal


def test_split_is_per_patient_and_covers_every_validation_patient():
    patients, abnormal = _validation_rows()
    split = split_fit_calibration(patients, abnormal, 0.5, seed=1)
    assert split.fit_patients | split.calibration_patients == set(patients)
    assert not split.fit_patients & split.calibration_patients
    cal = split.calibration_mask(patients)
    for p in set(patients):
        rows = [i for i, q in enumerate(patients) if q == p]
        assert len(set(cal[rows])) == 1  # no patient's images straddle the cut
    np.testing.assert_array_equal(split.fit_mask(patients), ~cal)


def test_both_parts_get_abnormal_and_normal_studies():
    # Only two abnormal patients among many normal ones: one on each side.
    patients = ["A1", "A2"] + [f"N{i}" for i in range(30)]
    abnormal: list[int | None] = [1, 1] + [0] * 30
    for seed in range(20):
        split = split_fit_calibration(patients, abnormal, calibration_fraction=0.1, seed=seed)
        cal = split.calibration_mask(patients)
        y = np.array(abnormal)
        assert (y[cal] == 1).any() and (y[~cal] == 1).any()
        assert (y[cal] == 0).any() and (y[~cal] == 0).any()


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.8])
def test_each_stratum_is_cut_at_the_fraction(fraction: float):
    patients, abnormal = _validation_rows(seed=2, n_patients=200)
    split = split_fit_calibration(patients, abnormal, fraction, seed=0)
    abnormal_patients = {p for p, a in zip(patients, abnormal, strict=True) if a == 1}
    normal_patients = {p for p, a in zip(patients, abnormal, strict=True) if a == 0}
    normal_patients -= abnormal_patients
    for stratum in (abnormal_patients, normal_patients):
        share = len(stratum & split.calibration_patients) / len(stratum)
        assert share == pytest.approx(fraction, abs=1.0 / len(stratum))


def test_split_is_seeded_and_independent_of_row_order():
    patients, abnormal = _validation_rows(seed=3)
    a = split_fit_calibration(patients, abnormal, 0.5, seed=7)
    b = split_fit_calibration(patients[::-1], abnormal[::-1], 0.5, seed=7)
    c = split_fit_calibration(patients, abnormal, 0.5, seed=8)
    assert a == b
    assert a.calibration_patients != c.calibration_patients


def test_too_few_abnormal_patients_or_a_bad_fraction_is_refused():
    with pytest.raises(ValueError, match="1 patient"):
        split_fit_calibration(["A", "N1", "N2"], [1, 0, 0])
    with pytest.raises(ValueError, match="0 patient"):
        split_fit_calibration(["A", "B"], [1, 1])
    with pytest.raises(ValueError, match="calibration_fraction"):
        split_fit_calibration(["A", "B", "C", "D"], [1, 1, 0, 0], calibration_fraction=1.0)


@dataclass(frozen=True)
class _Entry:
    image: Path
    patient_id: str
    split: str | None


def test_image_roles_round_trip_through_csv(tmp_path: Path):
    entries = [
        _Entry(Path("/d/t1.png"), "T", "train"),
        _Entry(Path("/d/t2.png"), "T", "train"),
        _Entry(Path("/d/a1.png"), "A1", "val"),
        _Entry(Path("/d/a2.png"), "A2", "val"),
        _Entry(Path("/d/n1.png"), "N1", "val"),
        _Entry(Path("/d/n2.png"), "N2", "val"),
        _Entry(Path("/d/x.png"), "X", "test"),
    ]
    val = [e for e in entries if e.split == "val"]
    split = split_fit_calibration([e.patient_id for e in val], [1, 1, 0, 0], 0.5, seed=0)
    roles = image_roles(entries, split)
    assert [r.role for r in roles[:2]] == ["train", "train"]
    assert roles[-1] == ImageRole("/d/x.png", "X", "test")
    val_roles = {r.patient_id: r.role for r in roles[2:-1]}
    assert val_roles == {p: split.role_of(p) for p in ("A1", "A2", "N1", "N2")}
    assert sorted(val_roles.values()) == ["calibration", "calibration", "fit", "fit"]
    path = write_image_roles(tmp_path / "roles" / "image_roles.csv", roles)
    assert path.read_text().splitlines()[0] == "image,patient_id,role"
    assert read_image_roles(path) == roles


def test_image_roles_refuse_unsplit_or_unknown_patients():
    split = split_fit_calibration(["A1", "A2", "N1", "N2"], [1, 1, 0, 0])
    with pytest.raises(ValueError, match="split None"):
        image_roles([_Entry(Path("u.png"), "U", None)], split)
    with pytest.raises(KeyError, match="not in the validation split"):
        image_roles([_Entry(Path("z.png"), "Z", "val")], split)
    with pytest.raises(ValueError, match="role"):
        ImageRole("x.png", "X", "val")
