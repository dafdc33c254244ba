"""Atomic, block-wise writing of georeferenced prediction rasters as Cloud-Optimized GeoTIFFs.

Rows are streamed into temporary striped GeoTIFFs beside the targets; when the scene is complete
each is converted with GDAL's COG driver (tiled, DEFLATE, internal overviews) into a second
temporary file that is renamed onto the target. An interrupted or failed run leaves no file under
a target name.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from msff.fileio import (
    DiskFullError,
    clean_stale_temporaries,
    disk_full_guard,
    free_bytes,
    make_temp_file,
    publish_file,
)
from msff.inference.sources import InferenceError

log = logging.getLogger("msff.inference")

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
            os.unlink(make_temp_file(p, ".probe"))
        except OSError as e:
            raise InferenceError(f"output folder {parent} is not writable: {e.strerror or e}") from None
    # Everything checked: remove what killed earlier runs left beside these outputs (only
    # temporaries named after them whose owner process is gone).
    for p in seen.values():
        for stale in clean_stale_temporaries(p):
            log.info("removed stale temporary %s", stale)


def temp_path(target: str | os.PathLike, suffix: str) -> Path:
    """A fresh hidden file beside ``target`` (same filesystem, so renaming is atomic), named
    ``.<target name>.msff-<host>-<pid>-…<suffix>`` so a later run can remove it if this process dies."""
    return make_temp_file(target, suffix)


def atomic_replace(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` onto ``target`` with the umask's ordinary file mode (mkstemp makes 0600)."""
    publish_file(tmp, target)


def _unlink(p: Optional[Path]) -> None:
    if p is None:
        return
    for q in (p, Path(str(p) + ".aux.xml")):
        try:
            q.unlink()
        except FileNotFoundError:
            pass


@contextlib.contextmanager
def _quiet_gdal():
    """Hold back what C libraries print on stderr inside the block (libtiff prints one line per
    failed write before GDAL raises); it is passed on unless the block ends in an exception,
    which the caller reports in one line. A pipe, not a file: the disk may be full."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        r, w = os.pipe()
    except (OSError, ValueError, AttributeError):
        yield
        return
    os.set_blocking(w, False)  # more than the pipe holds is dropped, never a deadlock
    os.dup2(w, 2)
    os.close(w)
    ok = False
    try:
        yield
        ok = True
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.set_blocking(r, False)
        chunks = []
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := os.read(r, 65536):
                chunks.append(chunk)
        os.close(r)
        if ok and chunks:
            os.write(2, b"".join(chunks))


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

    def _bytes_needed(self) -> int:
        # Uncompressed size of every output, twice (the streamed temporary and the COG beside it).
        per_px = sum(4 if kind == "prob" and self.prob_dtype == "float32" else 1
                     for kind, t in self.targets.items() if t is not None)
        return 2 * int(self.grid["width"]) * int(self.grid["height"]) * per_px

    @contextlib.contextmanager
    def _space(self):
        """A full disk becomes one InferenceError naming the output and the space needed; everything
        written so far is deleted."""
        target = next((t for t in self.targets.values() if t is not None), Path("."))
        with _quiet_gdal():
            try:
                with disk_full_guard(target, self._bytes_needed()):
                    yield
            except DiskFullError as e:
                self.abort()  # then say what is free once our temporaries are gone
                raise InferenceError(str(DiskFullError(e.path, e.needed, free_bytes(e.path)))) from None

    def write_rows(self, row0: int, prob: np.ndarray, valid: np.ndarray, threshold: float) -> None:
        """Write rows ``row0 : row0 + h`` of the scene.

        Args:
            row0: first row.
            prob: float32 ``(h, width)`` probabilities (values where ``valid`` is False are ignored).
            valid: bool ``(h, width)``; False pixels are written as nodata.
            threshold: mask = ``prob >= threshold``.
        """
        from rasterio.windows import Window

        with self._space():
            self._write_rows(Window(0, row0, prob.shape[1], prob.shape[0]), prob, valid, threshold)

    def _write_rows(self, win, prob: np.ndarray, valid: np.ndarray, threshold: float) -> None:
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
        with self._space():
            return self._finish()

    def _finish(self) -> dict[str, Path]:
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
            except Exception:  # best-effort cleanup while another error propagates; GDAL raises any type
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
