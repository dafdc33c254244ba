"""Training loop, evaluation, metrics, losses and run artefacts.

Example:
    >>> from msff.engine import TrainConfig, fit, evaluate, BinaryMetrics
"""
from msff.engine.losses import LOSSES, segmentation_loss
from msff.engine.metrics import BinaryMetrics, confusion_counts, metrics_from_counts
from msff.engine.train import (
    RunError,
    TrainConfig,
    build_model,
    evaluate,
    fit,
    fit_runs,
    load_checkpoint,
    write_overlays,
)

__all__ = [
    "BinaryMetrics",
    "LOSSES",
    "RunError",
    "TrainConfig",
    "build_model",
    "confusion_counts",
    "evaluate",
    "fit",
    "fit_runs",
    "load_checkpoint",
    "metrics_from_counts",
    "segmentation_loss",
    "write_overlays",
]
