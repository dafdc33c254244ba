"""DeepLabV3+ (Chen et al. 2018) with a ResNet-50/101 or VGG-16 backbone."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from msff.models.backbones import (
    RESNET_LAYERS,
    ResNetEncoder,
    SegmentationModel,
    VGG16Encoder,
    scale_widths,
)
from msff.models.blocks import ASPP, ConvBNReLU

__all__ = ["DeepLabV3Plus", "DeepLabV3PlusDecoder"]


class DeepLabV3PlusDecoder(nn.Module):
    """The DeepLabV3+ decoder: ASPP (+ dropout 0.5) on the high-level map, up-sampled (bilinear) to
    the low-level map, which is reduced by a 1×1 ConvBNReLU; both concatenated and fused by two
    3×3 ConvBNReLUs.

    Shapes: low (N, C_low, H/4, W/4), high (N, C_high, H/16, W/16) → (N, aspp_channels, H/4, W/4).
    """

    def __init__(self, low_channels: int, high_channels: int, aspp_channels: int, low_out: int,
                 aspp_rates: Sequence[int]):
        super().__init__()
        self.aspp = nn.Sequential(ASPP(high_channels, aspp_channels, aspp_rates, branch_channels=aspp_channels),
                                  nn.Dropout(0.5))
        self.low_level = ConvBNReLU(low_channels, low_out, 1)
        self.fuse = nn.Sequential(ConvBNReLU(aspp_channels + low_out, aspp_channels, 3),
                                  ConvBNReLU(aspp_channels, aspp_channels, 3))

    def forward(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        y = self.aspp(high)
        y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([y, self.low_level(low)], dim=1))


class DeepLabV3Plus(SegmentationModel):
    """DeepLabV3+: a backbone at output stride 16, ASPP (1×1, three dilated 3×3, image pooling;
    256 wide, dropout 0.5), and the V3+ decoder: the ASPP output up-sampled 4× (bilinear), joined
    with the stride-4 backbone map reduced to 48 channels by a 1×1 conv, two 3×3 ConvBNReLUs
    (256), a 1×1 classifier, and 4× bilinear up-sampling to the input.

    Backbones (paper Table 3 uses VGG-16 and ResNet-101):

    * ``resnet50`` / ``resnet101``: :class:`~msff.models.backbones.ResNetEncoder` (torchvision's
      ResNet, width-scalable) with layer4 dilated (stride → dilation 2); low-level = layer1.
    * ``vgg16``: :class:`~msff.models.backbones.VGG16Encoder` with pool1–pool4 and stage 5 dilated 2
      (no pool5: stride 16); low-level = stage 3 (stride 4).

    Written here (not segmentation_models_pytorch's ``DeepLabV3Plus``, available as
    ``smp-deeplabv3plus``) because smp's encoders have fixed widths and no VGG-16 variant with
    atrous stage 5; ASPP uses plain (not depthwise-separable) 3×3 convs, as torchvision's
    DeepLabV3 head does.

    Args:
        in_channels: input bands.
        classes: output channels (1: binary logits).
        activation: None (logits), ``"sigmoid"``, ``"softmax"`` or a callable.
        backbone: ``"resnet101"`` (default), ``"resnet50"`` or ``"vgg16"``.
        width_multiplier: scales backbone, ASPP and decoder widths.
        aspp_rates: ASPP dilation rates (6, 12, 18 at output stride 16).

    Shapes: (N, in_channels, H, W) → (N, classes, H, W), any H, W (padded to 16 inside).

    Example:
        >>> m = DeepLabV3Plus(3, 1, backbone="vgg16", width_multiplier=0.125)
        >>> m(torch.randn(2, 3, 37, 53)).shape
        torch.Size([2, 1, 37, 53])
    """

    input_multiple = 16
    _legacy_state_renames = (("backbone.", "encoder."), ("aspp.", "decoder.aspp."), ("low_level.", "decoder.low_level."),
                             ("decoder.", "decoder.fuse."), ("classifier.", "segmentation_head."))

    def __init__(
        self,
        in_channels: int = 3,
        classes: int = 1,
        activation: Any = None,
        backbone: str = "resnet101",
        width_multiplier: float = 1.0,
        aspp_rates: Sequence[int] = (6, 12, 18),
    ):
        super().__init__(in_channels, classes, activation)
        self.backbone_name = backbone
        if backbone in RESNET_LAYERS:
            self.encoder = ResNetEncoder(in_channels, backbone, width_multiplier, (False, False, True))
            low_c, high_c = self.encoder.out_channels[1], self.encoder.out_channels[4]
        elif backbone == "vgg16":
            self.encoder = VGG16Encoder(in_channels, width_multiplier, dilations=(1, 1, 1, 1, 2))
            self.pool = nn.MaxPool2d(2, 2)
            low_c, high_c = self.encoder.widths[2], self.encoder.widths[4]
        else:
            raise ValueError(f"backbone must be 'resnet50', 'resnet101' or 'vgg16', got {backbone!r}")
        aspp_c, low_out = scale_widths((256, 48), width_multiplier)
        self.decoder = DeepLabV3PlusDecoder(low_c, high_c, aspp_c, low_out, aspp_rates)
        self.segmentation_head = nn.Conv2d(aspp_c, classes, 1)

    @property
    def backbone(self) -> nn.Module:
        """Old name of :attr:`encoder`."""
        return self.encoder

    def _features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.backbone_name == "vgg16":
            stages = self.encoder.stages
            low = None
            for i, stage in enumerate(stages):
                x = stage(x if i == 0 else self.pool(x))
                if i == 2:
                    low = x
            return low, x
        feats = self.encoder(x)
        return feats[1], feats[4]

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        low, high = self._features(x)
        y = self.segmentation_head(self.decoder(low, high))
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)
