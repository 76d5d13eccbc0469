"""The reliability diagram: predicted probability against observed frequency, one curve per
set of reliability bins (training/temperature.py), drawn to a PNG file."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

from training.temperature import ReliabilityBin, expected_calibration_error


def write_reliability_diagram(
    curves: Mapping[str, Sequence[ReliabilityBin]],
    path: str | Path,
    title: str = "Reliability",
) -> Path:
    """One line per curve (label -> bins; the label gets its ECE), marker size by bin count,
    and the diagonal of perfect calibration. Empty bins are skipped."""
    if not curves:
        raise ValueError("a reliability diagram needs at least one set of bins")
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfectly calibrated")
    for label, bins in curves.items():
        filled = [b for b in bins if b.count and b.mean_predicted is not None]
        if not filled:
            continue
        total = sum(b.count for b in filled)
        ece = expected_calibration_error(bins)
        ax.plot(
            [b.mean_predicted for b in filled],
            [b.observed_frequency for b in filled],
            "-",
            lw=1.5,
            label=f"{label} (ECE {ece:.3f})",
        )
        ax.scatter(
            [b.mean_predicted for b in filled],
            [b.observed_frequency for b in filled],
            s=[20 + 200 * b.count / total for b in filled],
        )
    ax.set(
        xlabel="predicted probability",
        ylabel="observed frequency",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1),
    )
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
