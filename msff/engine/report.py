"""Run artefacts: CSV log, training-curve PNG, overlay PNGs, atomic file writes."""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from msff.fileio import atomic_write_bytes as _atomic_write_bytes

__all__ = ["atomic_write_bytes", "atomic_write_json", "write_csv", "plot_curves", "save_overlay", "display_rgb"]


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder + ``os.replace``
    (:func:`msff.fileio.atomic_write_bytes`: the umask's file mode; a full disk is one
    :class:`~msff.fileio.DiskFullError` naming ``path``, with nothing left behind)."""
    _atomic_write_bytes(path, data)


def _clean(o):
    if isinstance(o, float) and (math.isnan(o) or math.isinf(o)):
        return None
    if isinstance(o, dict):
        return {k: _clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_clean(v) for v in o]
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return o


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Atomically write ``obj`` as indented JSON (NaN/inf written as null)."""
    atomic_write_bytes(path, (json.dumps(_clean(obj), indent=2, sort_keys=False) + "\n").encode())


def write_csv(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Atomically write ``rows`` (dicts with the same keys as the first) as CSV."""
    if not rows:
        return
    buf = io.StringIO()
    keys = list(rows[0].keys())
    for r in rows[1:]:
        keys += [k for k in r if k not in keys]
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_bytes(path, buf.getvalue().encode())


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: Sequence[dict], path: str | os.PathLike) -> None:
    """Training curve PNG: train/val loss (left), validation IoU and F1 (right) per epoch."""
    plt = _plt()
    ep = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(ep, [h["train_loss"] for h in history], label="train loss")
    if "val_loss" in history[0]:
        a.plot(ep, [h["val_loss"] for h in history], label="val loss")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    a.grid(alpha=0.3)
    for k in ("val_iou", "val_f1", "val_precision", "val_recall"):
        if k in history[0]:
            b.plot(ep, [h[k] for h in history], label=k[4:])
    b.set_xlabel("epoch")
    b.set_ylim(0, 1)
    b.set_title("validation (micro)")
    b.legend()
    b.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def display_rgb(image: np.ndarray) -> np.ndarray:
    """(C, H, W) raw image → (H, W, 3) float in [0, 1]: the first three bands (or one band as grey),
    stretched between the 2nd and 98th percentile of each band."""
    x = image[:3].astype(np.float32)
    if x.shape[0] < 3:
        x = np.repeat(x[:1], 3, axis=0)
    out = np.empty_like(x)
    for i in range(3):
        lo, hi = np.percentile(x[i], (2, 98))
        out[i] = np.clip((x[i] - lo) / max(hi - lo, 1e-6), 0, 1)
    return out.transpose(1, 2, 0)


def save_overlay(image: np.ndarray, target: np.ndarray, pred: np.ndarray, path: str | os.PathLike, title: str = "") -> None:
    """Overlay PNG: image | ground truth | prediction (TP yellow, FP red, FN blue over the image).

    Args:
        image: (C, H, W) raw image.
        target: (H, W) 0/1/255 target.
        pred: (H, W) bool prediction.
    """
    plt = _plt()
    rgb = display_rgb(image)
    t = target == 1
    p = pred.astype(bool)
    gt = rgb.copy()
    gt[t] = 0.5 * gt[t] + 0.5 * np.array([1.0, 1.0, 0.0])
    pr = rgb.copy()
    for m, col in ((p & t, (1.0, 1.0, 0.0)), (p & ~t & (target != 255), (1.0, 0.0, 0.0)), (~p & t, (0.0, 0.4, 1.0))):
        pr[m] = 0.4 * pr[m] + 0.6 * np.array(col)
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.8))
    for ax, im, name in zip(axes, (rgb, gt, pr), ("image", "ground truth", "prediction (TP yellow, FP red, FN blue)"), strict=True):
        ax.imshow(im)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
