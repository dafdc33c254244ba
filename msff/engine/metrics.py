"""Binary segmentation metrics on landslide pixels: precision, recall, IoU, F1.

*Micro* metrics come from TP/FP/FN accumulated over the whole dataset (the paper's numbers);
*per-image* metrics are computed per image and averaged over the images where they are defined
(an image with no landslide pixels and no predicted ones has no IoU and is left out of that mean).
F1 = 2PR/(P+R) (the paper's Eq. 9 prints it wrongly). Pixels whose target is 255 are ignored.
A metric whose denominator is zero over the whole dataset is reported as 0.0.
"""
from __future__ import annotations

from typing import Optional

import torch

from msff.data.io import IGNORE_INDEX

__all__ = ["BinaryMetrics", "confusion_counts", "metrics_from_counts"]

_NAMES = ("precision", "recall", "iou", "f1")


def confusion_counts(pred: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Per-image TP, FP, FN, TN.

    Args:
        pred: (N, H, W) bool or 0/1 prediction.
        target: (N, H, W) 0/1 target, ``ignore_index`` excluded.

    Returns:
        (N, 4) int64 tensor of TP, FP, FN, TN.
    """
    valid = target != ignore_index
    p = pred.bool() & valid
    t = (target == 1) & valid
    dims = tuple(range(1, p.dim()))
    tp = (p & t).sum(dims)
    fp = (p & ~t).sum(dims)
    fn = (~p & t & valid).sum(dims)
    tn = (~p & ~t & valid).sum(dims)
    return torch.stack([tp, fp, fn, tn], dim=1).long()


def _ratios(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> dict[str, torch.Tensor]:
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    prec = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), nan)
    rec = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), nan)
    iou = torch.where(tp + fp + fn > 0, tp / (tp + fp + fn).clamp_min(1), nan)
    f1 = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1), nan)
    return {"precision": prec, "recall": rec, "iou": iou, "f1": f1}


def metrics_from_counts(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision, recall, IoU and F1 (= 2PR/(P+R) = 2TP/(2TP+FP+FN)) from counts; 0.0 when undefined.

    Example:
        >>> metrics_from_counts(6, 2, 2)["iou"]
        0.6
    """
    r = _ratios(torch.tensor(tp), torch.tensor(fp), torch.tensor(fn))
    return {k: (0.0 if torch.isnan(v) else float(v)) for k, v in r.items()}


class BinaryMetrics:
    """Accumulates confusion counts over batches (and DDP ranks) and reports the metrics.

    Example:
        >>> import torch
        >>> m = BinaryMetrics()
        >>> m.update(torch.tensor([[[2.0, -1.0]]]), torch.tensor([[[1, 1]]], dtype=torch.uint8))
        >>> r = m.compute(); r["iou"], r["recall"], r["precision"]
        (0.5, 0.5, 1.0)
    """

    def __init__(self, threshold: float = 0.5, ignore_index: int = IGNORE_INDEX):
        self.threshold = float(threshold)
        self.ignore_index = ignore_index
        self.reset()

    def reset(self) -> None:
        self.counts = torch.zeros(4, dtype=torch.int64)  # TP FP FN TN
        # Per-image sums and counts of defined values, in _NAMES order.
        self.img_sum = torch.zeros(4, dtype=torch.float64)
        self.img_n = torch.zeros(4, dtype=torch.float64)
        self.images = 0

    @torch.no_grad()
    def update(self, logits: torch.Tensor, target: torch.Tensor, probs: bool = False) -> torch.Tensor:
        """Add a batch.

        Args:
            logits: (N, 1, H, W) or (N, H, W) logits (or probabilities with ``probs=True``).
            target: (N, H, W) uint8, 1 landslide, 0 background, ``ignore_index`` ignored.

        Returns:
            (N, 4) per-image TP, FP, FN, TN of the batch.
        """
        if logits.dim() == 4:
            logits = logits[:, 0]
        score = logits.float() if probs else torch.sigmoid(logits.float())
        pred = score >= self.threshold
        c = confusion_counts(pred, target.to(pred.device), self.ignore_index).cpu()
        self.counts += c.sum(0)
        r = _ratios(c[:, 0], c[:, 1], c[:, 2])
        for j, k in enumerate(_NAMES):
            v = r[k]
            ok = ~torch.isnan(v)
            self.img_sum[j] += v[ok].sum()
            self.img_n[j] += ok.sum()
        self.images += c.shape[0]
        return c

    def all_reduce(self) -> None:
        """Sum the accumulators over DDP ranks (no-op without an initialised process group)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        buf = torch.cat([self.counts.double(), self.img_sum, self.img_n, torch.tensor([float(self.images)], dtype=torch.float64)])
        dist.all_reduce(buf)
        self.counts = buf[:4].round().long()
        self.img_sum, self.img_n = buf[4:8].clone(), buf[8:12].clone()
        self.images = int(round(float(buf[12])))

    def compute(self, prefix: Optional[str] = None) -> dict[str, float]:
        """Metrics so far.

        Returns:
            ``precision``, ``recall``, ``iou``, ``f1`` (micro), ``image_precision``, …,
            ``image_f1`` (per-image means; NaN when defined for no image), ``tp``, ``fp``,
            ``fn``, ``tn``, ``images``.
        """
        tp, fp, fn, tn = (int(v) for v in self.counts)
        out: dict[str, float] = dict(metrics_from_counts(tp, fp, fn))
        for j, k in enumerate(_NAMES):
            n = float(self.img_n[j])
            out[f"image_{k}"] = float(self.img_sum[j] / n) if n > 0 else float("nan")
        out.update(tp=tp, fp=fp, fn=fn, tn=tn, images=self.images)
        if prefix:
            out = {f"{prefix}{k}": v for k, v in out.items()}
        return out
