"""Losses on binary logits with ignored pixels: BCE (the paper's), soft Dice, BCE + Dice."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from msff.data.io import IGNORE_INDEX

__all__ = ["segmentation_loss", "LOSSES"]

LOSSES = ("bce", "dice", "bce+dice")


def _bce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    per_px = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return (per_px * valid).sum() / valid.sum().clamp_min(1.0)


def _dice(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    p = torch.sigmoid(logits) * valid
    t = target * valid
    inter = (p * t).sum()
    return 1 - (2 * inter + eps) / (p.sum() + t.sum() + eps)


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """Loss of binary logits against a target with ignored pixels.

    Args:
        logits: (N, 1, H, W) or (N, H, W) logits.
        target: (N, H, W) uint8: 1 landslide, 0 background, 255 ignored (left out of the loss).
        kind: ``"bce"`` (binary cross-entropy on logits, the paper's), ``"dice"`` (soft Dice over the
            batch) or ``"bce+dice"`` (their sum).

    Returns:
        Scalar loss (float32).

    Example:
        >>> import torch
        >>> segmentation_loss(torch.zeros(1, 1, 2, 2), torch.tensor([[[0, 1], [255, 1]]], dtype=torch.uint8)).item()
        0.6931471824645996
    """
    if logits.dim() == 4:
        logits = logits[:, 0]
    logits = logits.float()
    valid = (target != IGNORE_INDEX).float()
    tgt = (target == 1).float()
    if kind == "bce":
        return _bce(logits, tgt, valid)
    if kind == "dice":
        return _dice(logits, tgt, valid)
    if kind == "bce+dice":
        return _bce(logits, tgt, valid) + _dice(logits, tgt, valid)
    raise ValueError(f"unknown loss {kind!r}; choose from {LOSSES}")
