"""U-Net (Ronneberger, Fischer & Brox 2015), with batch norm and "same" padding."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from msff.models.backbones import SegmentationModel, scale_widths
from msff.models.blocks import DecoderBlock, VGGLayer

__all__ = ["UNet"]


class UNet(SegmentationModel):
    """U-Net: four double-3×3-conv stages with 2×2 max-pooling, a double-conv bottleneck, and four
    up-stages (2×2 transposed conv halving the width, concatenation with the same-scale encoder
    map, double 3×3 conv), then a 1×1 head.

    Differences from the 2015 paper, as in most modern re-implementations: "same" padding (no
    cropping of the skips) and batch norm after every conv. Written here because no well-kept
    library ships the original U-Net (segmentation_models_pytorch's ``Unet`` is a U-Net decoder on
    a classification encoder; it is available as ``smp-unet`` in :mod:`msff.models.zoo`).

    Args:
        in_channels: input bands.
        classes: output channels (1: binary logits).
        activation: None (logits), ``"sigmoid"``, ``"softmax"`` or a callable.
        channels: widths of the five encoder stages (paper: 64, 128, 256, 512, 1024).
        width_multiplier: scales all widths.

    Shapes: (N, in_channels, H, W) → (N, classes, H, W), any H, W (padded to 16 inside).

    Example:
        >>> UNet(14, 1, width_multiplier=0.125)(torch.randn(2, 14, 37, 53)).shape
        torch.Size([2, 1, 37, 53])
    """

    input_multiple = 16

    def __init__(
        self,
        in_channels: int = 3,
        classes: int = 1,
        activation: Any = None,
        channels: Sequence[int] = (64, 128, 256, 512, 1024),
        width_multiplier: float = 1.0,
    ):
        super().__init__(in_channels, classes, activation)
        if len(channels) != 5:
            raise ValueError(f"channels must list 5 widths, got {len(channels)}")
        c = scale_widths(channels, width_multiplier)
        self.widths = c
        ins = (in_channels,) + c[:-1]
        self.encoder = nn.ModuleList([VGGLayer(i, o, num_convs=2) for i, o in zip(ins, c, strict=True)])
        self.pool = nn.MaxPool2d(2, 2)
        self.decoder = nn.ModuleList([DecoderBlock(c[i + 1], c[i], c[i]) for i in reversed(range(4))])
        self.segmentation_head = nn.Conv2d(c[0], classes, 1)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, stage in enumerate(self.encoder):
            x = stage(x if i == 0 else self.pool(x))
            skips.append(x)
        y = skips.pop()
        for block in self.decoder:
            y = block(y, skips.pop())
        return self.segmentation_head(y)
