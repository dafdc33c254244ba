"""Atomic, block-wise writing of georeferenced prediction rasters as Cloud-Optimized GeoTIFFs.

Rows are streamed into temporary striped GeoTIFFs beside the targets; when the scene is complete
each is converted with GDAL's COG driver (tiled, DEFLATE, internal overviews) into a second
temporary file that is renamed onto the target. An interrupted or failed run leaves no file under
a target name.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from msff.inference.sources import InferenceError

__all__ = [
    "PROB_DTYPES",
    "UINT8_SCALE",
    "UINT8_NODATA",
    "MASK_NODATA",
    "check_outputs",
    "temp_path",
    "atomic_replace",
    "SceneWriter",
]

PROB_DTYPES = ("float32", "uint8")
#: uint8 probabilities hold round(p * 250); GDAL scale 0.004 turns them back into p.
UINT8_SCALE = 1.0 / 250.0
UINT8_NODATA = 255
#: Binary masks hold 0 (no landslide), 1 (landslide) and this value where the input has no data.
MASK_NODATA = 255
#: Rows per strip of the temporary rasters; flushes are aligned to it.
STRIP_ROWS = 16


def check_outputs(paths: Iterable[Optional[str | os.PathLike]], overwrite: bool = False) -> None:
    """Fail early, before any work, if an output cannot be written.

    Raises:
        InferenceError: an output exists and ``overwrite`` is False, is a folder, two outputs are
            the same file, or its folder cannot be created or written to.
    """
    seen = {}
    for p in paths:
        if p is None:
            continue
        p = Path(p)
        key = os.path.abspath(p)
        if key in seen:
            raise InferenceError(f"two outputs would be written to the same file {p}")
        seen[key] = p
        if p.is_dir():
            raise InferenceError(f"output {p} is an existing folder, not a file name")
        if p.exists() and not overwrite:
            raise InferenceError(f"output {p} already exists; pass --overwrite (overwrite=True) to replace it")
        parent = p.parent if str(p.parent) else Path(".")
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InferenceError(f"cannot create output folder {parent}: {e.strerror or e}") from None
        try:
            fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=parent)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise InferenceError(f"output folder {parent} is not writable: {e.strerror or e}") from None


def temp_path(target: str | os.PathLike, suffix: str) -> Path:
    """A fresh hidden file name beside ``target`` (same filesystem, so renaming is atomic)."""
    target = Path(target)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent or ".")
    os.close(fd)
    return Path(name)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_replace(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` onto ``target`` with ordinary file permissions (mkstemp makes 0600)."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, target)


def _unlink(p: Optional[Path]) -> None:
    if p is None:
        return
    for q in (p, Path(str(p) + ".aux.xml")):
        try:
            q.unlink()
        except FileNotFoundError:
            pass


class SceneWriter:
    """Stream probability and mask rows to temporary rasters; publish them as COGs at the end.

    Args:
        out_prob: probability GeoTIFF path (None: not written).
        out_mask: binary mask GeoTIFF path (None: not written).
        grid: ``dict(width, height, crs, transform)`` of the input scene.
        prob_dtype: ``"float32"`` (probabilities in [0, 1], nodata NaN) or ``"uint8"``
            (``round(p * 250)``, GDAL scale 0.004, nodata 255).
        tags: metadata tags written into both rasters.

    Use as a context manager: leaving the block by an exception deletes everything written.
    """

    def __init__(
        self,
        out_prob: Optional[str | os.PathLike],
        out_mask: Optional[str | os.PathLike],
        grid: dict,
        prob_dtype: str = "float32",
        tags: Optional[dict] = None,
    ):
        import rasterio

        if prob_dtype not in PROB_DTYPES:
            raise ValueError(f"prob_dtype must be one of {PROB_DTYPES}, got {prob_dtype!r}")
        self.prob_dtype = prob_dtype
        self.targets = {"prob": None if out_prob is None else Path(out_prob), "mask": None if out_mask is None else Path(out_mask)}
        self.grid = dict(grid)
        self.tags = {k: str(v) for k, v in (tags or {}).items()}
        self._tmp: dict[str, Path] = {}
        self._ds: dict = {}
        self._published: list[Path] = []
        base = dict(
            driver="GTiff",
            width=grid["width"],
            height=grid["height"],
            count=1,
            crs=grid.get("crs"),
            transform=grid.get("transform"),
            tiled=False,
            blockysize=min(STRIP_ROWS, grid["height"]),
            compress="deflate",
            zlevel=1,
            bigtiff="if_safer",
        )
        try:
            for kind, target in self.targets.items():
                if target is None:
                    continue
                if kind == "prob":
                    prof = dict(base, dtype=prob_dtype, nodata=np.nan if prob_dtype == "float32" else UINT8_NODATA)
                else:
                    prof = dict(base, dtype="uint8", nodata=MASK_NODATA)
                tmp = temp_path(target, ".part.tif")
                self._tmp[kind] = tmp
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                    ds = rasterio.open(tmp, "w", **prof)
                self._ds[kind] = ds
                if kind == "prob":
                    if prob_dtype == "uint8":
                        ds.scales = (UINT8_SCALE,)
                        ds.offsets = (0.0,)
                    ds.set_band_description(1, "landslide probability")
                else:
                    ds.set_band_description(1, "landslide mask (1 landslide, 0 background, 255 nodata)")
                ds.update_tags(**self.tags)
        except BaseException:
            self.abort()
            raise

    def write_rows(self, row0: int, prob: np.ndarray, valid: np.ndarray, threshold: float) -> None:
        """Write rows ``row0 : row0 + h`` of the scene.

        Args:
            row0: first row.
            prob: float32 ``(h, width)`` probabilities (values where ``valid`` is False are ignored).
            valid: bool ``(h, width)``; False pixels are written as nodata.
            threshold: mask = ``prob >= threshold``.
        """
        from rasterio.windows import Window

        h, w = prob.shape
        win = Window(0, row0, w, h)
        if "prob" in self._ds:
            if self.prob_dtype == "float32":
                out = np.where(valid, prob, np.float32(np.nan)).astype(np.float32, copy=False)
            else:
                q = np.rint(np.clip(prob, 0.0, 1.0) * 250.0).astype(np.uint8)
                out = np.where(valid, q, np.uint8(UINT8_NODATA))
            self._ds["prob"].write(out, 1, window=win)
        if "mask" in self._ds:
            m = np.where(valid, (prob >= threshold).astype(np.uint8), np.uint8(MASK_NODATA))
            self._ds["mask"].write(m, 1, window=win)

    def finish(self) -> dict[str, Path]:
        """Close the temporary rasters, convert them to COGs and rename them onto the targets.

        Returns:
            ``{"prob": path, "mask": path}`` for the outputs written.
        """
        import rasterio
        import rasterio.shutil

        for ds in self._ds.values():
            ds.close()
        self._ds = {}
        cogs = {}
        try:
            for kind, tmp in self._tmp.items():
                cog = temp_path(self.targets[kind], ".cog.tif")
                cogs[kind] = cog
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                    rasterio.shutil.copy(
                        tmp,
                        cog,
                        driver="COG",
                        compress="DEFLATE",
                        predictor="YES",
                        blocksize=512,
                        overviews="AUTO",
                        resampling="AVERAGE" if kind == "prob" else "NEAREST",
                        bigtiff="IF_SAFER",
                        num_threads="ALL_CPUS",
                    )
            out = {}
            for kind, cog in cogs.items():
                atomic_replace(cog, self.targets[kind])
                self._published.append(self.targets[kind])
                out[kind] = self.targets[kind]
            return out
        except BaseException:
            for cog in cogs.values():
                _unlink(cog)
            raise
        finally:
            for tmp in self._tmp.values():
                _unlink(tmp)
            self._tmp = {}

    def abort(self) -> None:
        """Delete everything written so far (temporary files only; targets are never touched)."""
        for ds in self._ds.values():
            try:
                ds.close()
            except Exception:
                pass
        self._ds = {}
        for tmp in self._tmp.values():
            _unlink(tmp)
        self._tmp = {}

    def __enter__(self) -> "SceneWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
