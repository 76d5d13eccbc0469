"""The studies whose scores the order-statistic guarantees may treat as independent: one per
patient and class, drawn with a seed.

The Neyman-Pearson threshold and the critical safety net bound a miss rate by an order
statistic, which holds when the positives' scores are independent draws. Studies of one patient
are not: the same chest, often the same disease, scored alike. Counted as separate cases they
shrink the order statistic's margin to what far fewer independent cases could support, and
the stated confidence is not met (tests/test_clustered_calibration.py measures it). Drawing
one study per patient at random restores independent units (the subsampling of Dunn,
Wasserman and Ramdas, "Distribution-free prediction sets for two-layer hierarchical models",
JASA 2023); a patient with abnormal and normal studies gives one of each, since the bounds use
each class on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: operating_point.validation["independent_units"]: what the order statistics counted.
ONE_STUDY_PER_PATIENT = "one_study_per_patient_and_class"


def one_study_per_patient(
    patients: Sequence[str], abnormal: Sequence[int | None], seed: int
) -> np.ndarray:
    """A mask over studies: for each patient, one of its abnormal studies and one of its
    normal ones, drawn uniformly with `seed`; studies of unknown status are never drawn."""
    if len(patients) != len(abnormal):
        raise ValueError("one_study_per_patient needs a patient and a status per study")
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (patient, status) in enumerate(zip(patients, abnormal, strict=True)):
        if status is not None:
            groups.setdefault((patient, int(status)), []).append(i)
    rng = np.random.default_rng(seed)
    chosen = np.zeros(len(patients), dtype=bool)
    for key in sorted(groups):  # a fixed order: the same seed draws the same studies
        rows = groups[key]
        chosen[rows[int(rng.integers(len(rows)))]] = True
    return chosen
