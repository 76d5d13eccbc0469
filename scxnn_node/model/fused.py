"""An inference-only form of a member: same function, less memory traffic on the CPU.

torchvision's dense layer concatenates all earlier features again for every layer and runs
BN -> ReLU -> 1x1 conv -> BN -> ReLU -> 3x3 conv. For inference, with running statistics fixed:
- the second BN is folded into the 1x1 convolution's weights and bias;
- each dense block writes its layers' outputs into one preallocated buffer instead of
  re-concatenating (quadratic copying becomes one copy per layer);
- the first BN becomes one fused multiply-add on a view of that buffer.
The result equals the member's own forward to float rounding (tested).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import skip_init

from scxnn_node.model.member import MemberNet


def _bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    assert bn.running_var is not None and bn.running_mean is not None
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale.detach(), (bn.bias - bn.running_mean * scale).detach()


class _FusedDenseLayer(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        s1, b1 = _bn_scale_shift(layer.norm1)
        self.register_buffer("scale1", s1.view(1, -1, 1, 1).clone())
        self.register_buffer("shift1", b1.view(1, -1, 1, 1).clone())
        s2, b2 = _bn_scale_shift(layer.norm2)
        conv1: nn.Conv2d = layer.conv1
        # Not initialised (skip_init): both tensors are set right below.
        self.conv1 = skip_init(nn.Conv2d, conv1.in_channels, conv1.out_channels, 1, bias=True)
        with torch.no_grad():
            self.conv1.weight.copy_(conv1.weight * s2.view(-1, 1, 1, 1))
            self.conv1.bias.copy_(b2)
        self.conv2: nn.Conv2d = layer.conv2

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = torch.addcmul(self.shift1, features, self.scale1).relu_()
        return self.conv2(self.conv1(x).relu_())


class _FusedDenseBlock(nn.Module):
    def __init__(self, block: nn.Module, in_channels: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_FusedDenseLayer(layer) for layer in block.children())
        self.in_channels = in_channels
        self.growth = self.layers[0].conv2.out_channels
        self.out_channels = in_channels + len(self.layers) * self.growth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        # Keep the caller's layout: channels_last input (channel stride 1) gets an NHWC buffer.
        layout = torch.channels_last if x.stride(1) == 1 else torch.contiguous_format
        buffer = torch.empty(
            (n, self.out_channels, h, w), dtype=x.dtype, device=x.device, memory_format=layout
        )
        buffer[:, : self.in_channels].copy_(x)
        c = self.in_channels
        for layer in self.layers:
            buffer[:, c : c + self.growth].copy_(layer(buffer[:, :c]))
            c += self.growth
        return buffer


class FusedMember(nn.Module):
    """Encoder + head of a trained member, rearranged for inference; same input and output."""

    def __init__(self, member: MemberNet) -> None:
        super().__init__()
        member = member.eval()
        f = member.encoder.features
        self.stem = nn.Sequential(f.conv0, f.norm0, f.relu0, f.pool0)
        blocks, transitions = [], []
        channels = f.conv0.out_channels
        for i in range(1, 5):
            block = _FusedDenseBlock(getattr(f, f"denseblock{i}"), channels)
            blocks.append(block)
            channels = block.out_channels
            if i < 4:
                transition = getattr(f, f"transition{i}")
                transitions.append(transition)
                channels = transition.conv.out_channels
        self.blocks = nn.ModuleList(blocks)
        self.transitions = nn.ModuleList(transitions)
        self.norm5 = f.norm5
        self.head = member.head
        self.normalise = member.normalise
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(self.normalise(x))
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        return self.head(self.norm5(x))
