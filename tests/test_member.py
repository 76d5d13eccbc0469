"""The member network: encoder, decoder, head, weights, ImageNet initialisation."""

from __future__ import annotations

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from scxnn_node.model.architectures import architecture
from scxnn_node.model.member import MemberNet, load_imagenet_encoder


def test_small_member_shapes():
    member = MemberNet("densenet_small").eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        logits = member(x)
        logits_mt, recon = member.forward_multitask(x)
    assert logits.shape == (2, 3)
    assert recon.shape == (2, 1, 64, 64)
    assert recon.min() >= 0 and recon.max() <= 1
    torch.testing.assert_close(logits, logits_mt)  # inference = encoder + head of the same net


def test_skip_channels_match_the_real_activations():
    for name in ("densenet_small", "densenet121"):
        member = MemberNet(name, with_decoder=False).eval()
        with torch.no_grad():
            skips = member.encoder.forward_with_skips(torch.rand(1, 1, 64, 64))
        assert tuple(s.shape[1] for s in skips) == member.encoder.skip_channels
        assert [s.shape[-1] for s in skips] == [32, 16, 8, 4, 2]


def test_densenet121_is_torchvisions_configuration():
    ours = MemberNet("densenet121", with_decoder=False)
    reference = torchvision.models.densenet121(weights=None)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # Same network but a 1-channel stem (64*2*7*7 fewer weights) and a 3-class head.
    expected = count(reference.features) - 64 * 2 * 7 * 7 + 1024 * 3 + 3
    assert count(ours) == expected


def test_member_without_decoder_refuses_multitask_and_state_excludes_decoder():
    member = MemberNet("densenet_small", with_decoder=False)
    with pytest.raises(RuntimeError, match="decoder"):
        member.forward_multitask(torch.rand(1, 1, 64, 64))
    full = MemberNet("densenet_small")
    keys = full.inference_state_dict().keys()
    assert keys and not any(k.startswith("decoder.") for k in keys)
    assert set(keys) == set(member.state_dict().keys())


def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture"):
        architecture("resnet9000")


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_imagenet_weights_from_local_file(tmp_path, suffix):
    torch.manual_seed(0)
    reference = torchvision.models.densenet121(weights=None)
    state = {k: v for k, v in reference.state_dict().items()}
    path = tmp_path / f"densenet121{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        # Old torchvision files spell norm1 as norm.1: the loader renames.
        torch.save({k.replace(".norm1.", ".norm.1."): v for k, v in state.items()}, path)
    member = MemberNet("densenet121", with_decoder=False)
    load_imagenet_encoder(member, path)
    ours = member.encoder.features
    torch.testing.assert_close(
        ours.conv0.weight, state["features.conv0.weight"].sum(1, keepdim=True)
    )
    torch.testing.assert_close(
        ours.denseblock3.denselayer5.norm1.weight,
        state["features.denseblock3.denselayer5.norm1.weight"],
    )


def test_imagenet_weights_missing_file_or_wrong_architecture(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_imagenet_encoder(MemberNet("densenet121", with_decoder=False), tmp_path / "none.pth")
    path = tmp_path / "d121.safetensors"
    save_file(
        {k: v.contiguous() for k, v in torchvision.models.densenet121().state_dict().items()},
        str(path),
    )
    with pytest.raises((ValueError, RuntimeError)):
        load_imagenet_encoder(MemberNet("densenet_small", with_decoder=False), path)
