"""training/configs/thesis-gpu.yaml is the thesis's training setting (section 3.3)."""

from __future__ import annotations

from pathlib import Path

from training.config import load_training_config

THESIS_YAML = Path(__file__).resolve().parents[1] / "training" / "configs" / "thesis-gpu.yaml"


def test_thesis_config_is_the_thesis():
    config = load_training_config(THESIS_YAML)
    optimiser = config.training.optimiser
    # "Adam, with an initial learning rate of 0.001 ... weight decay is set to 0.0005"
    assert optimiser.lr == 1e-3
    assert optimiser.weight_decay == 5e-4
    # "If there is no weight update for 50 epochs, the learning rate is halved"
    assert optimiser.lr_factor == 0.5
    assert optimiser.plateau_patience == 50
    # "If the learning rate becomes lower than 0.0001 ... the training process is halted"
    assert optimiser.min_lr == 1e-4
    # "A batch size of 4 ... the maximum number of epochs is set to 300", 1024 x 1024
    assert config.training.batch_size == 4
    assert config.preprocessing.size == 1024
    assert config.architecture == "densenet121"
    assert config.training.hard.max_epochs == 300
    assert config.training.weak.max_epochs == 300
    assert config.training.recon_weight == 0.8  # loss = CE + 0.8 x MSE
    assert config.findings == [
        "pneumothorax",
        "pneumoperitoneum",
        "mediastinal_widening",
        "pleural_effusion",
        "nodule",
        "consolidation",
        "active_tuberculosis",
        "advanced_tuberculosis",
        "atelectasis",
        "support_device",
        "pleural_calcification",
        "interstitial_opacity",
        "cardiomegaly",
    ]
