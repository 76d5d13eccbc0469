"""Training speed of one member through the real trainer (cache, loader, augmentation, AMP).

    .venv/bin/python bench/training.py                                  # small, 256 px, cpu
    python3 bench/training.py --arch densenet121 --size 1024 --count 96 --batch 4 --device cuda

Synthetic images are written and preprocessed into a cache first (not timed); then one member
trains `--epochs` hard-label epochs. Figures are from the last epoch (the first pays for cuDNN
autotuning and allocator warm-up): training images/s, the time a thesis-sized epoch (5,400
hard-label images, section 3.1) would take at that rate, and peak GPU memory.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

# `python bench/X.py` puts bench/ first on sys.path, where bench/training.py would shadow the
# training package; the repository root goes first.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.config import training_config_from
from training.fit import prepare_run
from training.member_data import build_plans
from training.member_training import MemberTrainer
from training.run_layout import METRICS_FILE
from training.synthetic import write_synthetic_dataset

THESIS_HARD_TRAIN_IMAGES = 5400


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", default="densenet_small")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--count", type=int, default=48, help="synthetic images (80 %% train)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"])
    parser.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--workers", type=int, default=2, help="data-loader processes")
    parser.add_argument("--json-out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scxnn-bench-") as tmp:
        findings = ["pneumothorax", "nodule"]
        started = time.monotonic()
        manifest = write_synthetic_dataset(
            Path(tmp) / "data", args.count, args.size, seed=0, findings=findings, weak_fraction=0
        )
        config = training_config_from(
            {
                "name": "bench",
                "demo": True,
                "findings": findings,
                "architecture": args.arch,
                "preprocess_workers": 4,
                "preprocessing": {"size": args.size},
                "split": {"fractions": [0.8, 0.2, 0.0]},
                "training": {
                    "batch_size": args.batch,
                    "num_workers": args.workers,
                    "device": args.device,
                    "amp": args.amp,
                    "channels_last": args.channels_last,
                    "hard": {"max_epochs": args.epochs},
                    "weak": {"max_epochs": 0},
                },
            }
        )
        data = prepare_run(config, manifest, Path(tmp) / "run", progress=False)
        prepared_s = time.monotonic() - started
        plans = build_plans(
            config, "pneumothorax", data.split("train"), data.split("val"), data.cached
        )
        trainer = MemberTrainer(config, "pneumothorax", Path(tmp) / "member", progress=False)
        if trainer.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(trainer.device)
        trainer.train(plans)
        with open(Path(tmp) / "member" / METRICS_FILE) as fh:
            last = list(csv.DictReader(fh))[-1]
    n_train = len(plans[0].train)
    train_s = float(last["train_seconds"])
    rate = n_train / train_s
    figures = {
        "device": str(trainer.device),
        "device_name": torch.cuda.get_device_name(trainer.device)
        if trainer.device.type == "cuda"
        else "cpu",
        "architecture": args.arch,
        "size": args.size,
        "batch": args.batch,
        "amp": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "fp32",
        "channels_last": trainer.channels_last,
        "train_images": n_train,
        "epoch_train_seconds": train_s,
        "epoch_seconds_with_validation": float(last["seconds"]),
        "train_images_per_s": rate,
        "thesis_epoch_minutes": THESIS_HARD_TRAIN_IMAGES / rate / 60,
        "peak_gpu_memory_gib": torch.cuda.max_memory_allocated(trainer.device) / 2**30
        if trainer.device.type == "cuda"
        else None,
        "data_preparation_seconds": prepared_s,
    }
    for key, value in figures.items():
        print(f"{key:32s} {value:.3f}" if isinstance(value, float) else f"{key:32s} {value}")
    if args.json_out:
        args.json_out.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
