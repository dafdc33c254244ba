"""The paper's Table 2 variants: MSFFNet's decoder and skip connections on a ResNet encoder."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from msff.models.backbones import ResNetEncoder, SegmentationModel, scale_widths
from msff.models.blocks import DecoderBlock, VGGLayer

__all__ = ["ResNetSkipNet", "ResNetSkipDecoder"]


class ResNetSkipDecoder(nn.Module):
    """The decoder of :class:`ResNetSkipNet`: four :class:`~msff.models.blocks.DecoderBlock` (each
    up-samples 2× and fuses the same-scale encoder map), then a last 2× up-sampling and two 3×3
    convs without a skip (ResNet has no full-resolution map).

    Shapes: the encoder's five maps (stride 2, 4, 8, 16, 32) → (N, channels[4], 2·H_2, 2·W_2).
    """

    def __init__(self, encoder_channels: Sequence[int], channels: Sequence[int]):
        super().__init__()
        enc, dec = encoder_channels, channels
        self.blocks = nn.ModuleList(
            [
                DecoderBlock(enc[4], enc[3], dec[0]),  # 1/32 → 1/16, with layer3
                DecoderBlock(dec[0], enc[2], dec[1]),  # 1/16 → 1/8, with layer2
                DecoderBlock(dec[1], enc[1], dec[2]),  # 1/8 → 1/4, with layer1
                DecoderBlock(dec[2], enc[0], dec[3]),  # 1/4 → 1/2, with the stem
            ]
        )
        self.final_up = nn.ConvTranspose2d(dec[3], dec[4], kernel_size=2, stride=2)
        self.final_fuse = VGGLayer(dec[4], dec[4], num_convs=2)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        y = feats[4]
        for block, skip in zip(self.blocks, reversed(feats[:4]), strict=True):
            y = block(y, skip)
        return self.final_fuse(self.final_up(y))


class ResNetSkipNet(SegmentationModel):
    """Encoder–decoder with a ResNet-50/101 encoder and MSFFNet-style skip connections
    (Yi & Tan 2025, Table 2: "same encoder structure and skip connections with a ResNet50/ResNet101
    backbone").

    The encoder's five maps (stem at stride 2, layer1…layer4 at 4, 8, 16, 32) feed a decoder
    of MSFFNet's kind: at each scale a stride-2 transposed conv up-samples, the result is
    concatenated with the same-scale encoder map and fused by two 3×3 ConvBNReLUs
    (:class:`~msff.models.blocks.DecoderBlock`). ResNet has no full-resolution map, so the last
    up-sampling (stride 2 → 1) is followed by two 3×3 convs without a skip; a 1×1 head gives the
    logits. The paper does not give the decoder widths; we use ``decoder_channels`` = (512, 256,
    128, 64, 32) at width 1.

    Args:
        in_channels: input bands.
        classes: output channels (1: binary logits).
        activation: None (logits), ``"sigmoid"``, ``"softmax"`` or a callable.
        backbone: ``"resnet50"`` (default) or ``"resnet101"``.
        width_multiplier: scales encoder and decoder widths.
        decoder_channels: output widths of the five decoder stages (coarse to fine).

    Shapes: (N, in_channels, H, W) → (N, classes, H, W), any H, W (padded to 32 inside).

    Example:
        >>> m = ResNetSkipNet(14, 1, backbone="resnet50", width_multiplier=0.125)
        >>> m(torch.randn(2, 14, 37, 53)).shape
        torch.Size([2, 1, 37, 53])
    """

    input_multiple = 32
    _legacy_state_renames = (("decoder.", "decoder.blocks."), ("final_up.", "decoder.final_up."),
                             ("final_fuse.", "decoder.final_fuse."), ("head.", "segmentation_head."))

    def __init__(
        self,
        in_channels: int = 3,
        classes: int = 1,
        activation: Any = None,
        backbone: str = "resnet50",
        width_multiplier: float = 1.0,
        decoder_channels: Sequence[int] = (512, 256, 128, 64, 32),
    ):
        super().__init__(in_channels, classes, activation)
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels must list 5 widths, got {len(decoder_channels)}")
        self.encoder = ResNetEncoder(in_channels, backbone, width_multiplier)
        enc = self.encoder.out_channels
        dec = scale_widths(decoder_channels, width_multiplier)
        self.decoder = ResNetSkipDecoder(enc, dec)
        self.segmentation_head = nn.Conv2d(dec[4], classes, 1)

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.segmentation_head(self.decoder(self.encoder(x)))
