"""Small training configs for the tests: 32 px, the small architecture, a few epochs, CPU."""

from __future__ import annotations

from typing import Any

FINDINGS = ["pneumothorax", "nodule", "cardiomegaly"]


def small_config_data(**overrides: Any) -> dict[str, Any]:
    """A training config as YAML data; a dict override is merged into its section."""
    data: dict[str, Any] = {
        "name": "test-run",
        "demo": True,
        "findings": FINDINGS,
        "architecture": "densenet_small",
        "preprocess_workers": 2,  # the process pool is exercised
        "preprocessing": {"size": 32, "clahe_tile_grid": 2},
        "split": {"fractions": [0.6, 0.25, 0.15]},
        "training": {
            "batch_size": 8,
            "num_workers": 0,
            "device": "cpu",
            "mask_dilation_px": 1,
            "hard": {"max_epochs": 2},
            "weak": {"max_epochs": 1},
        },
        "second_stage": {"target_sensitivity": 0.9},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data
