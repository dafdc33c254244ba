"""Synthetic GeoTIFF fixtures and small reference models for the inference tests."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch import nn

UTM = "EPSG:32654"


def write_tif(path, data, crs=UTM, transform=None, nodata=None, mask=None, dtype=None):
    """Write ``data`` ``(C, H, W)`` (or ``(H, W)``) as a GeoTIFF; ``mask`` (H, W) bool adds an
    internal mask band (True = valid)."""
    import rasterio
    from rasterio.transform import from_origin

    data = np.asarray(data)
    if data.ndim == 2:
        data = data[None]
    if transform is None and crs is not None:
        transform = from_origin(500000.0, 4700000.0, 10.0, 10.0)
    kw = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
              dtype=dtype or data.dtype, crs=crs, nodata=nodata)
    if transform is not None:
        kw["transform"] = transform
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True):
        with rasterio.open(path, "w", **kw) as ds:
            ds.write(data.astype(kw["dtype"]))
            if mask is not None:
                ds.write_mask(np.where(mask, 255, 0).astype(np.uint8))
    return path


def smooth_bands(c, h, w, lo=300, hi=4000, rng=None):
    """Image-like random uint16 bands: random noise blurred, scaled into [lo, hi]."""
    g = torch.randn(1, c, h, w, generator=rng)
    g = torch.nn.functional.avg_pool2d(g, 5, 1, 2, count_include_pad=False)[0]
    g = (g - g.min()) / (g.max() - g.min() + 1e-9)
    return (lo + g * (hi - lo)).round().numpy().astype(np.uint16)


class PixelModel(nn.Module):
    """Per-pixel 1x1 convolution: any tiling gives exactly the single-pass result."""

    def __init__(self, c=3):
        super().__init__()
        self.conv = nn.Conv2d(c, 1, 1)

    def forward(self, x):
        return self.conv(x)


class LocalConvModel(nn.Module):
    """Three 3x3 convolutions (receptive-field radius 3, zero padding)."""

    radius = 3

    def __init__(self, c=3):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(c, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, padding=1),
                                 nn.Tanh(), nn.Conv2d(8, 1, 3, padding=1))

    def forward(self, x):
        return 3 * self.net(x)


class ConstantModel(nn.Module):
    """Outputs the same logit everywhere (``in_channels`` bands in)."""

    def __init__(self, c=3, logit=0.7):
        super().__init__()
        self.conv = nn.Conv2d(c, 1, 1)  # declares the band count; unused
        self.logit = logit

    def forward(self, x):
        return torch.full_like(x[:, :1], self.logit)


class TileRampModel(nn.Module):
    """Outputs the tile-local column position in [0, 1] as a *probability*: the worst case for
    seams (every window disagrees with its neighbour)."""

    def __init__(self, c=3):
        super().__init__()
        self.conv = nn.Conv2d(c, 1, 1)

    def forward(self, x):
        n, _, h, w = x.shape
        ramp = torch.linspace(0, 1, w, device=x.device).expand(n, 1, h, w)
        return ramp.clone()


NORM3 = {"mean": [2000.0, 2000.0, 2000.0], "std": [1000.0, 1000.0, 1000.0]}


@pytest.fixture
def norm3():
    return {k: list(v) for k, v in NORM3.items()}


@pytest.fixture
def scene(tmp_path):
    """A 3-band uint16 GeoTIFF (UTM, 10 m) of odd, non-square size with a nodata corner."""
    x = smooth_bands(3, 147, 203)
    x[:, :20, :33] = 0
    path = write_tif(tmp_path / "scene.tif", x, nodata=0)
    return path, x


@pytest.fixture
def tiny_ckpt(tmp_path):
    """A tiny MSFFNet checkpoint (3 bands) with normalisation metadata."""
    from msff import MSFFNet

    m = MSFFNet(in_channels=3, width_multiplier=0.0625, lkam_blocks=1, kernel_size=3)
    return m.save_pretrained(
        tmp_path / "ckpt",
        metadata={"normalization": dict(NORM3), "bands": ["B4", "B3", "B2"], "threshold": 0.5, "model_name": "tiny"},
    )


@pytest.fixture(scope="module")
def iburi(shared_data):
    """The real Sentinel-2 Iburi scene folder (../shared/data/iburi_s2_geotiff); skips where absent."""
    root = os.path.join(shared_data, "iburi_s2_geotiff")
    if not os.path.isdir(root):
        pytest.skip(f"{root} not present")
    return root
