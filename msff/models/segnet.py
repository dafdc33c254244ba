"""SegNet (Badrinarayanan, Kendall & Cipolla 2017): VGG-16 encoder, max-unpooling decoder."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from msff.models.backbones import SegmentationModel, VGG16Encoder
from msff.models.blocks import ConvBNReLU

__all__ = ["SegNet"]


class SegNet(SegmentationModel):
    """SegNet: the 13 convs of VGG-16 (with BN) as encoder, 2×2 max-pooling that keeps its argmax
    indices; a mirrored decoder whose up-sampling is max-unpooling with the *encoder's* indices
    (no learned up-sampling, no skip concatenation), each unpool followed by 3×3 ConvBNReLUs; a 3×3
    conv head. Decoder widths mirror the encoder (512→512→512 | 512→512→256 | 256→256→128 |
    128→64 | 64), as in the reference Caffe model.

    Written here: neither torchvision nor segmentation_models_pytorch provides SegNet.

    Args:
        in_channels: input bands.
        classes: output channels (1: binary logits).
        activation: None (logits), ``"sigmoid"``, ``"softmax"`` or a callable.
        width_multiplier: scales all widths (VGG-16: 64, 128, 256, 512, 512).

    Shapes: (N, in_channels, H, W) → (N, classes, H, W), any H, W (padded to 32 inside).

    Example:
        >>> SegNet(3, 1, width_multiplier=0.125)(torch.randn(1, 3, 37, 53)).shape
        torch.Size([1, 1, 37, 53])
    """

    input_multiple = 32

    def __init__(self, in_channels: int = 3, classes: int = 1, activation: Any = None, width_multiplier: float = 1.0):
        super().__init__(in_channels, classes, activation)
        self.encoder = VGG16Encoder(in_channels, width_multiplier)
        w = self.encoder.widths
        self.widths = w
        self.pools = nn.ModuleList([nn.MaxPool2d(2, 2, return_indices=True) for _ in range(5)])
        self.unpools = nn.ModuleList([nn.MaxUnpool2d(2, 2) for _ in range(5)])
        # decoder[i] follows unpools[i] and mirrors encoder stage i (out width: stage i-1's).
        specs = [
            [w[0]],  # stage 1: 64 → 64, then head
            [w[1], w[0]],  # 128 → 128 → 64
            [w[2], w[2], w[1]],  # 256 → 256 → 256 → 128
            [w[3], w[3], w[2]],  # 512 → 512 → 512 → 256
            [w[4], w[4], w[3]],  # 512 → 512 → 512 → 512
        ]
        self.decoder = nn.ModuleList()
        for i, outs in enumerate(specs):
            c_in = w[i]
            convs = []
            for c_out in outs:
                convs.append(ConvBNReLU(c_in, c_out, 3))
                c_in = c_out
            self.decoder.append(nn.Sequential(*convs))
        self.segmentation_head = nn.Conv2d(w[0], classes, 3, padding=1)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        indices, sizes = [], []
        for stage, pool in zip(self.encoder.stages, self.pools, strict=True):
            x = stage(x)
            sizes.append(x.shape[-2:])
            x, idx = pool(x)
            indices.append(idx)
        for i in reversed(range(5)):
            x = self.unpools[i](x, indices[i], output_size=sizes[i])
            x = self.decoder[i](x)
        return self.segmentation_head(x)
