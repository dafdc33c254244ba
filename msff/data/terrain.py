"""Terrain bands derived from a DEM on the fly: slope and hillshade, computed on any target grid
(the image's or the scene's) window by window with the one-pixel halo they need.

The DEM is reprojected onto the target grid padded by one pixel on each side
(``rasterio.vrt.WarpedVRT``, bilinear), so a window ``(x, y, w, h)`` of the target reads the DEM
window ``(x, y, w + 2, h + 2)`` of the padded grid: the halo comes from the DEM itself, also at
window edges, and pixels whose 3×3 neighbourhood touches DEM nodata (or the DEM's edge) are nodata.

* slope: degrees, Horn's 3×3 gradient (as ``gdaldem slope``);
* hillshade: ``255 · max(0, n · s)`` for the surface normal ``n`` and the sun direction ``s``
  (azimuth 315°, altitude 45°, as ``gdaldem hillshade``'s defaults), 0..255.

Pixel sizes are in metres: projected CRSs use their linear unit; geographic CRSs (EPSG:4326) convert
degrees to metres per row at that row's latitude.

Example:
    >>> import numpy as np
    >>> z = np.add.outer(np.zeros(5), np.arange(6) * 10.0)   # rises 10 m per 10 m pixel eastwards
    >>> float(np.round(slope(z, 10.0, 10.0)[1, 1], 3))
    45.0
"""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

import numpy as np

__all__ = ["TERRAIN_BANDS", "slope", "hillshade", "terrain_bands", "DemOnGrid", "check_terrain", "raster_on_grid",
           "terrain_for_raster"]

TERRAIN_BANDS = ("slope", "hillshade")


def check_terrain(names: Sequence[str]) -> list[str]:
    """Validated list of terrain band names (raises ValueError naming the unknown one)."""
    out = []
    for n in names:
        n = str(n).strip().lower()
        if n not in TERRAIN_BANDS:
            raise ValueError(f"unknown terrain band {n!r}; known: {', '.join(TERRAIN_BANDS)}")
        if n in out:
            raise ValueError(f"terrain band {n!r} given twice")
        out.append(n)
    return out


def _gradients(z: np.ndarray, dx, dy) -> tuple[np.ndarray, np.ndarray]:
    """Horn's gradients of ``z`` ``(h + 2, w + 2)``: (dz/d east, dz/d north), each ``(h, w)``.
    ``dx`` may be a per-row array ``(h,)`` (geographic grids)."""
    a, b, c = z[:-2, :-2], z[:-2, 1:-1], z[:-2, 2:]
    d, f = z[1:-1, :-2], z[1:-1, 2:]
    g, h, i = z[2:, :-2], z[2:, 1:-1], z[2:, 2:]
    dx = np.asarray(dx, np.float64).reshape(-1, 1) if np.ndim(dx) else float(dx)
    dzdx = ((c + 2 * f + i) - (a + 2 * d + g)) / (8.0 * dx)
    dzdy = ((a + 2 * b + c) - (g + 2 * h + i)) / (8.0 * float(dy))  # top row is north
    return dzdx, dzdy


def slope(z: np.ndarray, dx, dy: float) -> np.ndarray:
    """Slope in degrees of ``z`` ``(h + 2, w + 2)`` (one-pixel halo) → ``(h, w)`` float32.

    Args:
        z: elevations in metres with a one-pixel halo; NaN where unknown (spreads to neighbours).
        dx: pixel width in metres (a number, or one per output row).
        dy: pixel height in metres.
    """
    gx, gy = _gradients(np.asarray(z, np.float64), dx, dy)
    return np.degrees(np.arctan(np.hypot(gx, gy))).astype(np.float32)


def hillshade(z: np.ndarray, dx, dy: float, azimuth: float = 315.0, altitude: float = 45.0) -> np.ndarray:
    """Hillshade 0..255 of ``z`` ``(h + 2, w + 2)`` → ``(h, w)`` float32 (sun azimuth clockwise from
    north, altitude above the horizon, in degrees)."""
    gx, gy = _gradients(np.asarray(z, np.float64), dx, dy)
    az, alt = math.radians(azimuth), math.radians(altitude)
    sx, sy, sz = math.sin(az) * math.cos(alt), math.cos(az) * math.cos(alt), math.sin(alt)
    shade = (-gx * sx - gy * sy + sz) / np.sqrt(1.0 + gx * gx + gy * gy)
    return (255.0 * np.clip(shade, 0.0, 1.0)).astype(np.float32)


def _pixel_metres(crs, transform, rows: np.ndarray) -> tuple[np.ndarray, float]:
    """Pixel width per row (metres) and pixel height (metres) of a grid."""
    px, py = abs(transform.a), abs(transform.e)
    if crs is not None and crs.is_geographic:
        lat = np.radians(transform.f + (rows + 0.5) * transform.e)
        # metres per degree on the WGS 84 ellipsoid (series in latitude)
        m_lat = 111132.92 - 559.82 * np.cos(2 * lat) + 1.175 * np.cos(4 * lat)
        m_lon = 111412.84 * np.cos(lat) - 93.5 * np.cos(3 * lat)
        return px * m_lon, float(py * np.mean(m_lat))
    unit = 1.0
    if crs is not None:
        try:
            unit = float(crs.linear_units_factor[1])
        except Exception:  # CRS without a linear unit: assume metres
            unit = 1.0
    return np.full(rows.shape, px * unit), py * unit


def terrain_bands(z: np.ndarray, names: Sequence[str], crs, transform, row0: int) -> np.ndarray:
    """The requested terrain bands ``(len(names), h, w)`` from ``z`` ``(h + 2, w + 2)`` whose centre
    pixels are the target grid's rows ``row0 … row0 + h - 1`` (for the per-row pixel size)."""
    h = z.shape[0] - 2
    dx, dy = _pixel_metres(crs, transform, row0 + np.arange(h))
    out = []
    for n in names:
        out.append(slope(z, dx, dy) if n == "slope" else hillshade(z, dx, dy))
    return np.stack(out) if out else np.zeros((0, h, z.shape[1] - 2), np.float32)


class DemOnGrid:
    """A DEM reprojected (bilinear) onto a target grid padded by one pixel, read window by window.

    Args:
        dem: DEM raster path (band 1, elevations in metres; nodata honoured).
        crs, transform, width, height: the target grid.
        names: terrain bands to compute (``slope``, ``hillshade``).

    Example:
        >>> with DemOnGrid("dem.tif", crs, transform, 512, 512, ["slope"]) as d:   # doctest: +SKIP
        ...     s = d.read(0, 0, 256, 256)                                          # (1, 256, 256)
    """

    def __init__(self, dem: str | os.PathLike, crs, transform, width: int, height: int, names: Sequence[str]):
        import rasterio
        from affine import Affine
        from rasterio.enums import Resampling
        from rasterio.vrt import WarpedVRT

        self.path = str(dem)
        self.names = check_terrain(names)
        self.crs, self.transform = crs, transform
        try:
            self._src = rasterio.open(dem)
        except rasterio.errors.RasterioIOError as e:
            raise ValueError(f"{dem}: not a readable DEM raster ({e})") from None
        if self._src.crs is None or crs is None:
            self._src.close()
            raise ValueError(f"{dem}: the DEM and the target grid need a CRS to compute terrain bands")
        padded = transform * Affine.translation(-1, -1)
        self._has_nodata = self._src.nodata is not None
        self._vrt = WarpedVRT(self._src, crs=crs, transform=padded, width=width + 2, height=height + 2,
                              resampling=Resampling.bilinear, add_alpha=not self._has_nodata)

    def read(self, x: int, y: int, w: int, h: int) -> np.ndarray:
        """Terrain bands of the target window ``(x, y, w, h)``: float32 ``(len(names), h, w)``, NaN
        where the DEM (with the halo) has no data."""
        from rasterio.windows import Window

        win = Window(x, y, w + 2, h + 2)
        z = self._vrt.read(1, window=win, out_dtype="float64", masked=True)
        z = z.filled(np.nan)
        if not self._has_nodata:
            z[self._vrt.read(self._vrt.count, window=win) == 0] = np.nan
        return terrain_bands(z, self.names, self.crs, self.transform, y)

    def close(self) -> None:
        self._vrt.close()
        self._src.close()

    def __enter__(self) -> "DemOnGrid":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def raster_on_grid(path: str | os.PathLike, crs, transform, width: int, height: int,
                   resampling: Optional[str] = None) -> np.ndarray:
    """All bands of a raster reprojected onto a target grid (``WarpedVRT``): float32 ``(C, H, W)``,
    NaN outside the raster's footprint or where it has no data. ``resampling``: ``bilinear``
    (default; continuous values), ``nearest`` (default for files with a colour table: classes), …"""
    import rasterio
    from rasterio.enums import Resampling
    from rasterio.vrt import WarpedVRT

    try:
        src = rasterio.open(path)
    except rasterio.errors.RasterioIOError as e:
        raise ValueError(f"{path}: not a readable raster ({e})") from None
    with src:
        if src.crs is None or crs is None:
            raise ValueError(f"{path}: it and the target grid need a CRS to be stacked")
        if resampling is None:
            try:
                resampling = "nearest" if src.colormap(1) else "bilinear"
            except ValueError:  # no colour table
                resampling = "bilinear"
        try:
            method = Resampling[resampling]
        except KeyError:
            raise ValueError(f"unknown resampling {resampling!r}") from None
        has_nodata = src.nodata is not None
        with WarpedVRT(src, crs=crs, transform=transform, width=width, height=height, resampling=method,
                       add_alpha=not has_nodata) as vrt:
            n = src.count
            x = vrt.read(list(range(1, n + 1)), out_dtype="float32", masked=True).filled(np.nan)
            if not has_nodata:
                x[:, vrt.read(n + 1) == 0] = np.nan
    return x


def terrain_for_raster(image_path: str | os.PathLike, dem: str | os.PathLike, names: Sequence[str]) -> Optional[np.ndarray]:
    """Terrain bands on the grid of a georeferenced image file: float32 ``(len(names), H, W)``."""
    import rasterio

    with rasterio.open(image_path) as ds:
        crs, transform, w, h = ds.crs, ds.transform, ds.width, ds.height
    if crs is None:
        raise ValueError(f"{image_path}: has no CRS, so a DEM cannot be placed on its grid")
    with DemOnGrid(dem, crs, transform, w, h, names) as d:
        return d.read(0, 0, w, h)
