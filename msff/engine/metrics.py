"""Binary segmentation metrics on landslide pixels: region (precision, recall, IoU, F1), boundary
(Boundary IoU, boundary F-score) and, when a soil-like proxy mask is given, the false-positive rate
on confusable background.

*Micro* metrics come from counts accumulated over the whole dataset (the paper's numbers);
*per-image* metrics are computed per image and averaged over the images where they are defined
(an image with no landslide pixels and no predicted ones has no IoU and is left out of that mean).
F1 = 2PR/(P+R) (the paper's Eq. 9 prints it wrongly). Pixels whose target is 255 are ignored.
A metric whose denominator is zero over the whole dataset is reported as 0.0.

Boundary metrics (nodata, i.e. target 255, and batch padding are *unknown*: they are neither
landslide nor background, never a boundary pixel and never make one):

- **Boundary IoU** (Cheng et al., CVPR 2021): the inner band of a mask M of width d is the set of
  pixels of M with a known non-M pixel within Chebyshev distance d (what M minus its d-fold 3×3
  erosion is in the paper's code); Boundary IoU = |band(G) ∩ band(P)| / |band(G) ∪ band(P)|.
  d = max(1, round(``dilation_ratio`` × image diagonal)), ``dilation_ratio`` 0.02 as in the paper;
  the diagonal is that of the image's labelled extent (rows/columns up to the last one holding a
  labelled pixel), so padding added to batch an image does not change it. One deliberate
  difference from the paper's code: the image border is not a contour (a landslide cut by the tile
  edge has no boundary there), which also makes results independent of padding and batch size.
- **Boundary F-score** (BSDS / DAVIS contour measure): the contour of M is the set of pixels of M
  with a known non-M 4-neighbour; boundary precision = fraction of predicted contour pixels within
  Euclidean distance ``tolerance_px`` (default 2) of a ground-truth contour pixel, boundary recall
  the converse, F = 2PR/(P+R). Micro: matched and total contour pixels summed over the dataset.
  Matching is by distance (dilation), as DAVIS does, not BSDS's one-to-one assignment.

Confusable false positives (the paper's claim that large kernels confuse fewer landslide-like
objects): :meth:`BinaryMetrics.update` takes an optional ``soil`` mask (see
:func:`msff.analysis.confusable.soil_like_mask`) and reports ``soil_fp_rate``, the fraction of
soil-like ground-truth background predicted as landslide, beside ``background_fp_rate`` = FP/(FP+TN).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from msff.data.io import IGNORE_INDEX

__all__ = [
    "BinaryMetrics",
    "confusion_counts",
    "metrics_from_counts",
    "boundary_band",
    "mask_contour",
    "boundary_counts",
    "boundary_dilation",
    "micro_metrics",
    "BOUNDARY_DILATION_RATIO",
    "BOUNDARY_TOLERANCE_PX",
]

_NAMES = ("precision", "recall", "iou", "f1")
_IMAGE_NAMES = _NAMES + ("boundary_iou", "boundary_f")
BOUNDARY_DILATION_RATIO = 0.02
BOUNDARY_TOLERANCE_PX = 2
# Accumulated counts, in this order.
_COUNT_NAMES = ("tp", "fp", "fn", "tn", "biou_inter", "biou_union", "bf_pred_matched", "bf_pred", "bf_gt_matched",
                "bf_gt", "soil_fp", "soil_bg", "soil_landslide", "landslide")


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


# ---- boundary helpers ---------------------------------------------------------------------------
def _square_dilate(x: torch.Tensor, d: int) -> torch.Tensor:
    """(N, H, W) bool → pixels within Chebyshev distance ``d`` of a True pixel (outside = False)."""
    f = x[:, None].float()
    k = 2 * d + 1
    # A square max filter is separable; max_pool2d pads with -inf, so outside never counts.
    f = F.max_pool2d(f, (k, 1), stride=1, padding=(d, 0))
    f = F.max_pool2d(f, (1, k), stride=1, padding=(0, d))
    return f[:, 0] > 0


def _disk_dilate(x: torch.Tensor, r: int) -> torch.Tensor:
    """(N, H, W) bool → pixels within Euclidean distance ``r`` of a True pixel."""
    if r <= 0:
        return x.clone()
    yy, xx = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    disk = ((yy * yy + xx * xx) <= r * r).float()[None, None].to(x.device)
    return F.conv2d(x[:, None].float(), disk, padding=r)[:, 0] > 0.5


def boundary_band(mask: torch.Tensor, known: torch.Tensor, d: int) -> torch.Tensor:
    """Inner boundary band of width ``d`` (Cheng et al. 2021): pixels of ``mask`` with a known
    non-mask pixel within Chebyshev distance ``d``.

    Args:
        mask: (N, H, W) bool.
        known: (N, H, W) bool, False where the truth is unknown (nodata, padding, outside).
        d: band width in pixels (≥ 1).

    Returns:
        (N, H, W) bool.

    Example:
        >>> m = torch.zeros(1, 7, 7, dtype=torch.bool); m[0, 1:6, 1:6] = True
        >>> int(boundary_band(m, torch.ones_like(m), 1).sum())   # 5×5 square minus its 3×3 core
        16
    """
    mask = mask.bool() & known
    return mask & _square_dilate(known & ~mask, int(d))


def mask_contour(mask: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Contour of ``mask``: its pixels with a known non-mask 4-neighbour. (N, H, W) bool → same."""
    mask = mask.bool() & known
    bg = F.pad((known & ~mask).float(), (1, 1, 1, 1)) > 0
    nb = bg[:, :-2, 1:-1] | bg[:, 2:, 1:-1] | bg[:, 1:-1, :-2] | bg[:, 1:-1, 2:]
    return mask & nb


def boundary_dilation(height: int, width: int, ratio: float = BOUNDARY_DILATION_RATIO) -> int:
    """Band width d = max(1, round(ratio × diagonal)) of Boundary IoU (Cheng et al. 2021).

    Example:
        >>> boundary_dilation(512, 512)
        14
    """
    return max(1, int(round(ratio * math.hypot(height, width))))


def _labelled_extent(known: torch.Tensor) -> list[tuple[int, int]]:
    out = []
    for k in known:
        rows = torch.nonzero(k.any(1)).flatten()
        cols = torch.nonzero(k.any(0)).flatten()
        out.append((int(rows[-1]) + 1 if rows.numel() else k.shape[0], int(cols[-1]) + 1 if cols.numel() else k.shape[1]))
    return out


def boundary_counts(
    pred: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    dilation_ratio: float = BOUNDARY_DILATION_RATIO,
    tolerance_px: int = BOUNDARY_TOLERANCE_PX,
) -> torch.Tensor:
    """Per-image boundary counts.

    Args:
        pred: (N, H, W) bool prediction.
        target: (N, H, W) 0/1 target, ``ignore_index`` unknown.
        dilation_ratio: Boundary IoU band width as a fraction of the image diagonal.
        tolerance_px: boundary F-score matching distance in pixels.

    Returns:
        (N, 6) int64: Boundary IoU intersection and union, predicted contour pixels within
        tolerance of the true contour, predicted contour pixels, true contour pixels within
        tolerance of the predicted contour, true contour pixels.
    """
    known = target != ignore_index
    p = pred.bool() & known
    g = (target == 1) & known
    n = p.shape[0]
    out = torch.zeros(n, 6, dtype=torch.int64)
    if n == 0:
        return out
    ds = torch.tensor([boundary_dilation(h, w, dilation_ratio) for h, w in _labelled_extent(known)])
    for d in ds.unique().tolist():
        sel = torch.nonzero(ds == d).flatten().to(p.device)
        bp = boundary_band(p[sel], known[sel], d)
        bg = boundary_band(g[sel], known[sel], d)
        out[sel.cpu(), 0] = (bp & bg).sum((1, 2)).cpu()
        out[sel.cpu(), 1] = (bp | bg).sum((1, 2)).cpu()
    cp, cg = mask_contour(p, known), mask_contour(g, known)
    out[:, 2] = (cp & _disk_dilate(cg, tolerance_px)).sum((1, 2)).cpu()
    out[:, 3] = cp.sum((1, 2)).cpu()
    out[:, 4] = (cg & _disk_dilate(cp, tolerance_px)).sum((1, 2)).cpu()
    out[:, 5] = cg.sum((1, 2)).cpu()
    return out


def _ratios(tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> dict[str, torch.Tensor]:
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    prec = torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), nan)
    rec = torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), nan)
    iou = torch.where(tp + fp + fn > 0, tp / (tp + fp + fn).clamp_min(1), nan)
    f1 = torch.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn).clamp_min(1), nan)
    return {"precision": prec, "recall": rec, "iou": iou, "f1": f1}


def _boundary_ratios(b: torch.Tensor) -> dict[str, torch.Tensor]:
    """(N, 6) boundary counts → Boundary IoU, boundary precision/recall/F (NaN where undefined)."""
    b = b.double()
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    biou = torch.where(b[:, 1] > 0, b[:, 0] / b[:, 1].clamp_min(1), nan)
    bp = torch.where(b[:, 3] > 0, b[:, 2] / b[:, 3].clamp_min(1), nan)
    br = torch.where(b[:, 5] > 0, b[:, 4] / b[:, 5].clamp_min(1), nan)
    # F is defined when either contour exists; a missing contour scores 0 on its side.
    p0, r0 = torch.nan_to_num(bp, nan=0.0), torch.nan_to_num(br, nan=0.0)
    bf = torch.where(p0 + r0 > 0, 2 * p0 * r0 / (p0 + r0).clamp_min(1e-300), torch.zeros_like(p0))
    bf = torch.where((b[:, 3] + b[:, 5]) > 0, bf, nan)
    return {"boundary_iou": biou, "boundary_precision": bp, "boundary_recall": br, "boundary_f": bf}


def metrics_from_counts(tp: int, fp: int, fn: int) -> dict[str, float]:
    """Precision, recall, IoU and F1 (= 2PR/(P+R) = 2TP/(2TP+FP+FN)) from counts; 0.0 when undefined.

    Example:
        >>> metrics_from_counts(6, 2, 2)["iou"]
        0.6
    """
    r = _ratios(torch.tensor(tp), torch.tensor(fp), torch.tensor(fn))
    return {k: (0.0 if torch.isnan(v) else float(v)) for k, v in r.items()}


_BOUNDARY_COUNTS = _COUNT_NAMES[4:10]
_SOIL_COUNTS = _COUNT_NAMES[10:]


def micro_metrics(counts: dict) -> dict[str, float]:
    """Micro metrics from counts summed over images (or datasets): what :meth:`BinaryMetrics.compute`
    reports, so results of several evaluations combine exactly.

    Args:
        counts: ``tp``, ``fp``, ``fn``, ``tn``; optionally the boundary counts ``biou_inter``,
            ``biou_union``, ``bf_pred_matched``, ``bf_pred``, ``bf_gt_matched``, ``bf_gt`` and the
            soil counts ``soil_fp``, ``soil_bg``, ``soil_landslide``, ``landslide``.

    Returns:
        ``precision``, ``recall``, ``iou``, ``f1``, ``background_fp_rate``; ``boundary_*`` and
        ``soil_*`` when their counts are given (0.0 when undefined; soil rates NaN).

    Example:
        >>> micro_metrics({"tp": 6, "fp": 2, "fn": 2, "tn": 10})["background_fp_rate"]
        0.16666666666666666
    """
    tp, fp, fn, tn = (int(counts[k]) for k in ("tp", "fp", "fn", "tn"))
    out: dict[str, float] = dict(metrics_from_counts(tp, fp, fn))
    out["background_fp_rate"] = fp / (fp + tn) if fp + tn > 0 else 0.0
    if all(k in counts for k in _BOUNDARY_COUNTS):
        r = _boundary_ratios(torch.tensor([[int(counts[k]) for k in _BOUNDARY_COUNTS]]))
        out.update({k: (0.0 if torch.isnan(v[0]) else float(v[0])) for k, v in r.items()})
    if all(k in counts for k in _SOIL_COUNTS):
        c = {k: int(counts[k]) for k in _SOIL_COUNTS}
        nan = float("nan")
        out["soil_fp_rate"] = c["soil_fp"] / c["soil_bg"] if c["soil_bg"] else nan
        out["soil_background_fraction"] = c["soil_bg"] / (fp + tn) if fp + tn else nan
        out["soil_landslide_fraction"] = c["soil_landslide"] / c["landslide"] if c["landslide"] else nan
    return out


class BinaryMetrics:
    """Accumulates region and boundary counts over batches (and DDP ranks) and reports the metrics.

    Args:
        threshold: probability threshold of a landslide pixel.
        ignore_index: target value of unknown pixels.
        boundary: also compute the boundary metrics (a few pooling passes per batch).
        dilation_ratio: Boundary IoU band width as a fraction of the image diagonal (0.02, Cheng et al.).
        tolerance_px: boundary F-score matching distance in pixels.

    Example:
        >>> import torch
        >>> m = BinaryMetrics()
        >>> _ = m.update(torch.tensor([[[2.0, -1.0]]]), torch.tensor([[[1, 1]]], dtype=torch.uint8))
        >>> r = m.compute(); r["iou"], r["recall"], r["precision"]
        (0.5, 0.5, 1.0)
    """

    def __init__(
        self,
        threshold: float = 0.5,
        ignore_index: int = IGNORE_INDEX,
        boundary: bool = True,
        dilation_ratio: float = BOUNDARY_DILATION_RATIO,
        tolerance_px: int = BOUNDARY_TOLERANCE_PX,
    ):
        if not dilation_ratio > 0:
            raise ValueError(f"dilation_ratio must be > 0, got {dilation_ratio}")
        if tolerance_px < 0:
            raise ValueError(f"tolerance_px must be >= 0, got {tolerance_px}")
        self.threshold = float(threshold)
        self.ignore_index = ignore_index
        self.boundary = bool(boundary)
        self.dilation_ratio = float(dilation_ratio)
        self.tolerance_px = int(tolerance_px)
        self.reset()

    def reset(self) -> None:
        self.counts = torch.zeros(len(_COUNT_NAMES), dtype=torch.int64)
        # Per-image sums and counts of defined values, in _IMAGE_NAMES order.
        self.img_sum = torch.zeros(len(_IMAGE_NAMES), dtype=torch.float64)
        self.img_n = torch.zeros(len(_IMAGE_NAMES), dtype=torch.float64)
        self.images = 0
        self.soil_images = 0

    @torch.no_grad()
    def update(
        self,
        logits: torch.Tensor,
        target: torch.Tensor,
        probs: bool = False,
        soil: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Add a batch.

        Args:
            logits: (N, 1, H, W) or (N, H, W) logits (or probabilities with ``probs=True``).
            target: (N, H, W) uint8, 1 landslide, 0 background, ``ignore_index`` ignored.
            soil: optional (N, H, W) bool mask of soil-like (confusable) pixels.

        Returns:
            (N, 4) per-image TP, FP, FN, TN of the batch.
        """
        if logits.dim() == 4:
            logits = logits[:, 0]
        score = logits.float() if probs else torch.sigmoid(logits.float())
        pred = score >= self.threshold
        target = target.to(pred.device)
        c = confusion_counts(pred, target, self.ignore_index).cpu()
        self.counts[:4] += c.sum(0)
        per = _ratios(c[:, 0], c[:, 1], c[:, 2])
        if self.boundary:
            b = boundary_counts(pred, target, self.ignore_index, self.dilation_ratio, self.tolerance_px)
            self.counts[4:10] += b.sum(0)
            per.update(_boundary_ratios(b))
        for j, k in enumerate(_IMAGE_NAMES):
            if k not in per:
                continue
            v = per[k]
            ok = ~torch.isnan(v)
            self.img_sum[j] += v[ok].sum()
            self.img_n[j] += ok.sum()
        if soil is not None:
            if soil.shape != pred.shape:
                raise ValueError(f"soil mask must have the prediction's shape {tuple(pred.shape)}, got {tuple(soil.shape)}")
            s = soil.to(pred.device).bool()
            bg = target == 0
            gt = target == 1
            self.counts[10] += int((pred & s & bg).sum())
            self.counts[11] += int((s & bg).sum())
            self.counts[12] += int((s & gt).sum())
            self.counts[13] += int(gt.sum())
            self.soil_images += c.shape[0]
        self.images += c.shape[0]
        return c

    def all_reduce(self) -> None:
        """Sum the accumulators over DDP ranks (no-op without an initialised process group)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        n, m = len(_COUNT_NAMES), len(_IMAGE_NAMES)
        buf = torch.cat([self.counts.double(), self.img_sum, self.img_n,
                         torch.tensor([float(self.images), float(self.soil_images)], dtype=torch.float64)])
        dist.all_reduce(buf)
        self.counts = buf[:n].round().long()
        self.img_sum, self.img_n = buf[n : n + m].clone(), buf[n + m : n + 2 * m].clone()
        self.images = int(round(float(buf[n + 2 * m])))
        self.soil_images = int(round(float(buf[n + 2 * m + 1])))

    def compute(self, prefix: Optional[str] = None) -> dict[str, float]:
        """Metrics so far.

        Returns:
            ``precision``, ``recall``, ``iou``, ``f1`` (micro), ``image_precision``, …,
            ``image_f1`` (per-image means; NaN when defined for no image), ``tp``, ``fp``,
            ``fn``, ``tn``, ``images``, ``background_fp_rate``; with ``boundary``:
            ``boundary_iou``, ``boundary_precision``, ``boundary_recall``, ``boundary_f`` (micro),
            ``image_boundary_iou``, ``image_boundary_f``; the counts behind each micro metric
            (see :func:`micro_metrics`); when soil masks were given:
            ``soil_fp_rate`` (FP / soil-like background pixels), ``soil_background_fraction``
            (soil-like share of the background) and ``soil_landslide_fraction`` (share of the
            landslide pixels the proxy also flags: how landslide-like the proxy is).
        """
        cnt = {k: int(v) for k, v in zip(_COUNT_NAMES, self.counts, strict=True)}
        if not self.boundary:
            cnt = {k: v for k, v in cnt.items() if k not in _BOUNDARY_COUNTS}
        if not self.soil_images:
            cnt = {k: v for k, v in cnt.items() if k not in _SOIL_COUNTS}
        out: dict[str, float] = micro_metrics(cnt)
        for j, k in enumerate(_IMAGE_NAMES):
            if k.startswith("boundary") and not self.boundary:
                continue
            n = float(self.img_n[j])
            out[f"image_{k}"] = float(self.img_sum[j] / n) if n > 0 else float("nan")
        out.update(cnt)
        out["images"] = self.images
        if prefix:
            out = {f"{prefix}{k}": v for k, v in out.items()}
        return out
