"""Reading images and masks from files: rasters through rasterio (PNG, JPEG, TIFF/GeoTIFF, any band
count and dtype) and Landslide4Sense-style ``.h5`` patches through h5py.

Every reader raises :class:`DataError` naming the file and the problem, never a bare library error.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

__all__ = [
    "DataError",
    "IGNORE_INDEX",
    "RASTER_SUFFIXES",
    "H5_SUFFIXES",
    "MaskEncoding",
    "read_image",
    "read_mask",
    "decode_mask",
    "raster_shape",
]

#: Target value of pixels excluded from loss and metrics (nodata, padding, outside a rotation).
IGNORE_INDEX = 255
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
H5_SUFFIXES = (".h5", ".hdf5")


class DataError(ValueError):
    """A data file is missing, unreadable, unpaired or of an unexpected form. The message names it."""


def _is_h5(path: Path) -> bool:
    return path.suffix.lower() in H5_SUFFIXES


def _open_raster(path: Path):
    import rasterio
    from rasterio.errors import NotGeoreferencedWarning, RasterioIOError

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except RasterioIOError as e:
        raise DataError(f"{path}: not a readable raster ({e})") from None


def _check_png(path: Path, decode: bool = True) -> tuple[int, int]:
    # GDAL's PNG driver decodes a truncated 8-bit PNG without any error (missing rows come back as
    # zeros or as whatever was in memory, different on each read). Pillow checks every chunk's CRC
    # up to IEND (verify) and, with decode, decodes every row refusing truncated data (load).
    from PIL import Image, ImageFile, UnidentifiedImageError

    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise DataError(f"{path}: cannot check the file: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set in this process")
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None  # large scenes are not decompression bombs here
    try:
        with Image.open(path) as im:
            size = im.size
            im.verify()
        if decode:
            with Image.open(path) as im:
                im.load()
    except (OSError, SyntaxError, ValueError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: corrupt or truncated PNG ({e}); re-export or remove it") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return size


def _read_raster(path: Path) -> tuple[np.ndarray, object]:
    """All bands of a raster file and its nodata value; a file that does not decode completely
    is a DataError naming it."""
    from rasterio.errors import RasterioError

    png = path.suffix.lower() == ".png"
    with _open_raster(path) as src:
        if png:
            size = _check_png(path)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                arr = src.read()
            except RasterioError as e:
                why = str(e.__cause__ or e) if "previous exception" in str(e) else str(e)
                why = "; ".join(dict.fromkeys([str(w.message) for w in caught] + [why]))
                raise DataError(f"{path}: corrupt or truncated raster, reading its pixels failed ({why})") from None
        for w in caught:  # a read that worked passes its warnings on
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        nodata = src.nodata
    if png and (arr.shape[2], arr.shape[1]) != tuple(size):
        raise DataError(f"{path}: decoded {arr.shape[2]}x{arr.shape[1]} pixels but its header says {size[0]}x{size[1]}")
    return arr, nodata


def _h5_array(path: Path, keys: Sequence[str]) -> np.ndarray:
    import h5py

    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with h5py.File(path, "r") as f:
            for k in keys:
                if k in f:
                    return np.asarray(f[k])
            found = list(f.keys())
    except OSError as e:
        raise DataError(f"{path}: not a readable HDF5 file ({e})") from None
    raise DataError(f"{path}: HDF5 file has none of the keys {list(keys)} (found {found})")


def _channels_first(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim != 3:
        raise DataError(f"{path}: expected a 2-D or 3-D array, got shape {arr.shape}")
    # Landslide4Sense stores (H, W, C); accept (C, H, W) too: bands are the smallest axis.
    if arr.shape[-1] < arr.shape[0] and arr.shape[-1] <= 64:
        arr = np.moveaxis(arr, -1, 0)
    return arr


def raster_shape(path: str | os.PathLike) -> tuple[int, int, int]:
    """(bands, height, width) of an image file, read from its header (h5: its dataset). A PNG's
    chunk checksums are checked too (no decoding), so a truncated PNG fails here already."""
    path = Path(path)
    if _is_h5(path):
        import h5py

        try:
            with h5py.File(path, "r") as f:
                for k in ("img", "image", "mask"):
                    if k in f:
                        shp = f[k].shape
                        break
                else:
                    raise DataError(f"{path}: HDF5 file has no 'img' or 'mask' dataset")
        except OSError as e:
            raise DataError(f"{path}: not a readable HDF5 file ({e})") from None
        if len(shp) == 2:
            return (1, shp[0], shp[1])
        if len(shp) == 3 and shp[-1] < shp[0] and shp[-1] <= 64:
            return (shp[2], shp[0], shp[1])
        if len(shp) == 3:
            return tuple(shp)  # type: ignore[return-value]
        raise DataError(f"{path}: expected a 2-D or 3-D dataset, got shape {shp}")
    with _open_raster(path) as src:
        if path.suffix.lower() == ".png":
            _check_png(path, decode=False)
        return (src.count, src.height, src.width)


def read_image(
    path: str | os.PathLike, bands: Optional[Sequence[int]] = None
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Read an image as stored (no scaling) plus its valid-pixel mask.

    Args:
        path: raster file (PNG/JPEG/TIFF/GeoTIFF, anything GDAL reads) or ``.h5`` patch
            (dataset ``img``, (H, W, C) or (C, H, W)).
        bands: 1-based band indices to keep (e.g. ``[4, 3, 2]``); None keeps all.

    Returns:
        ``(image, valid)``: image (C, H, W) in its stored dtype; valid (H, W) bool, False where any
        band equals the raster's nodata value or is NaN with NaN declared as nodata; None when every
        pixel is valid.

    Raises:
        DataError: missing/unreadable file, band index out of range, or NaN/inf values that are not
            declared nodata.

    Example:
        >>> import tempfile
        >>> from msff.data.synthetic import write_scene_dataset
        >>> with tempfile.TemporaryDirectory() as d:
        ...     root = write_scene_dataset(d, n=1, size=32)
        ...     img, valid = read_image(root / "images" / "scene_0000.png", bands=[3, 2, 1])
        >>> img.shape, img.dtype, valid
        ((3, 32, 32), dtype('uint8'), None)
    """
    path = Path(path)
    nodata = None
    if _is_h5(path):
        arr = _channels_first(_h5_array(path, ("img", "image")), path)
    else:
        arr, nodata = _read_raster(path)
    if bands is not None:
        bands = [int(b) for b in bands]
        bad = [b for b in bands if b < 1 or b > arr.shape[0]]
        if bad:
            raise DataError(f"{path}: band(s) {bad} out of range; the file has {arr.shape[0]} bands (1-based)")
        arr = arr[[b - 1 for b in bands]]
    valid = None
    if nodata is not None:
        if np.isnan(nodata):
            invalid = np.isnan(arr).any(axis=0)
        else:
            invalid = (arr == np.asarray(nodata).astype(arr.dtype)).any(axis=0)
        if invalid.any():
            valid = ~invalid
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr)
        if valid is not None:
            bad &= valid[None]
        if bad.any():
            n = int(bad.any(axis=0).sum())
            raise DataError(
                f"{path}: {n} pixel(s) hold NaN or inf and the file declares no matching nodata value; "
                "set nodata in the file or clean the image"
            )
    return arr, valid


@dataclass(frozen=True)
class MaskEncoding:
    """How a mask file encodes landslide pixels.

    Args:
        color: RGB landslide colour, e.g. ``(255, 255, 0)``; None detects it per mask as the most
            frequent non-black colour (background must be black).
        threshold: for colour masks, a pixel is landslide when its projection onto the landslide
            colour is at least ``threshold`` of that colour (0.5 splits anti-aliased edges halfway).
            For single-band masks: None auto-detects 0/1 or 0/255; a number marks ``value > threshold``.
        ignore_values: single-band values excluded from loss and metrics (besides the file's nodata).

    Example:
        >>> enc = MaskEncoding(color=(200, 128, 0))   # Nepal: orange with soft edges
    """

    color: Optional[tuple[int, int, int]] = None
    threshold: Optional[float] = None
    ignore_values: tuple[int, ...] = ()


def _decode_single(m: np.ndarray, enc: MaskEncoding, path: Path, nodata) -> np.ndarray:
    out = np.zeros(m.shape, np.uint8)
    ignore = np.zeros(m.shape, bool)
    if nodata is not None:
        ignore |= np.isnan(m) if np.isnan(nodata) else (m == nodata)
    for v in enc.ignore_values:
        ignore |= m == v
    vals = m[~ignore]
    if enc.threshold is not None:
        out[m > enc.threshold] = 1
    else:
        if np.issubdtype(m.dtype, np.floating) and not np.isfinite(vals).all():
            raise DataError(f"{path}: mask holds NaN or inf values that are not declared nodata")
        uniq = np.unique(vals)
        if np.isin(uniq, (0, 1)).all():
            out[m == 1] = 1
        elif np.isin(uniq, (0, 255)).all():
            out[m == 255] = 1
        else:
            shown = ", ".join(str(u) for u in uniq[:8]) + (" …" if len(uniq) > 8 else "")
            raise DataError(
                f"{path}: unknown mask encoding: values {{{shown}}} are neither 0/1 nor 0/255; "
                "give a threshold (--mask-threshold T marks value > T) or ignore values"
            )
    out[ignore] = IGNORE_INDEX
    return out


def _decode_color(m: np.ndarray, enc: MaskEncoding, path: Path) -> np.ndarray:
    rgb = m[:3].astype(np.float32)
    color = enc.color
    if color is None:
        flat = m[:3].reshape(3, -1).T
        nonblack = flat[flat.max(axis=1) > 0]
        if len(nonblack) == 0:
            return np.zeros(m.shape[1:], np.uint8)
        cols, counts = np.unique(nonblack, axis=0, return_counts=True)
        color = tuple(int(c) for c in cols[counts.argmax()])
    c = np.asarray(color, np.float32).reshape(3, 1, 1)
    cc = float((c * c).sum())
    if cc == 0:
        raise DataError(f"{path}: landslide colour {color} is black, the background colour")
    t = (rgb * c).sum(axis=0) / cc  # projection onto the landslide colour: 0 background, 1 colour
    resid = np.sqrt(((rgb - t[None].clip(0, 1) * c) ** 2).sum(axis=0))
    off = resid > 0.35 * np.sqrt(cc)
    # Soft edges lie near the black→colour segment; other colours mean another encoding (e.g. classes).
    if off.mean() > 0.001:
        others = np.unique(m[:3][:, off].T, axis=0)[:5].tolist()
        raise DataError(
            f"{path}: unknown mask encoding: besides black and the landslide colour {tuple(color)}, "
            f"{int(off.sum())} pixels have other colours (e.g. {others}); give the landslide colour "
            "(--mask-color R,G,B)"
        )
    thr = 0.5 if enc.threshold is None else float(enc.threshold)
    if thr > 1.0:  # a threshold given in pixel units (e.g. 127) rather than as a fraction
        thr = thr / float(max(color))
    return (t >= thr).astype(np.uint8)


def decode_mask(
    mask: np.ndarray, encoding: Optional[MaskEncoding] = None, path: str | os.PathLike = "<array>", nodata=None
) -> np.ndarray:
    """Turn a stored mask array into a target: 1 landslide, 0 background, 255 ignore.

    Args:
        mask: (H, W) or (C, H, W) array as stored; C = 3 or 4 is a colour mask (alpha ignored).
        encoding: :class:`MaskEncoding`.
        path: file name used in error messages.
        nodata: value marking nodata pixels of a single-band mask.

    Returns:
        uint8 (H, W) target.

    Example:
        >>> import numpy as np
        >>> m = np.zeros((3, 4, 4), np.uint8); m[:, :2] = np.array([255, 0, 0]).reshape(3, 1, 1)
        >>> int(decode_mask(m).sum())
        8
    """
    path = Path(path)
    encoding = encoding or MaskEncoding()
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim == 2:
        return _decode_single(mask, encoding, path, nodata)
    if mask.ndim == 3 and mask.shape[0] in (3, 4):
        return _decode_color(mask, encoding, path)
    raise DataError(f"{path}: unknown mask encoding: a mask must have 1, 3 (RGB) or 4 (RGBA) bands, got shape {mask.shape}")


def read_mask(path: str | os.PathLike, encoding: Optional[MaskEncoding] = None) -> np.ndarray:
    """Read and decode a mask file (raster, or ``.h5`` with dataset ``mask``).

    Returns:
        uint8 (H, W): 1 landslide, 0 background, :data:`IGNORE_INDEX` excluded.
    """
    path = Path(path)
    nodata = None
    if _is_h5(path):
        arr = _h5_array(path, ("mask", "label", "gt"))
        if arr.ndim == 3:
            arr = _channels_first(arr, path)
    else:
        arr, nodata = _read_raster(path)
    return decode_mask(arr, encoding or MaskEncoding(), path, nodata)
