"""A member's files in its run directory: the checkpoint, the metrics table, the final weights
and the done marker (names in run_layout.py). Every file appears by atomic rename."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from scxnn_node.atomic_file import write_atomically, write_text_atomically
from scxnn_node.model.member import MemberNet
from training.run_layout import CHECKPOINT_FILE, DONE_FILE, METRICS_FILE, WEIGHTS_FILE, RunError

METRIC_COLUMNS = (
    "stage",
    "epoch",
    "lr",
    "train_loss",
    "train_ce",
    "train_mse",
    "val_loss",
    "val_ce",
    "val_mse",
    "val_accuracy",
    "train_seconds",
    "seconds",
)


def save_checkpoint(member_dir: Path, state: dict[str, Any]) -> None:
    """The training state after an epoch, and its history as metrics.csv beside it."""
    member_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(member_dir / CHECKPOINT_FILE, lambda tmp: torch.save(state, tmp))
    write_metrics(member_dir, state["history"])


def write_metrics(member_dir: Path, history: list[dict[str, Any]]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=METRIC_COLUMNS)
            writer.writeheader()
            writer.writerows(history)

    write_atomically(member_dir / METRICS_FILE, write)


def load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any]:
    """The training state in `path`, refused unless it was written with the same config."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("fingerprint") != fingerprint:
        raise RunError(
            f"{path}: written with another training config; resume needs "
            "the same config (or start a new run directory)"
        )
    return state


def save_member(member: MemberNet, member_dir: Path, extra: dict[str, Any]) -> None:
    """The trained member (with its decoder, for further training) and a done marker."""
    member_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in member.state_dict().items()}
    write_atomically(member_dir / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
    write_text_atomically(
        member_dir / DONE_FILE, json.dumps(extra, indent=2, sort_keys=True) + "\n"
    )
