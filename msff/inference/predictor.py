"""A model ready for scene prediction: the network plus the statistics it was trained with."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from msff.data.scaling import InputScale, ScaleError
from msff.inference.sources import InferenceError

__all__ = ["Predictor", "load_predictor", "model_in_channels"]


def model_in_channels(model: nn.Module) -> Optional[int]:
    """The input band count of ``model``: an msff network's ``in_channels``, else
    ``config["in_channels"]``, else the first conv's."""
    from msff.models.base import SegmentationModel

    if isinstance(model, SegmentationModel):
        return model.in_channels
    for attr in ("config", "zoo_kwargs"):  # MSFFNet / msff.models.zoo networks record it
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and "in_channels" in cfg:
            return int(cfg["in_channels"])
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels * m.groups
    return None


@dataclass
class Predictor:
    """A segmentation model and how to feed it.

    Args:
        model: maps ``(N, C, H, W)`` float32 to ``(N, K, H, W)`` (K = 1: binary logit or
            probability; K >= 2: class scores, class 1 is "landslide").
        mean, std: per-band normalisation, applied as ``(x - mean) / std`` to raw band values.
            ``None`` feeds raw values.
        threshold: probability at or above which a pixel is mapped as landslide.
        output: ``"logits"`` (sigmoid / softmax applied here) or ``"probabilities"``.
        bands: names of the expected input bands (informational, shown in errors).
        name: model name for output metadata.
        metadata: the checkpoint's model card (training statistics for the domain check, …).
        input_scale: :class:`~msff.data.scaling.InputScale` applied to raw values before
            ``(x - mean) / std`` (default: none; a percentile stretch not fitted yet is fitted on a
            sample of the scene by :func:`~msff.inference.predict_scene`).

    Example:
        >>> import torch
        >>> p = Predictor(torch.nn.Conv2d(3, 1, 1), mean=[0, 0, 0], std=[1, 1, 1])
        >>> p.predict_proba(torch.zeros(2, 3, 8, 8)).shape
        torch.Size([2, 8, 8])
    """

    model: nn.Module
    mean: Optional[Sequence[float]] = None
    std: Optional[Sequence[float]] = None
    threshold: float = 0.5
    output: str = "logits"
    bands: Optional[list] = None
    name: str = "model"
    metadata: dict = field(default_factory=dict)
    input_scale: Optional[InputScale] = None

    def __post_init__(self):
        try:
            self.input_scale = InputScale.parse(self.input_scale)
        except ScaleError as e:
            raise InferenceError(str(e)) from None
        if self.output not in ("logits", "probabilities"):
            raise ValueError(f"output must be 'logits' or 'probabilities', got {self.output!r}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if self.mean is not None:
            self.mean = np.asarray(self.mean, dtype=np.float32).reshape(-1)
            self.std = np.asarray(self.std, dtype=np.float32).reshape(-1)
            if self.mean.shape != self.std.shape:
                raise ValueError(f"mean has {self.mean.size} values but std has {self.std.size}")
            if np.any(self.std <= 0) or not np.all(np.isfinite(self.std)):
                raise ValueError(f"std must be finite and > 0, got {self.std.tolist()}")
        if not 0.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        self.threshold = float(self.threshold)

    @property
    def card(self):
        """:attr:`metadata` as a typed :class:`~msff.models.card.ModelCard`."""
        from msff.models.card import ModelCard

        return ModelCard.from_dict(self.metadata, f"model {self.name!r}")

    @property
    def in_channels(self) -> Optional[int]:
        n = model_in_channels(self.model)
        if n is None and self.mean is not None:
            n = int(self.mean.size)
        return n

    def check_bands(self, count: int, source: str = "input") -> None:
        """Raise InferenceError unless ``count`` bands fit the model and the normalisation."""
        want = self.in_channels
        names = f" ({', '.join(map(str, self.bands))})" if self.bands else ""
        if want is not None and count != want:
            raise InferenceError(
                f"{source} has {count} band(s) but the model {self.name!r} expects {want}{names}; "
                "select or stack the right bands (e.g. --bands B4.tif B3.tif B2.tif)"
            )
        if self.mean is not None and self.mean.size != count:
            raise InferenceError(
                f"the checkpoint's normalisation has {self.mean.size} band(s), the {source} {count}"
            )

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """Input scale, then ``(x - mean) / std`` over the band axis of ``(..., C, H, W)`` float32
        raw values (in place)."""
        self.input_scale.apply(x)
        if self.mean is None:
            return x
        from msff.data.normalization import (
            Normalization,  # the one implementation (training uses it too)
        )

        return Normalization(self.mean, self.std).apply_numpy(x)

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """Landslide probability ``(N, H, W)`` float32 for normalised input ``(N, C, H, W)``."""
        y = self.model(x)
        if isinstance(y, (tuple, list)):
            y = y[0]
        if isinstance(y, dict):
            y = y.get("out", next(iter(y.values())))
        if y.dim() == 3:
            y = y[:, None]
        y = y.float()
        if y.shape[1] == 1:
            p = torch.sigmoid(y[:, 0]) if self.output == "logits" else y[:, 0]
        else:
            p = torch.softmax(y, dim=1)[:, 1] if self.output == "logits" else y[:, 1]
        return p

    def to(self, device) -> "Predictor":
        self.model.to(device)
        return self


def load_predictor(
    checkpoint: str | os.PathLike,
    device: str | torch.device = "cpu",
    backend: Optional[str] = None,
    require_normalization: bool = True,
) -> Predictor:
    """Load a checkpoint folder as a :class:`Predictor`.

    Any msff checkpoint folder (every network, every format msff has written) is read with
    :meth:`msff.models.SegmentationModel.from_pretrained`; its
    :class:`~msff.models.card.ModelCard` supplies the normalisation, input scale, threshold,
    bands and model name.

    Args:
        checkpoint: checkpoint folder (with ``config.json``), or a training run folder holding
            ``best/``.
        device: where the model runs.
        backend: kernel backend for MSFFNet (``auto``, ``reference``, ``triton``, ``cuda``).
        require_normalization: raise if the metadata has no normalisation statistics.

    Returns:
        A Predictor with the model in eval mode on ``device``.

    Raises:
        InferenceError: missing/unreadable checkpoint or metadata.

    Example:
        >>> p = load_predictor("runs/iburi/best")              # doctest: +SKIP
        >>> p.threshold, p.mean                                 # doctest: +SKIP
    """
    from msff.models import CheckpointError, MSFFNet, SegmentationModel

    path = Path(checkpoint)
    if not path.exists():
        raise InferenceError(f"checkpoint not found: {path}")
    if path.is_dir() and not (path / "config.json").exists() and (path / "best" / "config.json").exists():
        path = path / "best"  # a training run folder
    try:
        model = SegmentationModel.from_pretrained(path, map_location="cpu")
    except (CheckpointError, FileNotFoundError) as e:
        raise InferenceError(f"cannot load checkpoint {path}: {e}") from None
    if backend is not None and isinstance(model, MSFFNet):
        model.set_backend(backend)
    card = model.card
    if card.normalization is None and require_normalization:
        raise InferenceError(
            f"checkpoint {path} stores no 'normalization' statistics in its metadata; "
            "save it with card=ModelCard(normalization=Normalization(mean, std))"
        )
    try:
        scale = card.scale
    except (ScaleError, TypeError) as e:
        raise InferenceError(f"{path}: {e}") from None
    model.eval().to(device)
    norm = card.normalization
    return Predictor(
        model=model,
        mean=None if norm is None else list(norm.mean),
        std=None if norm is None else list(norm.std),
        threshold=card.threshold,
        output="probabilities" if model.activation in ("sigmoid", "softmax") else "logits",
        bands=card.bands,
        name=str(card.model_name or model.zoo_name or type(model).__name__),
        metadata=card.to_dict(),
        input_scale=scale,
    )
