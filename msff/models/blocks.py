"""Building blocks of MSFFNet (Yi & Tan 2025), pure PyTorch reference definitions.

The fused backends (``triton``, ``cuda``) compute exactly what these modules compute, reading the
same parameters and buffers; see :mod:`msff.ops`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from msff.backend import resolve_backend

__all__ = [
    "ConvBNReLU",
    "SeparableLargeKernelConv",
    "ChannelAttention",
    "LKAMBlock",
    "LKAMLayer",
    "VGGLayer",
    "ASPP",
    "DecoderBlock",
]


class ConvBNReLU(nn.Sequential):
    """Conv2d (no bias) → BatchNorm2d → ReLU.

    Args:
        in_channels, out_channels: channel counts.
        kernel_size: int or (kh, kw); padding is "same" for odd sizes.
        dilation: dilation of the convolution.

    Shapes: (N, in_channels, H, W) → (N, out_channels, H, W).

    Example:
        >>> ConvBNReLU(3, 8, (1, 15))(torch.randn(2, 3, 20, 20)).shape
        torch.Size([2, 8, 20, 20])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, dilation: int = 1):
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        if kh % 2 == 0 or kw % 2 == 0:
            raise ValueError(f"kernel_size must be odd for 'same' padding, got {(kh, kw)}")
        padding = (dilation * (kh // 2), dilation * (kw // 2))
        super().__init__(
            nn.Conv2d(in_channels, out_channels, (kh, kw), padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    @property
    def conv(self) -> nn.Conv2d:
        return self[0]

    @property
    def bn(self) -> nn.BatchNorm2d:
        return self[1]


class SeparableLargeKernelConv(nn.Module):
    """Two-branch separable large-kernel convolution (paper Eq. 1–3, after GCN).

    Branch A: 1×k conv → BN → ReLU → k×1 conv → BN → ReLU.
    Branch B: k×1 conv → BN → ReLU → 1×k conv → BN → ReLU.
    Output: A + B (the paper's F_oc). Convolutions mix all channels (not depthwise) and use
    "same" zero padding, so any H, W works, including H, W < k.

    Args:
        in_channels: C_in.
        out_channels: C_out (both branches, and their inner width).
        kernel_size: k, odd (the paper uses 15).

    Shapes: (N, C_in, H, W) → (N, C_out, H, W).

    Example:
        >>> m = SeparableLargeKernelConv(3, 16, kernel_size=15)
        >>> m(torch.randn(1, 3, 32, 40)).shape
        torch.Size([1, 16, 32, 40])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 15):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
        k = kernel_size
        self.kernel_size = k
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.branch_a = nn.Sequential(
            ConvBNReLU(in_channels, out_channels, (1, k)), ConvBNReLU(out_channels, out_channels, (k, 1))
        )
        self.branch_b = nn.Sequential(
            ConvBNReLU(in_channels, out_channels, (k, 1)), ConvBNReLU(out_channels, out_channels, (1, k))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.branch_a(x) + self.branch_b(x)


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation channel attention (paper Eq. 4).

    avg-pool → 1×1 conv (C → C/r) → ReLU → 1×1 conv (C/r → C) → sigmoid. Returns the per-channel
    weights, shape (N, C, 1, 1); the caller multiplies.

    Args:
        channels: C.
        reduction: r (paper: 8); the hidden width is max(1, C // r).

    Example:
        >>> ChannelAttention(64)(torch.randn(2, 64, 9, 9)).shape
        torch.Size([2, 64, 1, 1])
    """

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        hidden = max(1, channels // reduction)
        self.channels = channels
        self.reduction = reduction
        self.fc1 = nn.Conv2d(channels, hidden, 1)
        self.fc2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.adaptive_avg_pool2d(x, 1)
        return torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class LKAMBlock(nn.Module):
    """Large-kernel attention module block (paper Eq. 5): out = shortcut(x) + F_oc · σ(SE(F_oc)).

    ``F_oc`` is :class:`SeparableLargeKernelConv` of x, the attention is :class:`ChannelAttention`.
    Where ``in_channels != out_channels`` the residual is projected with a 1×1 conv + BN (as in
    ResNet's projection shortcut): the paper adds x to a tensor of another width without saying
    how, and a 1×1 projection is the cheapest map that keeps the residual a learned linear
    function of x, while BN keeps its scale matched to F_oc's at initialisation.

    Args:
        in_channels, out_channels: channel counts.
        kernel_size: k of the separable convolutions (paper: 15).
        reduction: SE reduction ratio r (paper: 8).
        backend: ``auto`` | ``reference`` | ``triton`` | ``cuda`` (see :mod:`msff.backend`).

    Shapes: (N, C_in, H, W) → (N, C_out, H, W).

    Example:
        >>> blk = LKAMBlock(16, 16, kernel_size=7)
        >>> blk(torch.randn(2, 16, 24, 24)).shape
        torch.Size([2, 16, 24, 24])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 15,
        reduction: int = 8,
        backend: str = "auto",
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.backend = backend
        self.conv = SeparableLargeKernelConv(in_channels, out_channels, kernel_size)
        self.attention = ChannelAttention(out_channels, reduction)
        if in_channels != out_channels:
            self.shortcut: nn.Module = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)
            )
        else:
            self.shortcut = nn.Identity()

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv(x)
        return self.shortcut(x) + f * self.attention(f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.fx._symbolic_trace.is_fx_symbolic_tracing():
            # A symbolic trace is a device-free graph: it records the reference ops (as export does).
            return self.forward_reference(x)
        backend = resolve_backend(self.backend, x)
        if backend == "reference":
            return self.forward_reference(x)
        from msff.ops.lkam import lkam_block  # fused path; imported lazily

        return lkam_block(self, x, backend=backend)


class LKAMLayer(nn.Sequential):
    """``num_blocks`` LKAM blocks in series (paper: 3); the first maps in → out channels.

    Example:
        >>> LKAMLayer(3, 16, kernel_size=7, num_blocks=2)(torch.randn(1, 3, 20, 20)).shape
        torch.Size([1, 16, 20, 20])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 15,
        reduction: int = 8,
        num_blocks: int = 3,
        backend: str = "auto",
    ):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        blocks = [
            LKAMBlock(in_channels if i == 0 else out_channels, out_channels, kernel_size, reduction, backend)
            for i in range(num_blocks)
        ]
        super().__init__(*blocks)


class VGGLayer(nn.Sequential):
    """``num_convs`` 3×3 ConvBNReLU in series (VGG-16 style, with BN).

    Example:
        >>> VGGLayer(8, 16, num_convs=3)(torch.randn(1, 8, 10, 10)).shape
        torch.Size([1, 16, 10, 10])
    """

    def __init__(self, in_channels: int, out_channels: int, num_convs: int = 2):
        super().__init__(
            *[ConvBNReLU(in_channels if i == 0 else out_channels, out_channels, 3) for i in range(num_convs)]
        )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabV3): 1×1, 3×3 at each dilation rate, image pooling;
    concatenated and fused by 1×1 conv + BN + ReLU.

    Args:
        in_channels: C_in.
        out_channels: C_out of the fused output (paper: 1024).
        rates: dilation rates of the 3×3 branches (paper: 6, 12, 18).
        branch_channels: width of each branch (default out_channels // 4).

    Shapes: (N, C_in, H, W) → (N, C_out, H, W); any H, W ≥ 1.

    Example:
        >>> ASPP(32, 64, rates=(2, 4))(torch.randn(2, 32, 9, 7)).shape
        torch.Size([2, 64, 9, 7])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        rates: Sequence[int] = (6, 12, 18),
        branch_channels: Optional[int] = None,
    ):
        super().__init__()
        bc = branch_channels or max(1, out_channels // 4)
        self.rates = tuple(int(r) for r in rates)
        self.branches = nn.ModuleList([ConvBNReLU(in_channels, bc, 1)])
        for r in self.rates:
            self.branches.append(ConvBNReLU(in_channels, bc, 3, dilation=r))
        # Image pooling branch: no BN, since a batch of one pooled vector has no spatial
        # statistics (batch-1 training would fail with BN here, as in torchvision's ASPPPooling
        # with batch 1).
        self.image_pool = nn.Sequential(nn.Conv2d(in_channels, bc, 1), nn.ReLU(inplace=True))
        self.project = ConvBNReLU(bc * (len(self.rates) + 2), out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [b(x) for b in self.branches]
        pooled = self.image_pool(F.adaptive_avg_pool2d(x, 1))
        feats.append(pooled.expand(-1, -1, x.shape[-2], x.shape[-1]))
        return self.project(torch.cat(feats, dim=1))


@torch.fx.wrap  # a leaf for torch.fx: the check needs real sizes
def _check_same_size(x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    if x.shape[-2:] != skip.shape[-2:]:
        raise RuntimeError(f"decoder size mismatch: upsampled {tuple(x.shape[-2:])} vs skip {tuple(skip.shape[-2:])}")
    return x


class DecoderBlock(nn.Module):
    """Stride-2 transposed conv up-sampling fused with the same-scale encoder skip.

    up = ConvTranspose2d(C_in → C_out, 2, stride 2); out = VGGLayer(cat(up, skip) → C_out, 2 convs).

    Args:
        in_channels: channels of the coarser input.
        skip_channels: channels of the encoder skip.
        out_channels: output channels.

    Shapes: x (N, C_in, H, W), skip (N, C_skip, 2H, 2W) → (N, C_out, 2H, 2W).

    Example:
        >>> DecoderBlock(32, 16, 16)(torch.randn(1, 32, 8, 8), torch.randn(1, 16, 16, 16)).shape
        torch.Size([1, 16, 16, 16])
    """

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.fuse = VGGLayer(out_channels + skip_channels, out_channels, num_convs=2)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = _check_same_size(self.up(x), skip)
        return self.fuse(torch.cat([x, skip], dim=1))
