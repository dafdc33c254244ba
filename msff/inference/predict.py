"""Seamless, memory-bounded whole-scene prediction.

The scene is swept one row of windows at a time (:class:`~msff.inference.tiling.TileGrid`).
Weighted predictions accumulate in a rolling buffer of ``tile + 16`` rows by the scene width;
rows that no later window touches are normalised, thresholded and streamed to the output
rasters, and the buffer rolls on. GDAL's block cache is held to what one window row needs
(:func:`gdal_cache_bytes`) instead of GDAL's default of 5 % of RAM. Memory is ``O(tile × width)``
whatever the scene height, and every input read is one window, so a scene larger than RAM works.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from msff.data.domain import DomainError, DomainWarning, compare_domain, fraction_check
from msff.data.scaling import InputScale, ScaleError
from msff.inference.engine import make_engine
from msff.inference.predictor import Predictor
from msff.inference.sources import InferenceError, RasterStack
from msff.inference.tiling import TileGrid
from msff.inference.writers import STRIP_ROWS, SceneWriter, check_outputs

__all__ = ["SceneResult", "predict_scene", "order_dates", "predict_array", "resolve_device", "NotGeoreferencedInputWarning",
           "gdal_cache_bytes", "bounded_gdal_cache"]

log = logging.getLogger("msff.inference")


class NotGeoreferencedInputWarning(UserWarning):
    """The input has no CRS or transform: outputs are in pixel coordinates, areas are not in m²."""


@dataclass
class SceneResult:
    """What :func:`predict_scene` did.

    Attributes:
        prob, mask: paths written (None for an output not requested).
        width, height: scene size in pixels; valid_pixels: pixels with data in every band.
        landslide_pixels: valid pixels at or above the threshold; tiles: windows run through the
        model (windows without any valid pixel are skipped); seconds: wall time; threshold.
    """

    prob: Optional[Path]
    mask: Optional[Path]
    width: int
    height: int
    valid_pixels: int
    landslide_pixels: int
    tiles: int
    tiles_skipped: int
    seconds: float
    threshold: float
    georeferenced: bool
    crs: Optional[str] = None
    extra: dict = field(default_factory=dict)

    @property
    def megapixels_per_second(self) -> float:
        return self.width * self.height / 1e6 / max(self.seconds, 1e-9)


def resolve_device(device: Optional[str | torch.device] = None) -> torch.device:
    """``None``/``"auto"`` → cuda if available else cpu; otherwise checked ``torch.device``."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InferenceError(f"device {device!r} requested but no CUDA GPU is available")
    return dev


def _as_predictor(model, normalization, threshold, model_output) -> Predictor:
    if isinstance(model, Predictor):
        changes = {}
        if normalization is not None:
            changes.update(mean=normalization.get("mean"), std=normalization.get("std"))
        if threshold is not None:
            changes.update(threshold=float(threshold))
        return dataclasses.replace(model, **changes) if changes else model
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or a Predictor, got {type(model).__name__}")
    meta = getattr(model, "metadata", None) or {}
    if normalization is None:
        normalization = meta.get("normalization")
    if normalization is None:
        raise ValueError(
            "normalization is required: {'mean': [...], 'std': [...]} per band (the training "
            "statistics), or {'mean': None, 'std': None} to feed raw values"
        )
    if model_output is None:
        act = getattr(model, "config", {}).get("activation") if isinstance(getattr(model, "config", None), dict) else None
        model_output = "probabilities" if act in ("sigmoid", "softmax") else "logits"
    return Predictor(
        model=model,
        mean=normalization.get("mean"),
        std=normalization.get("std"),
        threshold=float(threshold if threshold is not None else meta.get("threshold", 0.5)),
        output=model_output,
        bands=meta.get("bands"),
        name=str(meta.get("model_name", type(model).__name__)),
        metadata=dict(meta),
        input_scale=meta.get("input_scale"),
    )


def _autocast(device: torch.device, amp):
    if not amp:
        return contextlib.nullcontext()
    if amp is True or amp == "auto":
        if device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.bfloat16
    else:
        dtype = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def _cudnn_benchmark(device: torch.device):
    """Every window has the same shape: let cuDNN pick its fastest kernels (restored after)."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = old


_FLIPS = {False: [()], True: [(), (-1,), (-2,), (-2, -1)]}


@torch.inference_mode()
def _run_batch(pred: Predictor, x: np.ndarray, device: torch.device, amp, tta: bool) -> np.ndarray:
    t = torch.from_numpy(x)
    if device.type == "cuda":
        t = t.pin_memory().to(device, non_blocking=True)
    flips = _FLIPS[bool(tta)]
    acc = None
    with _autocast(device, amp):
        for dims in flips:
            xi = torch.flip(t, dims) if dims else t
            p = pred.predict_proba(xi).float()
            if dims:
                p = torch.flip(p, dims)
            acc = p if acc is None else acc + p
    if len(flips) > 1:
        acc /= len(flips)
    return acc.cpu().numpy()


def predict_array(
    model,
    x: np.ndarray,
    *,
    normalization: Optional[dict] = None,
    valid: Optional[np.ndarray] = None,
    tile: int = 512,
    overlap: int = 128,
    margin: Optional[int] = None,
    batch_size: int = 4,
    tta: bool = False,
    device=None,
    amp=False,
    engine: Optional[str] = "auto",
) -> np.ndarray:
    """Tiled, blended prediction of an in-memory image (the same algorithm as :func:`predict_scene`).

    Args:
        model: an ``nn.Module`` or :class:`Predictor`.
        x: raw band values ``(C, H, W)``.
        normalization: ``{"mean": [...], "std": [...]}`` (default: the model's metadata).
        valid: bool ``(H, W)``; windows with no valid pixel are skipped, invalid pixels get NaN.
        tile, overlap, margin, batch_size, tta, device, amp, engine: as in :func:`predict_scene`.

    Returns:
        float32 probabilities ``(H, W)`` (NaN where ``valid`` is False).

    Example:
        >>> import numpy as np, torch
        >>> m = torch.nn.Conv2d(2, 1, 1)
        >>> norm = {"mean": [0.0, 0.0], "std": [1.0, 1.0]}
        >>> predict_array(m, np.ones((2, 50, 70), "float32"), normalization=norm, tile=32, overlap=8).shape
        (50, 70)
    """
    pred = _as_predictor(model, normalization, None, None)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 3:
        raise ValueError(f"x must be (C, H, W), got shape {x.shape}")
    c, h, w = x.shape
    pred.check_bands(c, "array")
    if valid is None:
        valid = np.ones((h, w), dtype=bool)
    valid = valid & np.all(np.isfinite(x), axis=0)
    if pred.input_scale.needs_fit:
        pred = dataclasses.replace(pred, input_scale=pred.input_scale.fit(x[:, valid], "array"))
    dev = resolve_device(device)
    pred.model.eval().to(dev)
    pred = dataclasses.replace(pred, model=make_engine(pred.model, engine, dev, in_channels=c))
    grid = TileGrid(h, w, tile, overlap, margin)
    acc = np.zeros((h, w), np.float32)
    wsum = np.zeros((h, w), np.float32)
    jobs = [(r, c0) for r in grid.rows for c0 in grid.cols if valid[r : r + grid.tile_h, c0 : c0 + grid.tile_w].any()]
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i : i + batch_size]
        batch = np.stack([x[:, r : r + grid.tile_h, c0 : c0 + grid.tile_w] for r, c0 in chunk]).copy()
        batch = _prepare(pred, batch, np.stack([valid[r : r + grid.tile_h, c0 : c0 + grid.tile_w] for r, c0 in chunk]))
        probs = _run_batch(pred, batch, dev, amp, tta)
        for (r, c0), p in zip(chunk, probs, strict=True):
            wt = grid.weights(r, c0)
            acc[r : r + grid.tile_h, c0 : c0 + grid.tile_w] += p * wt
            wsum[r : r + grid.tile_h, c0 : c0 + grid.tile_w] += wt
    with np.errstate(invalid="ignore", divide="ignore"):
        out = acc / wsum
    out[~valid] = np.nan
    return out


#: Floor and ceiling of the GDAL block cache during a scene (see :func:`gdal_cache_bytes`).
GDAL_CACHE_MIN = 64 * 2**20
GDAL_CACHE_MAX = 1024 * 2**20


def gdal_cache_bytes(width: int, bands: int, tile: int) -> int:
    """GDAL block-cache size for sweeping a scene ``width`` pixels wide with ``tile``-pixel windows.

    GDAL's default cache is 5 % of the machine's RAM and fills with every block read or written, so
    a process's memory would grow with the scene up to that size. The sweep re-reads a block only
    within one row of windows and the overlap with the next, so the cache needs the blocks of one
    window row plus a block row above and below it (blocks up to 512 rows, samples up to 4 bytes):
    ``(tile + 1024) × width × bands × 4`` bytes, clamped to [64 MiB, 1 GiB]. It depends on the width,
    never on the height.

    Example:
        >>> gdal_cache_bytes(10_000, 3, 512) // 2**20
        175
    """
    need = (int(tile) + 1024) * int(width) * int(bands) * 4
    return int(min(GDAL_CACHE_MAX, max(GDAL_CACHE_MIN, need)))


@contextlib.contextmanager
def bounded_gdal_cache(width: int, bands: int, tile: int):
    """Set GDAL's block cache to :func:`gdal_cache_bytes` (never above the current setting) inside
    the block, restored after. The setting is process-wide (it also covers the read-ahead thread)."""
    import rasterio
    from rasterio._env import get_gdal_config

    current = get_gdal_config("GDAL_CACHEMAX")
    size = gdal_cache_bytes(width, bands, tile)
    if isinstance(current, int) and current > 0:
        size = min(size, current if current > 100_000 else current * 2**20)  # small values are MB
    with rasterio.Env(GDAL_CACHEMAX=size):
        yield size


def _prepare(pred: Predictor, batch: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Input scale and normalisation of ``(B, C, h, w)`` in place; invalid pixels become 0 (the
    training mean)."""
    pred.normalize(batch)
    batch[np.broadcast_to(~valid[:, None], batch.shape)] = 0.0
    return batch


def predict_scene(
    model,
    sources: Sequence[str | os.PathLike] | str | os.PathLike | RasterStack,
    out_prob: Optional[str | os.PathLike],
    out_mask: Optional[str | os.PathLike] = None,
    *,
    normalization: Optional[dict] = None,
    threshold: Optional[float] = None,
    tile: int = 512,
    overlap: int = 128,
    margin: Optional[int] = None,
    batch_size: int = 4,
    tta: bool = False,
    nodata: Optional[float] = None,
    band_indexes: Optional[Sequence[int]] = None,
    device=None,
    amp=False,
    backend: Optional[str] = None,
    prob_dtype: str = "float32",
    overwrite: bool = False,
    progress: bool = True,
    model_output: Optional[str] = None,
    tags: Optional[dict] = None,
    input_scale=None,
    domain_check: str = "warn",
    domain_windows: int = 256,
    engine: Optional[str] = "auto",
    resampling=None,
    dem: Optional[str | os.PathLike] = None,
    terrain: Optional[Sequence[str]] = None,
) -> SceneResult:
    """Predict landslide probability over a whole scene and write georeferenced COGs.

    Args:
        model: an ``nn.Module`` mapping ``(N, C, H, W)`` to ``(N, K, H, W)`` (K = 1 logit, or K
            class scores with class 1 = landslide), or a :class:`Predictor`
            (e.g. from :func:`load_predictor`).
        sources: one raster (all its bands) or a list of rasters on one grid whose bands are
            stacked in order (e.g. ``[B4, B3, B2]``), or an open :class:`RasterStack`.
        out_prob: probability GeoTIFF (None: skip). float32 in [0, 1] with nodata NaN, or uint8
            (see ``prob_dtype``).
        out_mask: binary mask GeoTIFF (uint8: 1 landslide, 0 background, 255 nodata), or None.
        normalization: ``{"mean": [...], "std": [...]}`` per band, applied as ``(x - mean) / std``
            to the raw values read as float32; default: ``model.metadata["normalization"]``.
            ``{"mean": None, "std": None}`` feeds raw values.
        threshold: mask threshold (``prob >= threshold``); default the checkpoint's or 0.5.
        tile: window size in pixels (square; clamped to the scene).
        overlap: pixels shared by neighbouring windows; blending weights taper across it.
        margin: zero-weight pixels at each inner window edge (default ``overlap // 4``): make it at
            least the model's receptive-field radius for results identical to one pass.
        batch_size: windows per forward pass.
        tta: average over the four flips (identity, horizontal, vertical, both).
        nodata: override the inputs' nodata value (else file nodata / mask band; NaN always).
        band_indexes: 1-based indices into the stacked input bands to feed the model, in order
            (e.g. ``[4, 3, 2]``); default all bands.
        device: ``"auto"``/None, ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
        amp: autocast (True: bf16 where supported else fp16; or ``"bf16"``/``"fp16"``).
        backend: MSFFNet kernel backend (``auto``/``reference``/``triton``/``cuda``).
        prob_dtype: ``"float32"`` or ``"uint8"`` (``round(p * 250)``, scale 0.004, nodata 255).
        overwrite: replace existing outputs (otherwise an existing output is an error).
        progress: show a tqdm progress bar (stderr).
        model_output: ``"logits"`` or ``"probabilities"``; default from the model's activation.
        tags: extra metadata tags for the output rasters.
        input_scale: override the checkpoint's input scale (an
            :class:`~msff.data.scaling.InputScale` or its text, e.g. ``"percentile:2,98:255"``,
            whose percentiles are then computed on a sample of this scene).
        domain_check: ``"warn"`` (default): sample the scene (``domain_windows`` windows of 64²
            pixels) and warn (:class:`~msff.data.domain.DomainWarning`) when it is unlike the
            training data stored in the checkpoint, and when the predicted landslide fraction is
            far above training; ``"strict"``: raise :class:`~msff.data.domain.DomainError` instead
            (before any output is created); ``"off"``.
        resampling: per input file, how a file on another grid is resampled onto the first file's
            grid (``bilinear`` for continuous values, ``nearest`` for classes; see
            :class:`~msff.inference.sources.RasterStack`).
        dem, terrain: terrain bands (``slope``, ``hillshade``) computed from the DEM on the scene grid
            and appended after the input bands; default: the bands the model card says the model
            was trained with (a different list is an error).

    Returns:
        A :class:`SceneResult`; ``extra`` holds ``domain`` (the check's numbers), ``input_scale``
        and ``fraction_warning``.

    Raises:
        InferenceError: unreadable inputs, band mismatch, files on different grids, outputs that
            exist (without ``overwrite``) or cannot be written. No output file is left behind.

    Example:
        >>> from msff.inference import load_predictor, predict_scene
        >>> p = load_predictor("checkpoints/msffnet")                                # doctest: +SKIP
        >>> r = predict_scene(p, ["B4.tif", "B3.tif", "B2.tif"], "prob.tif", "mask.tif")  # doctest: +SKIP
        >>> r.landslide_pixels, r.megapixels_per_second                                   # doctest: +SKIP
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    pred = _as_predictor(model, normalization, threshold, model_output)
    if out_prob is None and out_mask is None:
        raise InferenceError("nothing to write: give out_prob and/or out_mask")
    check_outputs([out_prob, out_mask], overwrite=overwrite)
    dev = resolve_device(device)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    own_stack = not isinstance(sources, RasterStack)
    terrain = _terrain(pred, terrain) if own_stack else []
    stack = RasterStack(sources, nodata=nodata, bands=band_indexes, resampling=resampling, dem=dem,
                        terrain=terrain) if own_stack else sources
    cache = contextlib.ExitStack()  # GDAL's block cache bounded from the domain sample to the COG
    try:
        cache.enter_context(bounded_gdal_cache(stack.width, stack.count, tile))
        pred.check_bands(stack.count, f"input ({', '.join(p.name for p in stack.paths)})")
        if not stack.georeferenced:
            warnings.warn(
                f"{stack.paths[0]} has no georeferencing (no CRS, identity transform): outputs are "
                "written in pixel coordinates and polygon areas cannot be given in m²",
                NotGeoreferencedInputWarning,
                stacklevel=2,
            )
        pred, extra = _check_domain(pred, stack, input_scale, domain_check, domain_windows)
        if stack.aligned:
            extra["stack"] = {"aligned": stack.aligned}
        if backend is not None and hasattr(pred.model, "set_backend"):
            pred.model.set_backend(backend)
        pred.model.eval().to(dev)
        pred = dataclasses.replace(pred, model=make_engine(pred.model, engine, dev, in_channels=stack.count))
        grid = TileGrid(stack.height, stack.width, tile, overlap, margin)
        all_tags = {
            "msff_model": pred.name,
            "msff_threshold": pred.threshold,
            "msff_tile": grid.tile,
            "msff_overlap": grid.overlap,
            "msff_tta": bool(tta),
            "msff_inputs": ";".join(str(p) for p in stack.paths),
            "msff_prob_encoding": "float32 probability" if prob_dtype == "float32" else "uint8 round(p*250), scale 0.004",
        }
        all_tags.update(tags or {})
        with _cudnn_benchmark(dev), SceneWriter(out_prob, out_mask, stack.profile, prob_dtype, all_tags) as writer:
            stats = _sweep(pred, stack, grid, writer, dev, batch_size, tta, amp, progress, tqdm)
            written = writer.finish()
        frac = stats["positive"] / max(stats["valid"], 1)
        extra["landslide_fraction"] = frac
        if domain_check != "off" and (text := fraction_check(pred.metadata, frac)):
            extra["fraction_warning"] = text
            warnings.warn(text, DomainWarning, stacklevel=2)
    finally:
        if own_stack:
            stack.close()
        cache.close()
    return SceneResult(
        prob=written.get("prob"),
        mask=written.get("mask"),
        width=stack.width,
        height=stack.height,
        valid_pixels=stats["valid"],
        landslide_pixels=stats["positive"],
        tiles=stats["tiles"],
        tiles_skipped=stats["skipped"],
        seconds=time.perf_counter() - t0,
        threshold=pred.threshold,
        georeferenced=stack.georeferenced,
        crs=None if stack.crs is None else stack.crs.to_string(),
        extra=extra,
    )


def order_dates(pred: Predictor, dates: Sequence[tuple[str, Sequence[str]]], reorder: bool = False) -> tuple[list, list]:
    """Stack the band files of several dates in the order the model was trained on.

    Args:
        pred: the predictor (its card's ``stack.dates`` is the trained order, e.g. ``["pre", "post"]``).
        dates: ``[(name, [files])]`` as given.
        reorder: put dates given in another order into the card's order (else that is an error).

    Returns:
        ``(files, names)``: the files to stack, in order, and the date names in that order.

    Raises:
        InferenceError: names that differ from the card's, or another order without ``reorder``.

    Example:
        >>> order_dates(p, [("pre", ["a.tif"]), ("post", ["b.tif"])])   # doctest: +SKIP
        (['a.tif', 'b.tif'], ['pre', 'post'])
    """
    given = [n for n, _ in dates]
    trained = list((pred.metadata.get("stack") or {}).get("dates") or [])
    if trained:
        if sorted(given) != sorted(trained):
            raise InferenceError(
                f"model {pred.name!r} was trained on the dates {', '.join(trained)} (in that order); "
                f"got {', '.join(given)}: give one --date group for each of {', '.join(trained)}"
            )
        if given != trained:
            if not reorder:
                raise InferenceError(
                    f"model {pred.name!r} was trained on dates in the order {', '.join(trained)}, but they were "
                    f"given as {', '.join(given)}; swapped dates invert the change the model looks for. Give them "
                    "in the trained order, or pass --reorder-dates to let msff reorder them"
                )
            by = dict(dates)
            dates = [(n, by[n]) for n in trained]
    return [f for _, fs in dates for f in fs], [n for n, _ in dates]


def _terrain(pred: Predictor, terrain) -> list:
    """The terrain bands to build: the model card's, unless given (then they must agree)."""
    from msff.data.terrain import check_terrain

    card = pred.metadata.get("stack")
    trained = list((card or {}).get("terrain") or [])
    if terrain is None:
        return trained
    try:
        terrain = check_terrain(terrain)
    except ValueError as e:
        raise InferenceError(str(e)) from None
    if card is not None and terrain != trained:
        raise InferenceError(
            f"model {pred.name!r} was trained with terrain bands [{', '.join(trained) or 'none'}] after the "
            f"image bands, not [{', '.join(terrain) or 'none'}]; give --terrain {','.join(trained) or '(nothing)'}"
        )
    return terrain


def _check_domain(pred: Predictor, stack: RasterStack, input_scale, mode: str, windows: int):
    """Fit an unfitted input scale on a sample of the scene, then compare the sample with the
    training statistics of the model card. Returns the predictor to use and the report dict."""
    if mode not in ("warn", "strict", "off"):
        raise ValueError(f"domain_check must be 'warn', 'strict' or 'off', got {mode!r}")
    try:
        scale = pred.input_scale if input_scale is None else InputScale.parse(input_scale)
        samples = stack.sample(max_windows=windows) if (mode != "off" or scale.needs_fit) else None
        if scale.needs_fit:
            if samples.shape[1] == 0:
                raise InferenceError(f"{stack.paths[0]}: no valid pixel to fit the percentile stretch on")
            scale = scale.fit(samples, "scene")
        scale.check_bands(stack.count, f"input ({', '.join(p.name for p in stack.paths)})")
    except ScaleError as e:
        raise InferenceError(str(e)) from None
    if scale is not pred.input_scale:
        pred = dataclasses.replace(pred, input_scale=scale)
    extra: dict = {"input_scale": scale.to_dict()}
    if mode == "off":
        return pred, extra
    card = dict(pred.metadata)
    if pred.mean is not None:
        card["normalization"] = {"mean": pred.mean.tolist(), "std": pred.std.tolist()}
    card.setdefault("model_name", pred.name)
    report = compare_domain(card, samples, stack.dtypes, scale, stack.descriptions,
                            " + ".join(p.name for p in stack.paths))
    extra["domain"] = report.to_dict()
    if not report.ok:
        if mode == "strict":
            raise DomainError(report.message(strict_hint=False) + " (refused under --strict; nothing was written)")
        warnings.warn(report.message(), DomainWarning, stacklevel=3)
    return pred, extra


def _read_windows(stack: RasterStack, grid: TileGrid, pred: Predictor):
    """Yield ``(row_index, y, x, x_normalised_or_None, valid)`` per window, then
    ``(row_index, y, None, None, None)`` at the end of each row of windows."""
    from rasterio.windows import Window

    for ri, y in enumerate(grid.rows):
        for x in grid.cols:
            xin, v = stack.read(Window(x, y, grid.tile_w, grid.tile_h))
            yield ri, y, x, (_prepare(pred, xin[None], v[None])[0] if v.any() else None), v
        yield ri, y, None, None, None


def _prefetch(gen, depth: int):
    """Run generator ``gen`` in a background thread, ``depth`` items ahead (reads overlap the
    model; only that thread touches the datasets). Exceptions are re-raised here."""
    stop = threading.Event()
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in gen:
                if not put(("item", item)):
                    return
            put(("end", done))
        except BaseException as e:  # handed to the consumer
            put(("error", e))

    t = threading.Thread(target=work, name="msff-read", daemon=True)
    t.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "item":
                yield item
            elif kind == "error":
                raise item
            else:
                return
    finally:
        stop.set()
        t.join()


def _sweep(pred, stack, grid, writer, dev, batch_size, tta, amp, progress, tqdm) -> dict:
    th, tw, W, H = grid.tile_h, grid.tile_w, grid.width, grid.height
    buf_h = th + STRIP_ROWS
    acc = np.zeros((buf_h, W), np.float32)
    wsum = np.zeros((buf_h, W), np.float32)
    valid = np.zeros((buf_h, W), bool)
    b0 = 0  # scene row held in buffer row 0
    stats = dict(valid=0, positive=0, tiles=0, skipped=0)
    bar = tqdm(total=len(grid), unit="tile", desc="predict", disable=not progress, leave=False)

    def run(pending: list, b0: int) -> None:
        probs = _run_batch(pred, np.stack([t[2] for t in pending]), dev, amp, tta)
        for (yy, xx, _), p in zip(pending, probs, strict=True):
            wt = grid.weights(yy, xx)
            r = yy - b0
            acc[r : r + th, xx : xx + tw] += p * wt
            wsum[r : r + th, xx : xx + tw] += wt
        stats["tiles"] += len(pending)
        bar.update(len(pending))

    pending = []
    try:
        for ri, y, x, xin, v in _prefetch(_read_windows(stack, grid, pred), 2 * batch_size):
            if x is not None:
                valid[y - b0 : y - b0 + th, x : x + tw] = v
                if xin is None:  # no valid pixel: nothing to predict, the window stays nodata
                    stats["skipped"] += 1
                    bar.update(1)
                    continue
                pending.append((y, x, xin))
                if len(pending) == batch_size:
                    run(pending, b0)
                    pending = []
                continue
            # end of a row of windows
            if pending:
                run(pending, b0)
                pending = []
            # Rows above the next window row are final; flush them (strip-aligned) and roll.
            last = ri == len(grid.rows) - 1
            end = H if last else (grid.rows[ri + 1] // STRIP_ROWS) * STRIP_ROWS
            if end > b0:
                n = end - b0
                v = valid[:n]
                ws = wsum[:n]
                if np.any(v & (ws <= 0)):
                    raise RuntimeError("internal error: a valid pixel received no blending weight")
                with np.errstate(invalid="ignore", divide="ignore"):
                    prob = np.where(v, acc[:n] / ws, np.float32(0.0)).astype(np.float32, copy=False)
                writer.write_rows(b0, prob, v, pred.threshold)
                stats["valid"] += int(v.sum())
                stats["positive"] += int(((prob >= pred.threshold) & v).sum())
                keep = buf_h - n
                for a in (acc, wsum, valid):
                    a[:keep] = a[n:].copy()
                    a[keep:] = 0
                b0 = end
    finally:
        bar.close()
    return stats
