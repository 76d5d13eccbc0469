"""Training pieces: labels, reconstruction targets, loss, synthetic data, one real member."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from scxnn_node.findings import THESIS_CATALOGUE
from training.member_training import (
    NORMAL,
    OTHERS,
    TARGET,
    MemberTrainingSettings,
    dilate_mask,
    member_class_labels,
    member_logits,
    multitask_loss,
    reconstruction_targets,
    train_member,
)
from training.synthetic import synthesise_cases


def test_member_class_labels():
    labels = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    assert member_class_labels(labels, 0).tolist() == [NORMAL, TARGET, OTHERS, TARGET, OTHERS]
    assert member_class_labels(labels, 2).tolist() == [NORMAL, OTHERS, OTHERS, OTHERS, TARGET]


def test_reconstruction_target_is_image_inside_dilated_mask():
    images = np.full((2, 20, 20), 200, np.uint8)
    masks = np.zeros((2, 20, 20), np.uint8)
    masks[0, 10, 10] = 1
    target = reconstruction_targets(images, masks, dilation_px=2)
    assert target[1].sum() == 0  # finding absent: zeros
    region = target[0] > 0
    assert region.sum() == dilate_mask(masks[0], 2).sum() > 1
    assert np.allclose(target[0][region], 200 / 255)


def test_loss_is_ce_plus_lambda_mse():
    torch.manual_seed(0)
    logits, classes = torch.randn(4, 3), torch.tensor([0, 1, 2, 1])
    recon, target = torch.rand(4, 1, 8, 8), torch.rand(4, 1, 8, 8)
    loss = multitask_loss(logits, classes, recon, target, None, 0.8)
    expected = F.cross_entropy(logits, classes) + 0.8 * F.mse_loss(recon, target)
    torch.testing.assert_close(loss, expected)


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


def test_a_member_learns_its_finding():
    """Cardiomegaly vs normal on synthetic images: trained logits separate the classes."""
    from scxnn_node.imaging.preprocess import PreprocessSpec
    from training.demo import prepare_cases

    names = ["cardiomegaly", "nodule"]
    catalogue = THESIS_CATALOGUE.subset(names)
    cases = synthesise_cases(120, 96, seed=4, findings=names, normal_fraction=0.4)
    images, labels, masks = prepare_cases(cases, PreprocessSpec(size=64), catalogue)
    m = catalogue.index_of("cardiomegaly")
    settings = MemberTrainingSettings(epochs=6, batch_size=16)
    model = train_member(images[:90], labels[:90], masks[:90, m], m, settings)
    logits = member_logits(model, images[90:])
    calls = logits.argmax(1)
    truth = member_class_labels(labels[90:], m)
    assert (calls == truth).mean() > 0.6  # chance is about 0.33
