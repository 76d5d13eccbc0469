"""The training loop's pieces: labels, dilation, augmentation, loss, stages, resume, learning."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from trainkit import FINDINGS, small_config_data

from scxnn_node.findings import THESIS_CATALOGUE
from scxnn_node.model.decision import softmax
from scxnn_node.model.result import NORMAL, OTHERS, TARGET
from training.augment import AugmentSpec, augment_pair
from training.config import TrainingConfig, training_config_from
from training.dataset import ManifestEntry
from training.fit import PreparedData, member_logits_on, prepare_run
from training.member_data import build_plans
from training.member_loss import multitask_loss
from training.member_targets import dilate_mask, member_class, reconstruction_target
from training.member_training import MemberTrainer, TrainingInterrupted
from training.metrics import safe_auc
from training.run_layout import METRICS_FILE
from training.synthetic import synthesise_cases, write_synthetic_dataset


def small_config(**overrides: Any) -> TrainingConfig:
    return training_config_from(small_config_data(**overrides))


@pytest.fixture(scope="module")
def synthetic_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synthetic")
    return write_synthetic_dataset(out, 48, 64, seed=2, findings=FINDINGS, weak_fraction=0.3)


def prepared(config: TrainingConfig, manifest: Path, run: Path) -> PreparedData:
    return prepare_run(config, manifest, run, progress=False)


def _entry(labels: dict[str, int | None], other: str = "") -> ManifestEntry:
    return ManifestEntry(2, Path("x.png"), "p", "hard", "train", labels, {}, other)


def test_member_class_from_labels():
    assert member_class(_entry({"a": 0, "b": 0}), "a") == NORMAL
    assert member_class(_entry({"a": 1, "b": None}), "a") == TARGET
    assert member_class(_entry({"a": 0, "b": 1}), "a") == OTHERS
    assert member_class(_entry({"a": 0, "b": 0}, other="pneumonia"), "a") == OTHERS
    assert member_class(_entry({"a": None, "b": 0}), "a") is None  # own finding unknown
    assert member_class(_entry({"a": 0, "b": None}), "a") is None  # normal or others?


def test_dilation_and_reconstruction_target():
    mask = np.zeros((21, 21), np.uint8)
    mask[10, 10] = 1
    assert dilate_mask(mask, 0).sum() == 1
    grown = dilate_mask(mask, 3)
    assert grown[10, 7] == 1 and grown[10, 13] == 1 and grown[10, 14] == 0  # radius 3
    assert grown[7, 7] == 0  # elliptical, not square
    image = np.full((21, 21), 204, np.uint8)
    target = reconstruction_target(image, mask, 3)
    assert np.allclose(target[grown == 1], 0.8) and target[grown == 0].sum() == 0
    assert reconstruction_target(image, None, 3).sum() == 0  # finding absent: zeros


def test_augmentation_moves_mask_with_image():
    image = np.full((64, 64), 10, np.uint8)
    image[20:30, 35:50] = 250
    mask = (image > 100).astype(np.uint8)
    geometric = AugmentSpec(
        shift_fraction=0.15,
        rotation_degrees=25,
        gamma_range=(1.0, 1.0),
        sharpen_probability=0,
        blur_probability=0,
        noise_probability=0,
    )
    moved = 0
    for seed in range(10):
        out, out_mask = augment_pair(image, mask, np.random.default_rng(seed), geometric)
        assert set(np.unique(out_mask)) <= {0, 1}
        assert out_mask.sum() > 0.8 * mask.sum()
        moved += int((out_mask != mask).any())
        inside = out[out_mask == 1]
        # the mask still covers the bright lesion (edges are interpolated) and nothing else
        assert (inside > 120).mean() > 0.95 and out_mask[out > 200].mean() > 0.95
        # intensity changes touch the image only: the same draws give the same mask
        full = AugmentSpec(
            shift_fraction=0.15,
            rotation_degrees=25,
            noise_probability=1.0,
            blur_probability=1.0,
            sharpen_probability=1.0,
        )
        out2, mask2 = augment_pair(image, mask, np.random.default_rng(seed), full)
        assert (mask2 == out_mask).all() and not (out2 == out).all()
    assert moved >= 8
    same, same_mask = augment_pair(
        image, mask, np.random.default_rng(0), AugmentSpec(enabled=False)
    )
    assert same is image and same_mask is mask


def test_loss_is_ce_plus_lambda_mse_over_known_targets():
    torch.manual_seed(0)
    logits, classes = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    recon, target = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    loss, ce, mse = multitask_loss(logits, classes, recon, target, None, None, 0.8)
    expected_mse = F.mse_loss(recon, target)
    torch.testing.assert_close(ce, F.cross_entropy(logits, classes))
    torch.testing.assert_close(loss, F.cross_entropy(logits, classes) + 0.8 * expected_mse)
    torch.testing.assert_close(mse, expected_mse)
    # a sample whose target is unknown (finding present, no mask) adds no MSE
    known = torch.tensor([1.0, 0.0, 1.0, 1.0])
    loss, _, mse = multitask_loss(logits, classes, recon, target, known, None, 0.8)
    keep = [0, 2, 3]
    torch.testing.assert_close(mse, F.mse_loss(recon[keep], target[keep]))
    weights = torch.tensor([1.0, 2.0, 0.5])
    loss, _, _ = multitask_loss(logits, classes, None, None, None, weights, 0.8)
    torch.testing.assert_close(loss, F.cross_entropy(logits, classes, weight=weights))


def _states(trainer: MemberTrainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer._new_member().state_dict().items()}


@pytest.mark.parametrize("train_encoder", [False, True])
def test_weak_stage_keeps_the_decoder(
    synthetic_manifest: Path, tmp_path: Path, train_encoder: bool
):
    config = small_config(
        training={
            "hard": {"max_epochs": 0},
            "weak": {"max_epochs": 1, "train_encoder": train_encoder},
        },
    )
    data = prepared(config, synthetic_manifest, tmp_path / "run")
    plans = build_plans(config, "nodule", data.split("train"), data.split("val"), data.cached)
    assert plans[1].train, "the synthetic set has weak-label images"
    trainer = MemberTrainer(config, "nodule", tmp_path / "member", progress=False)
    before = _states(trainer)
    after = trainer.train(plans).state_dict()
    for key, value in before.items():
        same = torch.equal(value, after[key])
        if key.startswith("decoder."):
            assert same, f"{key} changed in the weak stage"
        elif key.startswith("encoder.") and not train_encoder:
            assert same, f"{key} changed although the encoder is frozen"
    assert not torch.equal(before["head.fc.weight"], after["head.fc.weight"])
    encoder_changed = any(
        not torch.equal(before[k], after[k]) for k in before if k.startswith("encoder.")
    )
    assert encoder_changed == train_encoder


def _metric_rows(directory: Path) -> list[dict[str, str]]:
    with open(directory / METRICS_FILE) as fh:
        timings = ("seconds", "train_seconds")
        return [{k: v for k, v in r.items() if k not in timings} for r in csv.DictReader(fh)]


def test_resume_equals_an_uninterrupted_run(synthetic_manifest: Path, tmp_path: Path):
    config = small_config()
    data = prepared(config, synthetic_manifest, tmp_path / "run")
    plans = build_plans(config, "cardiomegaly", data.split("train"), data.split("val"), data.cached)
    whole = MemberTrainer(config, "cardiomegaly", tmp_path / "a", progress=False).train(plans)
    for stop in (1, 2):  # inside the hard stage, and at the boundary to the weak stage
        d = tmp_path / f"b{stop}"
        with pytest.raises(TrainingInterrupted):
            MemberTrainer(config, "cardiomegaly", d, progress=False).train(
                plans, stop_after_epochs=stop
            )
        assert len(_metric_rows(d)) == stop
        with pytest.raises(Exception, match="pass --resume"):
            MemberTrainer(config, "cardiomegaly", d, progress=False).train(plans)
        resumed = MemberTrainer(config, "cardiomegaly", d, progress=False).train(plans, resume=True)
        a, b = whole.state_dict(), resumed.state_dict()
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{key} differs after resuming at epoch {stop}"
        assert _metric_rows(d) == _metric_rows(tmp_path / "a")
    other = small_config(seed=7)
    with pytest.raises(Exception, match="another training config"):
        MemberTrainer(other, "cardiomegaly", tmp_path / "b1", progress=False).train(
            plans, resume=True
        )


def test_a_member_learns_its_finding(tmp_path: Path):
    """Cardiomegaly vs not on synthetic images: the trained member ranks held-out cases."""
    findings = ["nodule", "cardiomegaly"]
    manifest = write_synthetic_dataset(
        tmp_path / "d", 140, 96, seed=4, findings=findings, weak_fraction=0.0
    )
    config = small_config(
        findings=findings,
        preprocessing={"size": 64, "clahe_tile_grid": 4},
        split={"fractions": [0.7, 0.15, 0.15]},
        training={"hard": {"max_epochs": 6}, "weak": {"max_epochs": 0}},
    )
    data = prepared(config, manifest, tmp_path / "run")
    plans = build_plans(config, "cardiomegaly", data.split("train"), data.split("val"), data.cached)
    member = MemberTrainer(config, "cardiomegaly", tmp_path / "m", progress=False).train(plans)
    held_out = data.split("val") + data.split("test")
    logits = member_logits_on(
        member, [data.cached[e.row] for e in held_out], 32, torch.device("cpu")
    )
    truth = np.array([e.label("cardiomegaly") for e in held_out])
    auc = safe_auc(truth, softmax(logits.astype(np.float64))[:, TARGET])
    assert auc is not None and auc > 0.8, auc


def test_synthetic_cases_have_masks_where_labelled():
    cases = synthesise_cases(30, 96, seed=1)
    seen = set()
    for case in cases:
        assert case.pixels.dtype == np.uint16 and case.pixels.shape == (96, 96)
        for name, present in case.labels.items():
            assert (name in case.masks) == bool(present)
            if present:
                assert case.masks[name].any()
                seen.add(name)
    assert seen == set(THESIS_CATALOGUE.names)
    assert any(not any(c.labels.values()) for c in cases)  # some normals


def test_synthetic_dataset_writes_images_masks_and_manifest(tmp_path: Path):
    from training.dataset import load_manifest

    m = load_manifest(write_synthetic_dataset(tmp_path, 20, 64, seed=0, weak_fraction=0.5))
    assert len(m.entries) == 20 and m.findings == tuple(THESIS_CATALOGUE.names)
    assert {e.label_kind for e in m.entries} == {"hard", "weak"}
    assert all(not e.masks for e in m.entries if e.label_kind == "weak")
    with_mask = [e for e in m.entries if e.masks]
    assert with_mask
    e = with_mask[0]
    name, ref = next(iter(e.masks.items()))
    assert e.label(name) == 1
    pixels = cv2.imread(str(e.image), cv2.IMREAD_UNCHANGED)
    assert pixels.dtype == np.uint16 and cv2.imread(ref, cv2.IMREAD_GRAYSCALE).shape == pixels.shape


def test_stage_one_starts_from_a_local_imagenet_file(tmp_path: Path):
    from safetensors.torch import save_file
    from torchvision.models import DenseNet

    from scxnn_node.model.architectures import architecture

    spec = architecture("densenet_small")
    torch.manual_seed(1)
    rgb = DenseNet(spec.growth_rate, spec.block_config, spec.num_init_features, spec.bn_size)
    weights = tmp_path / "imagenet.safetensors"
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(weights))
    trainer = MemberTrainer(
        small_config(imagenet_weights=str(weights)), "nodule", tmp_path / "m", progress=False
    )
    member = trainer._new_member()
    features = member.encoder.features
    torch.testing.assert_close(
        features.conv0.weight, rgb.features.conv0.weight.sum(1, keepdim=True)
    )
    torch.testing.assert_close(
        features.denseblock2.denselayer1.conv1.weight,
        rgb.features.denseblock2.denselayer1.conv1.weight,
    )
    missing = MemberTrainer(
        small_config(imagenet_weights=str(tmp_path / "nope.pth")),
        "nodule",
        tmp_path / "n",
        progress=False,
    )
    with pytest.raises(FileNotFoundError, match="ImageNet weights file not found"):
        missing._new_member()


@pytest.mark.parametrize(
    "name", ["thesis-gpu.yaml", "tiny-cpu.yaml", "demo.yaml", "kermany-cpu.yaml"]
)
def test_shipped_configs_are_valid(name: str):
    from training.config import load_training_config

    config = load_training_config(Path(__file__).parents[1] / "training" / "configs" / name)
    assert config.catalogue.names == [f for f in THESIS_CATALOGUE.names if f in config.findings]


def test_config_errors_name_the_key(tmp_path: Path):
    from scxnn_node.config import ConfigError
    from training.config import load_training_config

    path = tmp_path / "bad.yaml"
    path.write_text("findings: [pneumonia]\ntraining:\n  batchsize: 4\npreprocessing:\n  size: 8\n")
    with pytest.raises(ConfigError) as err:
        load_training_config(path)
    text = str(err.value)
    assert text.startswith(str(path))
    assert "findings: Value error, unknown findings ['pneumonia']" in text
    assert "training.batchsize: unknown key" in text
    assert "PreprocessSpec.size must be an integer in 32..4096" in text


def test_fingerprint_ignores_where_a_run_executes():
    base = small_config()
    moved = small_config(
        preprocess_workers=4,
        cache_dir="/tmp/elsewhere",
        training={"num_workers": 3, "device": "auto"},
    )
    assert moved.fingerprint() == base.fingerprint()
    assert small_config(seed=9).fingerprint() != base.fingerprint()
    assert small_config(training={"batch_size": 4}).fingerprint() != base.fingerprint()
