"""``torchrun`` for ``msff predict``: one process per GPU (or per CPU share), scenes dealt to ranks.

``torchrun --nproc_per_node=N [--nnodes=M ...] -m msff.cli predict CKPT 'scenes/*.tif' --out OUT/``

torchrun sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``; :func:`init` joins the process group
(NCCL on GPUs, gloo on CPUs), pins rank ``r`` to ``cuda:LOCAL_RANK`` when the device is CUDA, and
hands back what :func:`msff.inference.batch.run_scenes` needs: scene ``i`` is predicted by rank
``i mod WORLD_SIZE`` (each output written atomically by that rank alone), the records are gathered
with ``all_gather_object`` and rank 0 writes the summary. Every rank returns the same exit status.
The output folder must be one filesystem seen by all ranks (for several nodes: a shared one).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

__all__ = ["DistContext", "init", "world_from_env"]


@dataclass
class DistContext:
    """``rank``/``world`` of this process; ``device`` (None: the caller resolves it); ``gather``
    (None in a single process) collects a list from every rank on every rank."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: Optional[torch.device] = None
    gather: Optional[Callable[[list], list]] = None


def world_from_env() -> tuple[int, int, int]:
    """``(WORLD_SIZE, RANK, LOCAL_RANK)`` as torchrun sets them (1, 0, 0 otherwise)."""
    try:
        return (int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)),
                int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError:
        raise ValueError("WORLD_SIZE / RANK / LOCAL_RANK must be integers (as torchrun sets them)") from None


def init(device_arg: Optional[str] = "auto") -> DistContext:
    """Join torchrun's process group if there is one; otherwise a single-process context.

    Args:
        device_arg: the ``--device`` option: ``auto``/``cuda`` put rank r on ``cuda:LOCAL_RANK``
            where CUDA is available; ``cpu`` keeps every rank on the CPU (gloo).
    """
    world, rank, local = world_from_env()
    if world <= 1:
        return DistContext()
    import torch.distributed as dist

    want_cuda = str(device_arg or "auto") in ("auto", "cuda") and torch.cuda.is_available()
    device = torch.device("cuda", local) if want_cuda else None
    if device is not None:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
    group = dist.new_group(backend="gloo")  # python objects travel over gloo whatever the device

    def gather(items: list) -> list:
        parts: list = [None] * world
        dist.all_gather_object(parts, items, group=group)
        return [x for p in parts for x in (p or [])]

    return DistContext(rank=rank, world=world, local_rank=local, device=device, gather=gather)


def row_shares(rows: list[int], tile_h: int, height: int, world: int) -> list[tuple[int, int, list[int]]]:
    """Split a scene's output rows between ``world`` ranks along the window rows.

    Args:
        rows: window start rows (``TileGrid.rows``); tile_h: window height; height: scene rows.

    Returns:
        Per rank ``(first_row, end_row, window_rows)``: the output rows it owns (contiguous, in
        order, together covering ``[0, height)``; empty for surplus ranks) and every window start
        whose window touches them (the window row that straddles a boundary is computed by both
        neighbours, so each rank's blend is complete without exchanging partial sums).

    Example:
        >>> row_shares([0, 448, 896, 1088], 512, 1600, 2)
        [(0, 896, [0, 448]), (896, 1600, [448, 896, 1088])]
    """
    n = len(rows)
    cuts = [round(k * n / world) for k in range(world + 1)]
    out = []
    for k in range(world):
        a, b = cuts[k], cuts[k + 1]
        if a == b:
            out.append((height, height, []))
            continue
        first = 0 if a == 0 else rows[a]
        end = height if b == n else rows[b]
        out.append((first, end, [y for y in rows if y < end and y + tile_h > first]))
    return out


def predict_scene_sharded(pred, sources, out_prob, out_mask=None, *, ctx: DistContext, tile: int = 512,
                          overlap: int = 128, margin=None, batch_size: int = 4, tta: bool = False, nodata=None,
                          band_indexes=None, device=None, amp=False, backend=None, prob_dtype: str = "float32",
                          overwrite: bool = False, progress: bool = True, model_output=None, tags=None,
                          input_scale=None, domain_check: str = "warn", domain_windows: int = 256,
                          engine="auto", normalization=None, threshold=None, **more):
    """:func:`~msff.inference.predict.predict_scene` for one large scene split across torchrun ranks.

    Every rank predicts the windows of its row block (:func:`row_shares`) and writes its rows to a
    hidden part file beside the target; after a barrier rank 0 merges the parts into the COGs
    (written to a temporary file and renamed: each output by exactly one rank) and removes them.
    The per-pixel blend is summed in the same window order as one process, so results equal the
    single-process run up to the model's own float summation order (thread count).
    All ranks return the same :class:`~msff.inference.predict.SceneResult`. Memory per rank is one
    window height by the scene width (a rolling buffer, as in ``predict_scene``); each rank's part
    file holds its ``rows x width`` float32 on disk.
    """
    import time

    import numpy as np
    import torch.distributed as dist
    from rasterio.windows import Window

    from msff.inference.engine import make_engine
    from msff.inference.predict import (
        SceneResult,
        _as_predictor,
        _check_domain,
        _prepare,
        _run_batch,
        bounded_gdal_cache,
        resolve_device,
    )
    from msff.inference.sources import InferenceError, RasterStack
    from msff.inference.tiling import TileGrid
    from msff.inference.writers import SceneWriter, check_outputs, temp_path

    unsupported = sorted(k for k, v in more.items() if v not in (None, False))
    if unsupported:
        raise ValueError(f"option(s) {', '.join(unsupported)} not supported when one scene is split across ranks")
    t0 = time.perf_counter()
    pred = _as_predictor(pred, normalization, threshold, model_output)
    if out_prob is None and out_mask is None:
        raise InferenceError("nothing to write: give out_prob and/or out_mask")
    if ctx.rank == 0:
        check_outputs([out_prob, out_mask], overwrite=overwrite)
    dev = ctx.device or resolve_device(device)
    target = out_prob if out_prob is not None else out_mask
    with RasterStack(sources, nodata=nodata, bands=band_indexes) as stack, \
            bounded_gdal_cache(stack.width, stack.count, tile):
        pred.check_bands(stack.count, f"input ({', '.join(p.name for p in stack.paths)})")
        pred, extra = _check_domain(pred, stack, input_scale, domain_check if ctx.rank == 0 else "off", domain_windows)
        if backend is not None and hasattr(pred.model, "set_backend"):
            pred.model.set_backend(backend)
        pred.model.eval().to(dev)
        import dataclasses

        pred = dataclasses.replace(pred, model=make_engine(pred.model, engine, dev, in_channels=stack.count))
        grid = TileGrid(stack.height, stack.width, tile, overlap, margin)
        first, end, wrows = row_shares(grid.rows, grid.tile_h, grid.height, ctx.world)[ctx.rank]
        th, tw, W = grid.tile_h, grid.tile_w, grid.width
        # Rolling buffer of one window height (as in predict_scene): after each window row the rows
        # above the next one are final and go to this rank's part (a memory-mapped .npy on disk).
        acc = np.zeros((th, W), np.float32)
        wsum = np.zeros((th, W), np.float32)
        valid = np.zeros((th, W), bool)
        part = temp_path(target, f".rank{ctx.rank}.part.npy") if end > first else None
        out = None if part is None else np.lib.format.open_memmap(part, mode="w+", dtype=np.float32, shape=(end - first, W))
        tiles = skipped = 0
        b0 = wrows[0] if wrows else first
        for j, y in enumerate(wrows):
            pending = []
            for x in grid.cols:
                xin, v = stack.read(Window(x, y, tw, th))
                valid[y - b0 : y - b0 + th, x : x + tw] |= v
                if not v.any():
                    skipped += 1
                    continue
                pending.append((x, _prepare(pred, xin[None], v[None])[0]))
            for i in range(0, len(pending), batch_size):
                chunk = pending[i : i + batch_size]
                probs = _run_batch(pred, np.stack([c[1] for c in chunk]), dev, amp, tta)
                for (x, _), p in zip(chunk, probs, strict=True):
                    wt = grid.weights(y, x)
                    acc[y - b0 : y - b0 + th, x : x + tw] += p * wt
                    wsum[y - b0 : y - b0 + th, x : x + tw] += wt
                tiles += len(chunk)
            nxt = wrows[j + 1] if j + 1 < len(wrows) else y + th
            lo, hi = max(b0, first), min(nxt, end)
            if out is not None and hi > lo:
                v = valid[lo - b0 : hi - b0]
                with np.errstate(invalid="ignore", divide="ignore"):
                    out[lo - first : hi - first] = np.where(v, acc[lo - b0 : hi - b0] / wsum[lo - b0 : hi - b0],
                                                            np.float32(np.nan))
            n = nxt - b0
            keep = th - n
            for a in (acc, wsum, valid):
                if keep > 0:
                    a[:keep] = a[n:].copy()
                a[max(keep, 0):] = 0
            b0 = nxt
        if out is not None:
            out.flush()
            del out
        del acc, wsum, valid
        parts = ctx.gather([(first, end, None if part is None else str(part), tiles, skipped)])
        stats = dict(valid=0, positive=0)
        written = {}
        try:
            if ctx.rank == 0:
                all_tags = {"msff_model": pred.name, "msff_threshold": pred.threshold, "msff_tile": grid.tile,
                            "msff_overlap": grid.overlap, "msff_tta": bool(tta),
                            "msff_inputs": ";".join(str(p) for p in stack.paths), "msff_ranks": ctx.world}
                all_tags.update(tags or {})
                with SceneWriter(out_prob, out_mask, stack.profile, prob_dtype, all_tags) as writer:
                    for f, e, path, _, _ in sorted(parts):
                        if path is None:
                            continue
                        block = np.load(path, mmap_mode="r")
                        for r0 in range(0, e - f, 256):
                            p = np.asarray(block[r0 : r0 + 256])
                            v = ~np.isnan(p)
                            writer.write_rows(f + r0, np.where(v, p, np.float32(0)), v, pred.threshold)
                            stats["valid"] += int(v.sum())
                            stats["positive"] += int(((p >= pred.threshold) & v).sum())
                    written = {k: str(v) for k, v in writer.finish().items()}
            shared = ctx.gather([(stats, written)]) if ctx.world > 1 else [(stats, written)]
            stats, written = shared[0]
        finally:
            dist.barrier()
            if part is not None and part.exists():
                part.unlink()
    from pathlib import Path

    return SceneResult(
        prob=Path(written["prob"]) if "prob" in written else None,
        mask=Path(written["mask"]) if "mask" in written else None,
        width=grid.width, height=grid.height, valid_pixels=stats["valid"], landslide_pixels=stats["positive"],
        tiles=sum(p[3] for p in parts), tiles_skipped=sum(p[4] for p in parts), seconds=time.perf_counter() - t0,
        threshold=pred.threshold, georeferenced=stack.georeferenced,
        crs=None if stack.crs is None else stack.crs.to_string(), extra=dict(extra, ranks=ctx.world),
    )
