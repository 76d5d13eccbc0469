"""One SCXNN member: DenseNet encoder, U-Net-style reconstruction decoder, 3-class head.

The decoder only exists during training (thesis 3.3.2); inference builds the member without it
and runs encoder + head. Architectures are named data so a bundle can record which one it holds.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import DenseNet

from scxnn_node.model.architectures import ArchitectureSpec, architecture
from scxnn_node.model.result import MEMBER_CLASSES

# Single-channel input statistics: ImageNet's mean/std averaged over RGB.
_GRAY_MEAN = 0.449
_GRAY_STD = 0.226


class DenseNetEncoder(nn.Module):
    """torchvision's DenseNet feature extractor with a one-channel stem."""

    def __init__(self, spec: ArchitectureSpec) -> None:
        super().__init__()
        densenet = DenseNet(
            growth_rate=spec.growth_rate,
            block_config=spec.block_config,
            num_init_features=spec.num_init_features,
            bn_size=spec.bn_size,
        )
        features = densenet.features
        features.conv0 = nn.Conv2d(1, spec.num_init_features, 7, stride=2, padding=3, bias=False)
        self.features = features
        self.out_channels = densenet.classifier.in_features
        # Channels of the skip tensors: stem (stride 2), dense blocks 1-3, final features.
        chans = [spec.num_init_features]
        c = spec.num_init_features
        for i, layers in enumerate(spec.block_config):
            c = c + layers * spec.growth_rate
            if i < 3:
                chans.append(c)
                c = c // 2
        chans.append(c)
        self.skip_channels = tuple(chans)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_with_skips(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[stem s2, block1 s4, block2 s8, block3 s16, final s32] activations."""
        skips: list[torch.Tensor] = []
        for name, module in self.features.named_children():
            x = module(x)
            if name in ("relu0", "denseblock1", "denseblock2", "denseblock3", "norm5"):
                skips.append(x)
        return skips


class _UpBlock(nn.Module):
    def __init__(self, in_ch: int, skip_ch: int, out_ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_ch + skip_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )

    def forward(
        self, x: torch.Tensor, skip: torch.Tensor | None, size: tuple[int, int]
    ) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.body(x)


class ReconstructionDecoder(nn.Module):
    """U-Net-style decoder: upsample, concatenate a dense block's skip, convolve; 1 channel out."""

    def __init__(self, skip_channels: tuple[int, ...], widths: tuple[int, ...]) -> None:
        super().__init__()
        stem, b1, b2, b3, final = skip_channels
        w16, w8, w4, w2, w1 = widths
        self.up16 = _UpBlock(final, b3, w16)
        self.up8 = _UpBlock(w16, b2, w8)
        self.up4 = _UpBlock(w8, b1, w4)
        self.up2 = _UpBlock(w4, stem, w2)
        self.up1 = _UpBlock(w2, 0, w1)
        self.out = nn.Conv2d(w1, 1, 1)

    def forward(self, skips: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        stem, b1, b2, b3, final = skips
        x = F.relu(final)
        x = self.up16(x, b3, b3.shape[-2:])
        x = self.up8(x, b2, b2.shape[-2:])
        x = self.up4(x, b1, b1.shape[-2:])
        x = self.up2(x, stem, stem.shape[-2:])
        x = self.up1(x, None, size)
        return torch.sigmoid(self.out(x))


class ClassificationHead(nn.Module):
    """DenseNet's classifier with three outputs: normal / target / others."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, len(MEMBER_CLASSES))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        pooled = F.adaptive_avg_pool2d(F.relu(features), 1).flatten(1)
        return self.fc(pooled)


class MemberNet(nn.Module):
    """An SCXNN member. Input: float images in 0..1, shape (N, 1, H, W)."""

    def __init__(self, arch: str, with_decoder: bool = True) -> None:
        super().__init__()
        self.arch = architecture(arch)
        self.encoder = DenseNetEncoder(self.arch)
        self.head = ClassificationHead(self.encoder.out_channels)
        self.decoder: ReconstructionDecoder | None = (
            ReconstructionDecoder(self.encoder.skip_channels, self.arch.decoder_channels)
            if with_decoder
            else None
        )

    @staticmethod
    def normalise(x: torch.Tensor) -> torch.Tensor:
        return (x - _GRAY_MEAN) / _GRAY_STD

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits (N, 3): encoder + head only, as inference runs."""
        return self.head(self.encoder(self.normalise(x)))

    def forward_multitask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, 3), reconstruction (N, 1, H, W)) for training."""
        if self.decoder is None:
            raise RuntimeError("this member was built without its decoder (inference only)")
        skips = self.encoder.forward_with_skips(self.normalise(x))
        return self.head(skips[-1]), self.decoder(skips, x.shape[-2:])

    def inference_state_dict(self) -> OrderedDict[str, torch.Tensor]:
        """Encoder and head weights only: what a bundle stores."""
        return OrderedDict(
            (k, v.detach().cpu().contiguous())
            for k, v in self.state_dict().items()
            if not k.startswith("decoder.")
        )


def load_imagenet_encoder(member: MemberNet, path: str | Path) -> None:
    """Initialise the encoder from torchvision DenseNet ImageNet weights in a local file.

    Accepts safetensors or a torch state-dict file (read with weights_only=True: no code runs).
    The RGB stem is summed over its input channels, which is exact for a gray image replicated
    to three channels. Nothing is ever downloaded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ImageNet weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith("features."):
            continue
        # Older torchvision files spell 'norm1' as 'norm.1' (and so on).
        for old, new in (
            (".norm.1", ".norm1"),
            (".relu.1", ".relu1"),
            (".conv.1", ".conv1"),
            (".norm.2", ".norm2"),
            (".relu.2", ".relu2"),
            (".conv.2", ".conv2"),
        ):
            key = key.replace(old, new)
        if key == "features.conv0.weight" and value.shape[1] == 3:
            value = value.sum(dim=1, keepdim=True)
        renamed[key] = value
    missing, unexpected = member.encoder.load_state_dict(renamed, strict=False)
    if unexpected or missing:
        raise ValueError(
            f"{path} does not match architecture {member.arch.name!r}: "
            f"missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}"
        )
