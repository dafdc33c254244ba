"""FCN-8s (Long, Shelhamer & Darrell 2015) on a VGG-16 encoder."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from msff.models.backbones import SegmentationModel, VGG16Encoder, scale_widths

__all__ = ["FCN8s", "FCN8sDecoder"]


def _bilinear_kernel(channels: int, kernel_size: int) -> torch.Tensor:
    factor = (kernel_size + 1) // 2
    center = factor - 1 if kernel_size % 2 == 1 else factor - 0.5
    og = torch.arange(kernel_size, dtype=torch.float32)
    filt = 1 - torch.abs(og - center) / factor
    k2 = filt[:, None] * filt[None, :]
    weight = torch.zeros(channels, channels, kernel_size, kernel_size)
    for c in range(channels):
        weight[c, c] = k2
    return weight


class FCN8sDecoder(nn.Module):
    """The decoder of :class:`FCN8s`: fc6/fc7 as convolutions on pool5, class scores from fc7,
    pool4 and pool3, fused by two learned 2× up-samplings.

    Shapes: pool3 (N, C3, H/8, W/8), pool4 (N, C4, H/16, W/16), pool5 (N, C5, H/32, W/32) →
    class scores (N, classes, H/8, W/8).
    """

    def __init__(self, widths, fc: int, classes: int, dropout: float):
        super().__init__()
        self.fc = nn.Sequential(
            nn.Conv2d(widths[4], fc, 7, padding=3),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
            nn.Conv2d(fc, fc, 1),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
        )
        self.score_fr = nn.Conv2d(fc, classes, 1)
        self.score_pool4 = nn.Conv2d(widths[3], classes, 1)
        self.score_pool3 = nn.Conv2d(widths[2], classes, 1)
        self.upscore2 = nn.ConvTranspose2d(classes, classes, 4, stride=2, padding=1, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(classes, classes, 4, stride=2, padding=1, bias=False)
        for up in (self.upscore2, self.upscore_pool4):
            with torch.no_grad():
                up.weight.copy_(_bilinear_kernel(classes, up.kernel_size[0]))
        # The original zero-initialises the score layers of the skips, so training starts from
        # FCN-32s and the finer scales are learned as corrections.
        for score in (self.score_pool4, self.score_pool3):
            nn.init.zeros_(score.weight)
            nn.init.zeros_(score.bias)

    def forward(self, pool3: torch.Tensor, pool4: torch.Tensor, pool5: torch.Tensor) -> torch.Tensor:
        y = self.upscore2(self.score_fr(self.fc(pool5)))
        y = self.upscore_pool4(y + self.score_pool4(pool4))
        return y + self.score_pool3(pool3)


class FCN8s(SegmentationModel):
    """FCN-8s: VGG-16 (13 convs with BN, 5 max-pools), fc6/fc7 as convolutions (7×7 and 1×1,
    ``fc_channels`` wide, ReLU + dropout), class scores from fc7, pool4 and pool3 fused by learned
    2× up-sampling (transposed convs initialised to bilinear; :class:`FCN8sDecoder`), then an 8×
    transposed conv to the input resolution (the ``segmentation_head``).

    Differences from the 2015 model: BN in the encoder convs (the network is trained from scratch
    here; the original fine-tuned ImageNet VGG-16), and "same" padding with inputs padded to a
    multiple of 32 instead of the 100-pixel padding and crop offsets. Written here because
    torchvision's ``fcn_resnet50/101`` is a different network (a dilated ResNet with an FCN head,
    no skip fusion); it is available as ``tv-fcn-resnet50``/``tv-fcn-resnet101`` in the zoo.

    Args:
        in_channels: input bands.
        classes: output channels (1: binary logits).
        activation: None (logits), ``"sigmoid"``, ``"softmax"`` or a callable.
        width_multiplier: scales the VGG widths and ``fc_channels``.
        fc_channels: width of fc6/fc7 at width 1 (original: 4096).
        dropout: dropout after fc6 and fc7 (original: 0.5).

    Shapes: (N, in_channels, H, W) → (N, classes, H, W), any H, W (padded to 32 inside).

    Example:
        >>> FCN8s(14, 1, width_multiplier=0.125)(torch.randn(1, 14, 37, 53)).shape
        torch.Size([1, 1, 37, 53])
    """

    input_multiple = 32
    _legacy_state_renames = tuple((f"{n}.", f"decoder.{n}.") for n in (
        "fc", "score_fr", "score_pool4", "score_pool3", "upscore2", "upscore_pool4")) + (("upscore8.", "segmentation_head."),)

    def __init__(
        self,
        in_channels: int = 3,
        classes: int = 1,
        activation: Any = None,
        width_multiplier: float = 1.0,
        fc_channels: int = 4096,
        dropout: float = 0.5,
    ):
        super().__init__(in_channels, classes, activation)
        self.encoder = VGG16Encoder(in_channels, width_multiplier)
        w = self.encoder.widths
        self.widths = w
        (fc,) = scale_widths((fc_channels,), width_multiplier)
        self.pool = nn.MaxPool2d(2, 2)
        self.decoder = FCN8sDecoder(w, fc, classes, dropout)
        # The final 8× up-sampling to the input resolution (bilinear at initialisation).
        self.segmentation_head = nn.ConvTranspose2d(classes, classes, 16, stride=8, padding=4, bias=False)
        with torch.no_grad():
            self.segmentation_head.weight.copy_(_bilinear_kernel(classes, 16))

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        pooled = []
        for stage in self.encoder.stages:
            x = self.pool(stage(x))
            pooled.append(x)
        return self.segmentation_head(self.decoder(pooled[2], pooled[3], pooled[4]))
