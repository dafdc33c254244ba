"""Evaluation of a model on a dataset (whole images): region, boundary and soil-like false-positive
metrics, loss, overlay PNGs. The dataset is only read."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from msff.data.dataset import SegmentationDataset, collate
from msff.engine.device import autocast, dist_info, to_device
from msff.engine.losses import segmentation_loss
from msff.engine.metrics import BinaryMetrics
from msff.engine.report import save_overlay

__all__ = ["evaluate", "predict_logits", "write_overlays"]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: SegmentationDataset,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    threshold: float = 0.5,
    amp: str = "none",
    loss: Optional[str] = "bce",
    channels_last: bool = False,
    progress: bool = False,
    soil_bands: Optional[dict] = None,
) -> dict:
    """Precision, recall, IoU and F1 of ``model`` on ``dataset`` (whole images), Boundary IoU and
    boundary F-score, and with ``soil_bands`` (keyword arguments of
    :func:`msff.analysis.confusable.soil_like_mask`, e.g. ``{}`` for RGB in bands 1-3) the
    false-positive rate on soil-like background (``soil_fp_rate``).

    Under DDP each rank evaluates its share of the images and the counts are summed.

    Args:
        model: network giving (N, 1, H, W) logits.
        dataset: evaluation dataset (normalised like the training data; no crop/augment).
        batch_size: images per forward pass (padded to a common size; padding is ignored).
        device: where to run.
        threshold: probability threshold for a landslide pixel.
        amp: ``none``, ``bf16`` or ``fp16``.
        loss: also report this loss as ``loss`` (None: skip).

    Returns:
        :meth:`BinaryMetrics.compute` (micro ``precision``/``recall``/``iou``/``f1``, per-image
        ``image_*`` means, counts) plus ``loss``.

    Example:
        >>> evaluate(model, val_ds)["iou"]  # doctest: +SKIP
        0.61
    """
    device = torch.device(device) if not isinstance(device, torch.device) else device
    _, rank, world = dist_info()
    was_training = model.training
    model.eval()
    metrics = BinaryMetrics(threshold=threshold)
    idx = list(range(rank, len(dataset), world))
    loss_sum = torch.zeros(2, dtype=torch.float64)
    it = range(0, len(idx), batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="eval", leave=False, unit="batch")
    for s in it:
        batch = collate([dataset[i] for i in idx[s : s + batch_size]])
        x, y = to_device(batch, device, channels_last)
        with autocast(device, amp):
            logits = model(x)
        logits = logits.float()
        if not torch.isfinite(logits).all():
            raise FloatingPointError(f"model produced NaN/inf logits on {batch['name']}")
        soil = None
        if soil_bands is not None:
            from msff.analysis.confusable import dataset_soil_masks

            soil = dataset_soil_masks(dataset, idx[s : s + batch_size], y.shape, soil_bands)
        metrics.update(logits, y, soil=soil)
        if loss is not None:
            loss_sum += torch.tensor([float(segmentation_loss(logits, y, loss)) * x.shape[0], x.shape[0]], dtype=torch.float64)
    dist, _, _ = dist_info()
    if dist is not None:
        metrics.all_reduce()
        dist.all_reduce(loss_sum)
    out = metrics.compute()
    if loss is not None:
        out["loss"] = float(loss_sum[0] / loss_sum[1]) if loss_sum[1] > 0 else float("nan")
    model.train(was_training)
    return out


@torch.no_grad()
def predict_logits(model: nn.Module, image: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """Logits (H, W) of one normalised (C, H, W) image."""
    model.eval()
    return model(image[None].to(device))[0, 0].float().cpu()


@torch.no_grad()
def write_overlays(model: nn.Module, dataset: SegmentationDataset, folder: str | os.PathLike, count: int = 4,
                   device: str | torch.device = "cpu", threshold: float = 0.5) -> list[Path]:
    """Overlay PNGs (image | ground truth | prediction) for the first ``count`` images of ``dataset``.

    Returns:
        The written PNG paths.
    """
    folder = Path(folder)
    paths = []
    model.eval()
    for i in range(min(count, len(dataset))):
        item = dataset[i]
        logits = predict_logits(model, item["image"], device)
        pred = torch.sigmoid(logits).numpy() >= threshold
        raw, tgt = dataset.raw(i)
        m = BinaryMetrics(threshold)
        m.update(logits[None], torch.from_numpy(tgt)[None])
        r = m.compute()
        p = folder / f"{item['name']}.png"
        save_overlay(raw, tgt, pred, p, title=f"{item['name']}: IoU {r['iou']:.3f}  F1 {r['f1']:.3f}")
        paths.append(p)
    return paths
