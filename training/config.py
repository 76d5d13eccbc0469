"""Training configuration: one YAML file per run (see training/configs/).

Validated on load like the node's config.yaml: unknown keys are refused and every error names
its key and the file. Defaults are the thesis's (section 3.3) wherever it gives a value.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from scxnn_node.config import read_yaml_mapping, validated
from scxnn_node.findings import THESIS_CATALOGUE, FindingCatalogue
from scxnn_node.imaging.preprocess import PreprocessSpec
from scxnn_node.model.architectures import ARCHITECTURES
from training.augment import AugmentSpec


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StageSection(_Section):
    max_epochs: int = Field(300, ge=0)


class WeakStageSection(StageSection):
    # Thesis: with weak labels the decoder is frozen and only the classifier trains.
    train_encoder: bool = False


class OptimiserSection(_Section):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    lr_factor: float = Field(0.5, gt=0, lt=1)  # "halve the learning rate"
    plateau_patience: int = Field(3, ge=0)
    min_lr: float = Field(1e-4, gt=0)  # stop once the lr has fallen below this


class TrainingSection(_Section):
    batch_size: int = Field(4, ge=1)
    num_workers: int = Field(2, ge=0)
    device: str = "auto"  # auto (cuda when available), cpu, cuda, cuda:N
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # auto: bf16/fp16 on CUDA, off on CPU
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto: on for CUDA
    recon_weight: float = Field(0.8, ge=0)  # lambda of the thesis
    mask_dilation_px: int = Field(8, ge=0)  # at the network's input size
    class_weighting: bool = True
    optimiser: OptimiserSection = OptimiserSection()
    hard: StageSection = StageSection()
    weak: WeakStageSection = WeakStageSection()
    augmentation: AugmentSpec = AugmentSpec()


class SecondStageSection(_Section):
    """The SVM, its threshold and the critical safety net (DESIGN.md rule 8).

    The validation patients are cut in two (training/calibration_split.py): the SVM and the
    member temperatures are fitted on the "fit" part; the Neyman-Pearson threshold and the
    critical safety net are set on the other `calibration_fraction` of the patients, which
    nothing was fitted on, so the miss-rate guarantee holds out of sample. The cut is per
    patient, stratified by normal/abnormal and seeded by `calibration_seed`; every image's
    role is written to <run>/image_roles.csv.
    """

    kernel: Literal["rbf", "linear", "poly", "sigmoid"] = "rbf"
    c: float = Field(1.0, gt=0)
    class_weight: Literal["balanced", "none"] | dict[int, float] = "balanced"
    target_sensitivity: float = Field(0.99, gt=0, le=1)
    confidence: float = Field(0.95, gt=0, lt=1)  # of the Neyman-Pearson miss-rate guarantee
    calibration_fraction: float = Field(0.5, gt=0, lt=1)  # of the validation patients
    calibration_seed: int = 0
    # Per critical finding: the miss rate its safety-net threshold keeps, at `confidence`.
    critical_miss_rate: float = Field(0.01, gt=0, lt=1)


class SplitSection(_Section):
    seed: int = 0
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)

    @field_validator("fractions")
    @classmethod
    def _sum_to_one(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(v < 0 for v in value) or abs(sum(value) - 1.0) > 1e-6:
            raise ValueError("train/val/test fractions must be >= 0 and sum to 1")
        return value


_RUNTIME_ONLY: dict[str, Any] = {
    "cache_dir": True,
    "preprocess_workers": True,
    "training": {"device": True, "num_workers": True},
}


#: serving_precision "auto": what the node's engine runs at on the config's device.
_AUTO_PRECISION = {"cpu": "fp32", "gpu": "bf16"}


class TrainingConfig(_Section):
    name: str = "scxnn"  # bundle name
    demo: bool = False  # true for bundles that must not be mistaken for clinical ones
    intended_use: str = (
        "Research use: triage of adult frontal chest radiographs. NOT FOR CLINICAL USE "
        "until validated locally."
    )
    findings: list[str] = Field(default_factory=lambda: list(THESIS_CATALOGUE.names))
    architecture: str = "densenet121"
    imagenet_weights: Path | None = None  # local torchvision DenseNet file; none: random init
    seed: int = 0
    cache_dir: Path | None = None  # default: <run_dir>/cache
    preprocess_workers: int = Field(2, ge=1)
    # The frozen dataclasses the pipeline uses are the sections themselves: one definition.
    preprocessing: PreprocessSpec = PreprocessSpec()
    split: SplitSection = SplitSection()
    training: TrainingSection = TrainingSection()
    second_stage: SecondStageSection = SecondStageSection()
    # The precision the node serves this bundle at; the validation logits that set the
    # thresholds are computed at it (so the guarantee holds for the scores the node sees) and
    # the bundle's manifest records it (a node serving at another precision warns). auto:
    # fp32 when training.device is cpu, else bf16 (the node's CUDA default).
    serving_precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"

    @field_validator("findings")
    @classmethod
    def _known_findings(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one finding")
        unknown = [f for f in value if f not in THESIS_CATALOGUE.names]
        if unknown:
            raise ValueError(f"unknown findings {unknown}; known: {THESIS_CATALOGUE.names}")
        if len(set(value)) != len(value):
            raise ValueError("findings are listed twice")
        return value

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        if value not in ARCHITECTURES:
            raise ValueError(f"unknown architecture; known: {sorted(ARCHITECTURES)}")
        return value

    @property
    def resolved_serving_precision(self) -> str:
        if self.serving_precision != "auto":
            return self.serving_precision
        return _AUTO_PRECISION["cpu" if self.training.device == "cpu" else "gpu"]

    @property
    def catalogue(self) -> FindingCatalogue:
        """The configured findings, in the thesis catalogue's order."""
        return THESIS_CATALOGUE.subset(self.findings)

    def fingerprint(self) -> str:
        """Hash of everything that shapes training; a resumed run (or a member trained on
        another machine) must match it. Where and how fast it runs is left out: device,
        loader and preprocessing processes, cache location."""
        data = self.model_dump(mode="json", exclude=_RUNTIME_ONLY)
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


def load_training_config(path: str | Path) -> TrainingConfig:
    return validated(TrainingConfig, read_yaml_mapping(path), str(path))


def training_config_from(data: dict[str, Any], label: str = "(training config)") -> TrainingConfig:
    return validated(TrainingConfig, data, label)
