"""Input rasters for whole-scene prediction: one multi-band file, or a stack of single-band files.

:class:`RasterStack` opens the files once, checks they share one pixel grid, and reads any window
as float32 ``(C, h, w)`` with a validity mask, so the predictor never holds a whole scene.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = ["InferenceError", "RasterStack"]


class InferenceError(ValueError):
    """Bad input or output for whole-scene prediction; the message names the file and the problem."""


def _open(path: Path):
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    if not path.exists():
        raise InferenceError(f"{path}: file not found")
    if path.is_dir():
        raise InferenceError(f"{path}: is a folder, not a raster file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioIOError as e:
        raise InferenceError(f"{path}: not a readable raster ({e})") from None


def _georeferenced(ds) -> bool:
    from affine import Affine

    return ds.crs is not None or ds.transform != Affine.identity() or bool(ds.gcps[0])


class RasterStack:
    """A scene made of one or more rasters on the same grid, read window by window.

    Args:
        paths: one multi-band raster, or several rasters whose bands are stacked in the given
            order (e.g. ``[B4.tif, B3.tif, B2.tif]`` for RGB from Sentinel-2 band files).
        nodata: overrides the files' nodata: a pixel equal to it in any band is invalid. With
            ``None``, the files' own nodata values, internal masks and alpha bands decide
            (GDAL's mask band); NaN is always invalid.
        bands: 1-based indices into the stacked bands to use, in order (e.g. ``[4, 3, 2]`` for
            RGB from a 13-band Sentinel-2 file); default all. Only these bands are read.
        align: files on another grid (resolution, extent or CRS) than the first are reprojected
            onto the first file's grid on the fly with a ``rasterio.vrt.WarpedVRT`` (windowed, never
            a whole raster in memory); pixels outside such a file's extent are nodata. With
            ``False`` a different grid is an error.
        resampling: per file (one name, or one per path): ``bilinear`` for continuous values
            (default), ``nearest`` for classes (default for files with a colour table), or any
            ``rasterio.enums.Resampling`` name (``cubic``, ``average``, …).
        dem, terrain: derived terrain bands (``slope``, ``hillshade``; :mod:`msff.data.terrain`)
            computed from the DEM raster on this grid, window by window with a one-pixel halo,
            appended after the file bands in the given order.

    Attributes:
        count: total band count; height, width; crs; transform; georeferenced (bool);
        nodata_source: a short description of where invalid pixels come from.

    Raises:
        InferenceError: a file is missing or unreadable, or the files are on different grids.

    Example:
        >>> stack = RasterStack(["B4.tif", "B3.tif", "B2.tif"])      # doctest: +SKIP
        >>> x, valid = stack.read(Window(0, 0, 256, 256))              # doctest: +SKIP
        >>> x.shape, valid.shape                                       # doctest: +SKIP
        ((3, 256, 256), (256, 256))
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike] | str | os.PathLike,
        nodata: Optional[float] = None,
        bands: Optional[Sequence[int]] = None,
        align: bool = True,
        resampling: "str | Sequence[Optional[str]] | None" = None,
        dem: "str | os.PathLike | None" = None,
        terrain: Sequence[str] = (),
    ):
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        self.paths = [Path(p) for p in paths]
        if not self.paths:
            raise InferenceError("no input raster given")
        self.datasets = []
        self._sources = []  # the opened files behind WarpedVRTs (closed with them)
        self.aligned: list[dict] = []  # files reprojected onto the first file's grid
        if resampling is None or isinstance(resampling, str):
            resampling = [resampling] * len(self.paths)
        if len(resampling) != len(self.paths):
            raise InferenceError(f"{len(resampling)} resampling method(s) for {len(self.paths)} file(s)")
        try:
            for p in self.paths:
                self.datasets.append(_open(p))
            self._counts = [ds.count for ds in self.datasets]
            self._alpha: list[Optional[int]] = [None] * len(self.datasets)
            if align:
                self._align(list(resampling))
            else:
                self._check_grid()
        except BaseException:
            self.close()
            raise
        first = self.datasets[0]
        self.height, self.width = first.height, first.width
        self.crs, self.transform = first.crs, first.transform
        # every stacked band as (dataset number, 1-based band index in that dataset)
        stacked = [(k, i + 1) for k, n in enumerate(self._counts) for i in range(n)]
        if bands is not None:
            bad = [b for b in bands if not 1 <= int(b) <= len(stacked)]
            if bad or not len(bands):
                self.close()
                raise InferenceError(
                    f"band selection {list(bands)} is invalid: the input has {len(stacked)} band(s), "
                    "numbered from 1"
                )
            stacked = [stacked[int(b) - 1] for b in bands]
        self._bands = stacked
        # consecutive bands of one dataset are read in one call
        self._reads: list[tuple[int, list[int]]] = []
        for k, i in stacked:
            if self._reads and self._reads[-1][0] == k:
                self._reads[-1][1].append(i)
            else:
                self._reads.append((k, [i]))
        self.count = len(stacked)
        self.georeferenced = _georeferenced(first)
        self.nodata = None if nodata is None else float(nodata)
        self.dtypes = [self.datasets[k].dtypes[i - 1] for k, i in stacked]
        self.descriptions = [
            self.datasets[k].descriptions[i - 1] or f"{self.paths[k].name}:{i}" for k, i in stacked
        ]
        self.terrain = list(terrain or ())
        self._dem = None
        if self.terrain:
            from msff.data.terrain import DemOnGrid

            if dem is None:
                self.close()
                raise InferenceError(f"terrain bands {', '.join(self.terrain)} need a DEM (--dem DEM.tif)")
            try:
                if not Path(dem).is_file():
                    raise InferenceError(f"{dem}: DEM file not found")
                self._dem = DemOnGrid(dem, self.crs, self.transform, self.width, self.height, self.terrain)
            except InferenceError:
                self.close()
                raise
            except ValueError as e:
                self.close()
                raise InferenceError(str(e)) from None
            self.count += len(self.terrain)
            self.dtypes += ["float32"] * len(self.terrain)
            self.descriptions += [f"{t}({Path(dem).name})" for t in self.terrain]
        if self.nodata is not None:
            self.nodata_source = f"--nodata {self.nodata:g}"
        else:
            vals = sorted({ds.nodata for ds in self.datasets if ds.nodata is not None})
            kinds = []
            if vals:
                kinds.append("nodata value " + ", ".join(f"{v:g}" for v in vals))
            if any(_has_real_mask(ds) for ds in self.datasets):
                kinds.append("mask band")
            self.nodata_source = " + ".join(kinds) if kinds else "none (all pixels valid except NaN)"

    # ---- checks ---------------------------------------------------------------------------------
    def _align(self, resampling: list) -> None:
        from rasterio.enums import Resampling
        from rasterio.vrt import WarpedVRT
        from rasterio.warp import transform_bounds

        ref = self.datasets[0]
        for k in range(1, len(self.datasets)):
            ds, p = self.datasets[k], self.paths[k]
            if not self._grid_problems(ds, ref):
                continue
            if ds.crs is None or ref.crs is None:
                raise InferenceError(
                    f"{p} is not on the grid of {self.paths[0]} and one of them has no CRS, so it cannot be "
                    "reprojected; give both a CRS or resample the files to one grid first"
                )
            name = resampling[k]
            if name is None:
                try:
                    categorical = bool(ds.colormap(1))
                except ValueError:  # no colour table
                    categorical = False
                name = "nearest" if categorical else "bilinear"
            try:
                method = Resampling[name]
            except KeyError:
                raise InferenceError(f"{p}: unknown resampling {name!r} (use bilinear, nearest, cubic, average, …)") from None
            left, b, r, t = transform_bounds(ds.crs, ref.crs, *ds.bounds)
            rl, rb, rr, rt = ref.bounds
            if left >= rr or r <= rl or b >= rt or t <= rb:
                raise InferenceError(f"{p} does not overlap {self.paths[0]} (bounds {ds.bounds} in {ds.crs})")
            has_mask = ds.nodata is not None or _has_real_mask(ds)
            vrt = WarpedVRT(ds, crs=ref.crs, transform=ref.transform, width=ref.width, height=ref.height,
                            resampling=method, add_alpha=not has_mask)
            self._sources.append(ds)
            self.datasets[k] = vrt
            if not has_mask:  # validity = inside the source's footprint, from the VRT's alpha band
                self._alpha[k] = ds.count + 1
            self.aligned.append({"file": str(p), "resampling": name, "from_crs": str(ds.crs),
                                 "from_resolution": [abs(ds.transform.a), abs(ds.transform.e)],
                                 "to_resolution": [abs(ref.transform.a), abs(ref.transform.e)]})

    @staticmethod
    def _grid_problems(ds, ref) -> list:
        problems = []
        if (ds.width, ds.height) != (ref.width, ref.height):
            problems.append(f"size {ds.width}x{ds.height} vs {ref.width}x{ref.height}")
        if ds.crs != ref.crs:
            problems.append(f"CRS {ds.crs} vs {ref.crs}")
        if not ds.transform.almost_equals(ref.transform, precision=1e-9 * max(1.0, abs(ref.transform.a))):
            problems.append(f"transform {tuple(ds.transform)[:6]} vs {tuple(ref.transform)[:6]}")
        return problems

    def _check_grid(self) -> None:
        ref = self.datasets[0]
        for p, ds in zip(self.paths[1:], self.datasets[1:], strict=True):
            problems = self._grid_problems(ds, ref)
            if problems:
                raise InferenceError(
                    f"{p} is not on the same grid as {self.paths[0]} ("
                    + "; ".join(problems)
                    + "); resample the band files to one grid first (e.g. gdalwarp -tap -tr)"
                )

    # ---- reading --------------------------------------------------------------------------------
    def read(self, window) -> tuple[np.ndarray, np.ndarray]:
        """Read a window of all bands.

        Args:
            window: a ``rasterio.windows.Window`` inside the raster.

        Returns:
            ``(x, valid)``: float32 ``(C, h, w)`` raw band values and bool ``(h, w)``, True where
            every band holds data.
        """
        parts = []
        valid = None
        for k, idx in self._reads:
            p, ds = self.paths[k], self.datasets[k]
            try:
                x = ds.read(idx, window=window, out_dtype="float32")
                if self.nodata is not None:
                    v = np.all(x != np.float32(self.nodata), axis=0)
                else:
                    v = np.all(ds.read_masks(idx, window=window) > 0, axis=0)
                if self._alpha[k] is not None:  # outside a reprojected file's footprint
                    v &= ds.read(self._alpha[k], window=window) > 0
            except Exception as e:  # rasterio raises several types for corrupt blocks
                raise InferenceError(f"{p}: reading window {window} failed ({e})") from None
            v &= np.all(np.isfinite(x), axis=0)
            parts.append(x)
            valid = v if valid is None else (valid & v)
        if self._dem is not None:
            t = self._dem.read(int(window.col_off), int(window.row_off), int(window.width), int(window.height))
            valid &= np.all(np.isfinite(t), axis=0)
            parts.append(t)
        x = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
        return x, valid

    def sample(self, max_windows: int = 256, window: int = 64, max_pixels: int = 16384, seed: int = 0) -> np.ndarray:
        """Raw values of valid pixels from at most ``max_windows`` windows of ``window``² pixels
        (seeded random positions; a scene that small is read whole, tile by tile), keeping at most
        ``max_pixels`` in all (a seeded random subset of each window). Reads and memory are bounded
        whatever the scene size.

        Returns:
            float32 ``(C, N)``: N valid pixels (pixels invalid in any band are left out).
        """
        from rasterio.windows import Window

        wh, ww = min(window, self.height), min(window, self.width)
        if self.height * self.width <= max_windows * wh * ww:
            starts = [(y, x) for y in range(0, self.height, wh) for x in range(0, self.width, ww)]
        else:
            rng = np.random.default_rng(seed)
            starts = list(zip(rng.integers(0, self.height - wh + 1, max_windows).tolist(),
                              rng.integers(0, self.width - ww + 1, max_windows).tolist(), strict=True))
        rng = np.random.default_rng(seed + 1)
        per = max(1, max_pixels // len(starts))
        parts = []
        for y, x in starts:
            h, w = min(wh, self.height - y), min(ww, self.width - x)
            xin, v = self.read(Window(x, y, w, h))
            idx = np.flatnonzero(v)
            if idx.size > per:
                idx = rng.choice(idx, per, replace=False)
            parts.append(xin.reshape(self.count, -1)[:, idx])
        return np.concatenate(parts, axis=1) if parts else np.zeros((self.count, 0), np.float32)

    def read_overview(self, out_height: int, out_width: int, bands: Sequence[int]) -> np.ndarray:
        """Decimated read of the given 0-based (selected) band positions: float32 ``(len(bands), h, w)``.

        GDAL reads from overviews or subsamples, so memory stays ``O(out_height·out_width)``.
        """
        from rasterio.enums import Resampling

        out = []
        for b in bands:
            k, i = self._bands[b]
            out.append(
                self.datasets[k].read(i, out_shape=(out_height, out_width), resampling=Resampling.average, out_dtype="float32", masked=True)
                .filled(np.nan)
            )
        return np.stack(out)

    @property
    def profile(self) -> dict:
        """Grid of the scene: width, height, crs, transform (for writing aligned outputs)."""
        return dict(width=self.width, height=self.height, crs=self.crs, transform=self.transform)

    def close(self) -> None:
        if getattr(self, "_dem", None) is not None:
            self._dem.close()
            self._dem = None
        for ds in self.datasets + getattr(self, "_sources", []):
            ds.close()
        self.datasets = []
        self._sources = []

    def __enter__(self) -> "RasterStack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"RasterStack({[str(p) for p in self.paths]}, {self.count} bands, "
            f"{self.width}x{self.height}, crs={self.crs})"
        )


def _has_real_mask(ds) -> bool:
    from rasterio.enums import MaskFlags

    return any(
        MaskFlags.per_dataset in flags or MaskFlags.alpha in flags
        for flags in ds.mask_flag_enums
        if MaskFlags.all_valid not in flags
    )
