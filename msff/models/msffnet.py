"""MSFFNet: large-kernel attention + multi-scale feature fusion network (Yi & Tan 2025)."""
from __future__ import annotations

import numbers
import os
from typing import Any, Sequence

import torch
from torch import nn

from msff.backend import _check_name
from msff.models.base import SegmentationModel, apply_activation
from msff.models.blocks import ASPP, DecoderBlock, LKAMLayer, VGGLayer
from msff.models.card import CheckpointError
from msff.models.checkpoint import (
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    load_state_dict_checked,
    load_weights_file,
    read_checkpoint_config,
)

__all__ = [
    "MSFFNet",
    "MSFFEncoder",
    "PAPER_CHANNELS",
    # re-exported for code written before msff.models.base / msff.models.checkpoint
    "CheckpointError",
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "apply_activation",
    "load_state_dict_checked",
    "load_weights_file",
]

PAPER_CHANNELS = (64, 128, 256, 512, 1024)
_DOWNSAMPLE = 16  # four stride-2 max-pools


def _scaled(channels: Sequence[int], mult: float) -> tuple[int, ...]:
    if mult <= 0:
        raise ValueError(f"width_multiplier must be > 0, got {mult}")
    return tuple(max(4, int(round(c * mult))) for c in channels)


class MSFFEncoder(nn.Module):
    """E1…E5 of MSFFNet.

    E1, E2: LKAM layers (or VGG 3×3 layers when ``use_lkam=False``); E3, E4: VGG-16 3×3 layers
    (3 convs); max-pool stride 2 after E1…E4; E5: a 3×3 conv layer followed by ASPP (or a plain
    3×3 layer of the same width when ``use_aspp=False``).

    ``forward`` returns the pre-pool features of E1…E4 (the skips, at 1, 1/2, 1/4, 1/8 of the input)
    and E5's output at 1/16. The paper's Table 1 lists the pooled outputs: for 512×512×3 they are
    256²×64, 128²×128, 64²×256, 32²×512 (outputs of ``pools[0..3]``) and ASPP 32²×1024.
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        kernel_size: int,
        reduction: int,
        lkam_blocks: int,
        aspp_rates: Sequence[int],
        use_lkam: bool,
        use_aspp: bool,
        backend: str,
    ):
        super().__init__()
        c1, c2, c3, c4, c5 = channels
        if use_lkam:
            self.e1: nn.Module = LKAMLayer(in_channels, c1, kernel_size, reduction, lkam_blocks, backend)
            self.e2: nn.Module = LKAMLayer(c1, c2, kernel_size, reduction, lkam_blocks, backend)
        else:
            self.e1 = VGGLayer(in_channels, c1, num_convs=2)
            self.e2 = VGGLayer(c1, c2, num_convs=2)
        self.e3 = VGGLayer(c2, c3, num_convs=3)
        self.e4 = VGGLayer(c3, c4, num_convs=3)
        self.pools = nn.ModuleList([nn.MaxPool2d(2, 2) for _ in range(4)])
        if use_aspp:
            self.e5 = nn.Sequential(VGGLayer(c4, c4, num_convs=1), ASPP(c4, c5, aspp_rates))
        else:
            self.e5 = VGGLayer(c4, c5, num_convs=2)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage, pool in zip((self.e1, self.e2, self.e3, self.e4), self.pools, strict=True):
            x = stage(x)
            skips.append(x)
            x = pool(x)
        skips.append(self.e5(x))
        return skips


class MSFFNet(SegmentationModel):
    """Multi-scale feature fusion network for landslide segmentation (Yi & Tan 2025).

    Encoder E1…E5 (:class:`MSFFEncoder`), decoder D4…D1 (stride-2 transposed convolutions, each
    fused with the same-scale encoder skip), 1×1 ``segmentation_head`` giving ``classes`` logits at
    the input resolution. Inputs of any size work: they are padded (zeros) to a multiple of 16
    inside and the logits are cropped back (:class:`~msff.models.base.SegmentationModel`, which
    also gives ``save_pretrained`` / ``from_pretrained`` and the model card).

    Args:
        in_channels: input bands (1, 3, 4, 14, …).
        classes: output channels (1 for binary landslide logits).
        activation: None (logits, default), ``"sigmoid"``, ``"softmax"`` or a callable.
        channels: widths of E1…E5 (paper: 64, 128, 256, 512, 1024).
        width_multiplier: scales all widths (e.g. 0.25 for CPU-sized runs).
        kernel_size: k of the LKAM separable convolutions (paper: 15).
        reduction: SE reduction ratio (paper: 8).
        lkam_blocks: LKAM blocks per LKAM layer (paper: 3).
        aspp_rates: ASPP dilation rates (paper: 6, 12, 18).
        use_lkam: False replaces E1, E2 by VGG 3×3 layers (ablation "baseline"/"+ASPP").
        use_aspp: False replaces ASPP by a 3×3 layer (ablation "baseline"/"+LKAM").
        backend: kernel backend of the LKAM blocks (``auto``, ``reference``, ``triton``, ``cuda``).

    Shapes: (N, in_channels, H, W) → (N, classes, H, W).

    Example:
        >>> import torch
        >>> from msff import MSFFNet
        >>> model = MSFFNet(in_channels=3, classes=1, width_multiplier=0.125)
        >>> model(torch.randn(2, 3, 97, 123)).shape
        torch.Size([2, 1, 97, 123])
    """

    input_multiple = _DOWNSAMPLE

    def __init__(
        self,
        in_channels: int = 3,
        classes: int = 1,
        activation: Any = None,
        channels: Sequence[int] = PAPER_CHANNELS,
        width_multiplier: float = 1.0,
        kernel_size: int = 15,
        reduction: int = 8,
        lkam_blocks: int = 3,
        aspp_rates: Sequence[int] = (6, 12, 18),
        use_lkam: bool = True,
        use_aspp: bool = True,
        backend: str = "auto",
    ):
        for key, val in (("in_channels", in_channels), ("classes", classes), ("kernel_size", kernel_size),
                         ("reduction", reduction), ("lkam_blocks", lkam_blocks)):
            if isinstance(val, bool) or not isinstance(val, numbers.Integral):
                raise ValueError(f"{key} must be an integer, got {val!r}")
        if isinstance(width_multiplier, bool) or not isinstance(width_multiplier, numbers.Real) or not width_multiplier > 0:
            raise ValueError(f"width_multiplier must be a number > 0, got {width_multiplier!r}")
        super().__init__(in_channels, classes, activation)
        if len(channels) != 5:
            raise ValueError(f"channels must list 5 widths (E1…E5), got {len(channels)}")
        backend = _check_name(backend)
        self.config: dict[str, Any] = dict(
            in_channels=int(in_channels),
            classes=int(classes),
            activation=activation if (activation is None or isinstance(activation, str)) else None,
            channels=[int(c) for c in channels],
            width_multiplier=float(width_multiplier),
            kernel_size=int(kernel_size),
            reduction=int(reduction),
            lkam_blocks=int(lkam_blocks),
            aspp_rates=[int(r) for r in aspp_rates],
            use_lkam=bool(use_lkam),
            use_aspp=bool(use_aspp),
            backend=backend,
        )
        ch = _scaled(channels, width_multiplier)
        self.widths = ch
        self.encoder = MSFFEncoder(
            in_channels, ch, kernel_size, reduction, lkam_blocks, aspp_rates, use_lkam, use_aspp, backend
        )
        c1, c2, c3, c4, c5 = ch
        self.decoder = nn.ModuleList(
            [
                DecoderBlock(c5, c4, c4),  # D4: 1/16 → 1/8
                DecoderBlock(c4, c3, c3),  # D3: 1/8 → 1/4
                DecoderBlock(c3, c2, c2),  # D2: 1/4 → 1/2
                DecoderBlock(c2, c1, c1),  # D1: 1/2 → 1
            ]
        )
        self.segmentation_head = nn.Conv2d(c1, classes, kernel_size=1)

    @property
    def backend(self) -> str:
        return self.config["backend"]

    @property
    def init_args(self) -> dict:
        return dict(self.config)

    def set_backend(self, backend: str) -> "MSFFNet":
        """Switch the kernel backend of every LKAM block (weights unchanged). Returns self."""
        backend = _check_name(backend)
        self.config["backend"] = backend
        for m in self.modules():
            if hasattr(m, "backend") and not isinstance(m, MSFFNet):
                m.backend = backend
        return self

    def forward_logits(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.encoder(x)
        y = feats[-1]
        for block, skip in zip(self.decoder, reversed(feats[:-1]), strict=True):
            y = block(y, skip)
        return self.segmentation_head(y)

    @staticmethod
    def read_checkpoint_config(directory: str | os.PathLike) -> dict:
        """``{"format", "config", "metadata"}`` of a checkpoint folder, in the version-1 shape
        (kept for old callers; :func:`msff.models.checkpoint.read_checkpoint_config` is typed)."""
        cfg = read_checkpoint_config(directory)
        return {"format": cfg.format, "config": dict(cfg.init_args), "metadata": cfg.card.to_dict()}


