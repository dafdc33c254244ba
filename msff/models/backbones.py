"""Shared parts of the comparison networks: VGG-16 and ResNet encoders with a width multiplier
(the base class of every network, :class:`~msff.models.base.SegmentationModel`, is re-exported
here for older imports).

The ResNet encoder reproduces torchvision's ``resnet50``/``resnet101`` (v1.5: stride on the 3×3
conv of the bottleneck) module for module, with the same parameter names: at
``width_multiplier=1`` and 3 input bands a torchvision ResNet state dict (minus ``fc``) loads into
it unchanged and gives identical features (tested in ``tests/models/test_comparison.py`` when
torchvision is installed). Scaling the widths is what torchvision's class cannot do, and what
CPU-sized runs need.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from msff.models.base import SegmentationModel
from msff.models.blocks import ConvBNReLU

__all__ = [
    "SegmentationModel",
    "scale_widths",
    "VGG16Encoder",
    "Bottleneck",
    "ResNetEncoder",
    "RESNET_LAYERS",
    "VGG16_WIDTHS",
    "VGG16_CONVS",
]

VGG16_WIDTHS = (64, 128, 256, 512, 512)
VGG16_CONVS = (2, 2, 3, 3, 3)
RESNET_LAYERS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}


def scale_widths(channels: Sequence[int], width_multiplier: float, minimum: int = 4) -> tuple[int, ...]:
    """Multiply channel widths by ``width_multiplier`` (rounded, at least ``minimum``).

    Example:
        >>> scale_widths((64, 128), 0.25)
        (16, 32)
    """
    if width_multiplier <= 0:
        raise ValueError(f"width_multiplier must be > 0, got {width_multiplier}")
    return tuple(max(minimum, int(round(c * width_multiplier))) for c in channels)


class VGG16Encoder(nn.Module):
    """VGG-16 convolutional body with batch norm (13 3×3 convs in 5 stages), without pooling.

    Pooling is left to the caller, because SegNet needs the pooling indices and DeepLabV3+ drops
    the last pool. Stage ``i`` (0-based) has ``VGG16_CONVS[i]`` convs of width
    ``VGG16_WIDTHS[i] × width_multiplier``; ``dilations[i]`` sets the dilation of its convs.
    The convs are :class:`~msff.models.blocks.ConvBNReLU` (no bias, BN), the same as MSFFNet's
    E3/E4, so the comparison isolates architecture, not normalisation.

    Args:
        in_channels: input bands.
        width_multiplier: scales all widths.
        dilations: dilation of each of the 5 stages (default all 1).

    Shapes: ``stages[i]`` maps (N, C_{i-1}, H, W) → (N, widths[i], H, W).

    Example:
        >>> enc = VGG16Encoder(3, width_multiplier=0.25)
        >>> enc.widths
        (16, 32, 64, 128, 128)
    """

    def __init__(self, in_channels: int, width_multiplier: float = 1.0, dilations: Sequence[int] = (1, 1, 1, 1, 1)):
        super().__init__()
        self.widths = scale_widths(VGG16_WIDTHS, width_multiplier)
        stages = []
        c_in = in_channels
        for width, n, d in zip(self.widths, VGG16_CONVS, dilations, strict=True):
            stages.append(nn.Sequential(*[ConvBNReLU(c_in if i == 0 else width, width, 3, dilation=d) for i in range(n)]))
            c_in = width
        self.stages = nn.ModuleList(stages)


def _conv3x3(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def _conv1x1(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)


class Bottleneck(nn.Module):
    """ResNet bottleneck (v1.5, as torchvision): 1×1 → 3×3 (stride, dilation) → 1×1 (×4), residual.

    Shapes: (N, inplanes, H, W) → (N, 4·planes, H/stride, W/stride).
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None, dilation: int = 1):
        super().__init__()
        self.conv1 = _conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetEncoder(nn.Module):
    """ResNet-50/101 body (torchvision's layout and parameter names) with a width multiplier.

    ``forward`` returns the five feature maps used by encoder–decoder heads:
    stem (after conv1/bn1/relu, stride 2), layer1 (stride 4), layer2 (8), layer3 (16),
    layer4 (32, or 16/8 when ``replace_stride_with_dilation`` dilates layers instead).

    Args:
        in_channels: input bands (conv1 takes any count).
        depth: ``"resnet50"`` or ``"resnet101"`` (blocks per layer from :data:`RESNET_LAYERS`).
        width_multiplier: scales the base width 64 (and so every layer).
        replace_stride_with_dilation: three flags for layer2..layer4, as in torchvision
            (DeepLabV3+ uses ``(False, False, True)`` for output stride 16).

    Attributes:
        out_channels: channels of the five returned maps.

    Example:
        >>> enc = ResNetEncoder(14, "resnet50", width_multiplier=0.125)
        >>> [f.shape[-1] for f in enc(torch.randn(1, 14, 64, 64))]
        [32, 16, 8, 4, 2]
    """

    def __init__(
        self,
        in_channels: int = 3,
        depth: str = "resnet50",
        width_multiplier: float = 1.0,
        replace_stride_with_dilation: Sequence[bool] = (False, False, False),
    ):
        super().__init__()
        if depth not in RESNET_LAYERS:
            raise ValueError(f"depth must be one of {sorted(RESNET_LAYERS)}, got {depth!r}")
        if len(replace_stride_with_dilation) != 3:
            raise ValueError("replace_stride_with_dilation needs 3 flags (layer2..layer4)")
        layers = RESNET_LAYERS[depth]
        (base,) = scale_widths((64,), width_multiplier)
        self.inplanes = base
        self.dilation = 1
        self.conv1 = nn.Conv2d(in_channels, base, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(base, layers[0])
        self.layer2 = self._make_layer(base * 2, layers[1], 2, replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(base * 4, layers[2], 2, replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(base * 8, layers[3], 2, replace_stride_with_dilation[2])
        e = Bottleneck.expansion
        self.out_channels = (base, base * e, base * 2 * e, base * 4 * e, base * 8 * e)
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilate: bool = False) -> nn.Sequential:
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes * Bottleneck.expansion, stride),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample, previous_dilation)]
        self.inplanes = planes * Bottleneck.expansion
        for _ in range(1, blocks):
            layers.append(Bottleneck(self.inplanes, planes, dilation=self.dilation))
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stem = self.relu(self.bn1(self.conv1(x)))
        f1 = self.layer1(self.maxpool(stem))
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return [stem, f1, f2, f3, f4]
