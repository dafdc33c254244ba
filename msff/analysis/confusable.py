"""Soil-like pixels: a documented proxy for the "landslide-like objects" (bare soil, roads, bare
farmland, rock) that the paper says large kernels confuse less often (Yi & Tan 2025, claim (b)).

A pixel is *soil-like* when it is

1. **not green**: with a near-infrared band, NDVI = (NIR − R)/(NIR + R) ≤ ``ndvi_max`` (0.2,
   the usual bare-soil / sparse-vegetation cut); from RGB alone, the excess-green index on
   chromatic coordinates ExG = (2G − R − B)/(R + G + B) ≤ ``greenness_max`` (Woebbecke et al.
   1995; 0.05: at most slightly greener than grey — on the four shared RGB datasets bare
   landslide scars have a greenish cast and 0.0 flagged only 18 % of Bijie's landslide pixels,
   0.05 flags 27–91 % of landslide pixels against 5–31 % of background), and
2. **bright**: its brightness (R + G + B)/3 is at least the ``brightness_quantile`` (0.5, the
   median) of the valid pixels of its own image — relative to the image, so it needs no
   sensor calibration.

Both tests are invariant to scaling all bands by one factor (8-bit PNGs and reflectances give the
same mask). The proxy is crude on purpose and is checked, not trusted: the evaluation also reports
``soil_landslide_fraction``, the share of true landslide pixels the proxy flags (a proxy that
flags landslides much more often than background, ``soil_background_fraction``, is picking up what
landslides look like).

Example:
    >>> import torch
    >>> img = torch.tensor([[[[200., 30.]], [[150., 120.]], [[120., 20.]]]])   # (1, 3, 1, 2) RGB
    >>> soil_like_mask(img).tolist()   # bright brown pixel: soil-like; dark green pixel: not
    [[[True, False]]]
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

__all__ = ["soil_like_mask", "dataset_soil_masks", "SOIL_DEFAULTS"]

ignore_value = 255

SOIL_DEFAULTS = {"greenness_max": 0.05, "ndvi_max": 0.2, "brightness_quantile": 0.5}


def soil_like_mask(
    image: torch.Tensor,
    valid: Optional[torch.Tensor] = None,
    red: int = 0,
    green: int = 1,
    blue: int = 2,
    nir: Optional[int] = None,
    greenness_max: float = SOIL_DEFAULTS["greenness_max"],
    ndvi_max: float = SOIL_DEFAULTS["ndvi_max"],
    brightness_quantile: float = SOIL_DEFAULTS["brightness_quantile"],
) -> torch.Tensor:
    """Soil-like pixels of raw (un-normalised) images.

    Args:
        image: (N, C, H, W) raw band values (non-negative radiance, reflectance or DN).
        valid: (N, H, W) bool, pixels to consider (others are never soil-like); None: all.
        red, green, blue, nir: 0-based band indices (``nir`` None: the RGB greenness test).
        greenness_max, ndvi_max, brightness_quantile: the thresholds (module docstring).

    Returns:
        (N, H, W) bool.
    """
    if image.dim() != 4:
        raise ValueError(f"image must be (N, C, H, W), got shape {tuple(image.shape)}")
    c = image.shape[1]
    bands = [b for b in (red, green, blue, nir) if b is not None]
    if any(b < 0 or b >= c for b in bands):
        raise ValueError(f"soil proxy band indices {bands} out of range for {c} band(s)")
    x = image.float().clamp_min(0)
    r, g, b = x[:, red], x[:, green], x[:, blue]
    s = r + g + b
    if nir is not None:
        n = x[:, nir]
        not_green = (n - r) / (n + r).clamp_min(1e-12) <= ndvi_max
    else:
        not_green = (2 * g - r - b) / s.clamp_min(1e-12) <= greenness_max
    valid = torch.ones_like(r, dtype=torch.bool) if valid is None else valid.to(r.device).bool()
    bright = torch.zeros_like(valid)
    for i in range(x.shape[0]):
        v = s[i][valid[i]]
        if v.numel():
            bright[i] = s[i] >= torch.quantile(v.double(), brightness_quantile).float()
    return not_green & bright & valid & (s > 0)


def dataset_soil_masks(dataset, indices: Sequence[int], shape: Sequence[int], bands: dict) -> torch.Tensor:
    """Soil-like masks of dataset items, from their raw bands (before any input scaling or
    normalisation, which may change band ratios), padded to a batch's ``shape``.

    Args:
        dataset: a :class:`msff.data.SegmentationDataset` (its ``raw(i)`` is read).
        indices: the items of the batch.
        shape: (N, H, W) of the batch target (items are padded bottom/right, as ``collate`` does).
        bands: keyword arguments of :func:`soil_like_mask` (band indices, thresholds).

    Returns:
        (N, H, W) bool; padding is never soil-like.
    """
    out = torch.zeros(tuple(shape), dtype=torch.bool)
    for j, i in enumerate(indices):
        raw, tgt = dataset.raw(i)
        m = soil_like_mask(torch.from_numpy(np.asarray(raw, dtype=np.float32))[None],
                           torch.from_numpy(np.asarray(tgt) != ignore_value)[None], **bands)[0]
        out[j, : m.shape[0], : m.shape[1]] = m
    return out
