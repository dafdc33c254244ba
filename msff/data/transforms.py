"""Augmentations of the paper (random-angle rotation, horizontal/vertical flips, translation) and
random crops, applied identically to image and mask in one resampling step.

The crop window is placed at a random centre in the full image and rotated/flipped/shifted there,
so rotated crops take real pixels from around the window instead of empty corners; only pixels
that fall outside the image become :data:`~msff.data.io.IGNORE_INDEX` in the target.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from msff.data.io import IGNORE_INDEX

__all__ = ["Augment", "random_crop_affine", "pad_to"]


@dataclass
class Augment:
    """Augmentation settings.

    Args:
        rotate: rotate by a uniform random angle in [-rotate, rotate] degrees (paper: any angle,
            180). 0 disables.
        hflip, vflip: probability of a horizontal / vertical flip.
        translate: random shift of up to this fraction of the crop size.

    Example:
        >>> aug = Augment(rotate=180, hflip=0.5, vflip=0.5, translate=0.1)
    """

    rotate: float = 180.0
    hflip: float = 0.5
    vflip: float = 0.5
    translate: float = 0.1

    @classmethod
    def none(cls) -> "Augment":
        return cls(rotate=0.0, hflip=0.0, vflip=0.0, translate=0.0)


def random_crop_affine(
    image: torch.Tensor,
    target: torch.Tensor,
    crop: Optional[int],
    rng: np.random.Generator,
    aug: Augment,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random crop + rotation + flips + translation of an image/target pair.

    Args:
        image: (C, H, W) float tensor.
        target: (H, W) uint8 tensor (0/1, 255 ignore).
        crop: output size (square); None keeps (H, W).
        rng: numpy generator (its state fixes the draw, so seeded runs repeat exactly).
        aug: :class:`Augment`.

    Returns:
        ``(image, target)`` of shape (C, S, S) and (S, S) (S = crop, or H × W when crop is None);
        image bilinear, target nearest; pixels sampled outside the input get target 255.

    Example:
        >>> import numpy as np, torch
        >>> x, y = torch.rand(3, 40, 50), torch.randint(0, 2, (40, 50), dtype=torch.uint8)
        >>> a, b = random_crop_affine(x, y, 32, np.random.default_rng(0), Augment())
        >>> a.shape, b.shape
        (torch.Size([3, 32, 32]), torch.Size([32, 32]))
    """
    c, h, w = image.shape
    oh, ow = (crop, crop) if crop else (h, w)
    angle = math.radians(rng.uniform(-aug.rotate, aug.rotate)) if aug.rotate else 0.0
    fx = -1.0 if rng.random() < aug.hflip else 1.0
    fy = -1.0 if rng.random() < aug.vflip else 1.0
    tx, ty = (rng.uniform(-aug.translate, aug.translate, size=2) * (ow, oh)) if aug.translate else (0.0, 0.0)
    # Window centre: uniform over positions keeping an axis-aligned window inside the image
    # (or the image centre when the image is smaller than the window).
    cx = rng.uniform(ow / 2, w - ow / 2) if w > ow else w / 2
    cy = rng.uniform(oh / 2, h - oh / 2) if h > oh else h / 2
    # Snap the window to the pixel grid so unrotated crops copy pixels exactly (no blur).
    cx = round(cx + tx - ow / 2) + ow / 2
    cy = round(cy + ty - oh / 2) + oh / 2
    ca, sa = math.cos(angle), math.sin(angle)
    # Output pixel centre offsets from the window centre, in input pixels.
    ys = torch.arange(oh, dtype=torch.float32) - (oh - 1) / 2
    xs = torch.arange(ow, dtype=torch.float32) - (ow - 1) / 2
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    gx, gy = gx * fx, gy * fy
    sx = ca * gx - sa * gy + cx - 0.5
    sy = sa * gx + ca * gy + cy - 0.5
    # Normalised coordinates for align_corners=False: pixel i centre at (2i + 1) / size - 1.
    grid = torch.stack([(2 * sx + 1) / w - 1, (2 * sy + 1) / h - 1], dim=-1)[None]
    img = F.grid_sample(image[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)[0]
    t = target.float()
    stacked = torch.stack([t, torch.ones_like(t)])[None]
    out = F.grid_sample(stacked, grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]
    tgt = out[0].round().to(torch.uint8)
    tgt[out[1] < 0.5] = IGNORE_INDEX
    return img, tgt


def pad_to(image: torch.Tensor, target: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (C, H, W) image with 0 and (H, W) target with 255 on the bottom/right to (h, w)."""
    ph, pw = h - image.shape[-2], w - image.shape[-1]
    if ph == 0 and pw == 0:
        return image, target
    image = F.pad(image, (0, pw, 0, ph))
    target = F.pad(target, (0, pw, 0, ph), value=IGNORE_INDEX)
    return image, target
