"""A quick-look PNG of a scene with the predicted landslides overlaid."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from msff.inference.sources import RasterStack
from msff.inference.writers import _unlink, atomic_replace, check_outputs, temp_path

__all__ = ["quicklook", "stretch"]


def stretch(x: np.ndarray, lo: float = 2.0, hi: float = 98.0) -> np.ndarray:
    """Per-band percentile stretch of float ``(C, H, W)`` (NaN = no data) to [0, 1]."""
    out = np.zeros_like(x, dtype=np.float32)
    for i, b in enumerate(x):
        ok = np.isfinite(b)
        if not ok.any():
            continue
        p0, p1 = np.percentile(b[ok], [lo, hi])
        out[i] = np.clip((np.nan_to_num(b, nan=p0) - p0) / max(p1 - p0, 1e-12), 0.0, 1.0)
    return out


def quicklook(
    sources: Sequence[str | os.PathLike] | str | os.PathLike | RasterStack,
    mask_path: str | os.PathLike,
    out_png: str | os.PathLike,
    *,
    bands: Optional[Sequence[int]] = None,
    max_size: int = 1024,
    color: tuple = (1.0, 0.1, 0.1),
    alpha: float = 0.55,
    overwrite: bool = False,
    nodata: Optional[float] = None,
    band_indexes: Optional[Sequence[int]] = None,
) -> Path:
    """Write a PNG of the scene (percentile-stretched) with landslide pixels tinted.

    Reads decimated (at most ``max_size`` pixels along the longer side), so memory stays small
    for any scene. Nodata is shown black.

    Args:
        sources: the input raster(s), as for :func:`~msff.inference.predict_scene`.
        mask_path: mask GeoTIFF (1 landslide, 0 background, 255 nodata).
        out_png: PNG to write (atomically).
        bands: 0-based stacked band indices shown as RGB (default the first three, or the first
            band as grey).
        max_size, color, alpha: size limit, overlay colour (RGB in [0, 1]) and opacity.
        nodata, band_indexes: as for :func:`~msff.inference.predict_scene`.

    Returns:
        The PNG path.
    """
    import matplotlib.image
    import rasterio
    from rasterio.enums import Resampling

    out_png = Path(out_png)
    check_outputs([out_png], overwrite=overwrite)
    own = not isinstance(sources, RasterStack)
    stack = RasterStack(sources, nodata=nodata, bands=band_indexes) if own else sources
    try:
        scale = min(1.0, max_size / max(stack.height, stack.width))
        h, w = max(1, round(stack.height * scale)), max(1, round(stack.width * scale))
        if bands is None:
            bands = [0, 1, 2] if stack.count >= 3 else [0]
        img = stack.read_overview(h, w, bands)
    finally:
        if own:
            stack.close()
    if stack.nodata is not None:
        img[img == stack.nodata] = np.nan
    nod = ~np.all(np.isfinite(img), axis=0)
    rgb = stretch(img)
    if rgb.shape[0] == 1:
        rgb = np.repeat(rgb, 3, axis=0)
    rgb = np.moveaxis(rgb, 0, -1)
    with rasterio.open(mask_path) as ds:
        m = ds.read(1, out_shape=(h, w), resampling=Resampling.nearest)
    hit = m == 1
    rgb[hit] = (1 - alpha) * rgb[hit] + alpha * np.asarray(color, dtype=np.float32)
    rgb[nod | (m == 255)] = 0.0
    tmp = temp_path(out_png, ".png")
    try:
        matplotlib.image.imsave(tmp, np.clip(rgb, 0, 1), format="png")
        atomic_replace(tmp, out_png)
    except BaseException:
        _unlink(tmp)
        raise
    return out_png
