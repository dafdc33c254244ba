"""Per-band normalisation ``(x - mean) / std``: the one implementation used by training,
evaluation (dataset items, torch) and prediction (tiles, numpy).

Both forms subtract and divide by the same float32 constants in float32, one IEEE operation
each, so a pixel normalised for training and the same pixel normalised for prediction are equal
bit for bit (``tests/data/test_module.py``).

Example:
    >>> import numpy as np, torch
    >>> n = Normalization(mean=[10.0, 20.0], std=[2.0, 4.0])
    >>> x = np.array([[[12.0]], [[28.0]]], dtype="float32")
    >>> n.apply_numpy(x.copy()).ravel().tolist()
    [1.0, 2.0]
    >>> n.apply_torch(torch.from_numpy(x)).ravel().tolist()
    [1.0, 2.0]
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import torch

__all__ = ["Normalization"]


class Normalization:
    """Per-band mean and std in model-input units (after the input scale), immutable.

    Args:
        mean, std: one value per band; std finite and > 0.

    Example:
        >>> Normalization.from_dict({"mean": [0.5], "std": [0.25]}).to_dict()
        {'mean': [0.5], 'std': [0.25]}
    """

    __slots__ = ("_mean", "_std", "_mean_t", "_std_t", "_stored")

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        m = np.asarray(mean, dtype=np.float64).reshape(-1)
        s = np.asarray(std, dtype=np.float64).reshape(-1)
        if m.size == 0 or m.shape != s.shape:
            raise ValueError(f"normalisation needs one mean and one std per band, got {m.size} mean(s) and {s.size} std(s)")
        if not np.all(np.isfinite(m)):
            raise ValueError(f"normalisation mean must be finite, got {m.tolist()}")
        if not np.all(np.isfinite(s)) or np.any(s <= 0):
            raise ValueError(f"normalisation std must be finite and > 0, got {s.tolist()}")
        mean32, std32 = m.astype(np.float32), s.astype(np.float32)
        mean32.setflags(write=False)
        std32.setflags(write=False)
        # The given values as they are (float64: checkpoint metadata round-trips unchanged) and the
        # float32 constants every application uses.
        object.__setattr__(self, "_stored", {"mean": [float(v) for v in m], "std": [float(v) for v in s]})
        object.__setattr__(self, "_mean", mean32)
        object.__setattr__(self, "_std", std32)
        # The torch constants are views of the same float32 numbers.
        object.__setattr__(self, "_mean_t", torch.from_numpy(mean32.copy()).view(-1, 1, 1))
        object.__setattr__(self, "_std_t", torch.from_numpy(std32.copy()).view(-1, 1, 1))

    def __setattr__(self, name, value):
        raise AttributeError("Normalization is immutable; build a new one")

    def __reduce__(self):
        # pickle / copy / deepcopy rebuild from the stored values (the default protocol would set
        # the slots one by one, which immutability refuses): DataLoader workers under "spawn",
        # torch.save of a dataset, the ONNX engine's deepcopy of a model and its card
        return (Normalization, (self._stored["mean"], self._stored["std"]))

    @classmethod
    def from_dict(cls, d: Optional[Mapping]) -> Optional["Normalization"]:
        """From ``{"mean": [...], "std": [...]}`` (checkpoint metadata); None or ``{"mean": None}``: None."""
        if d is None:
            return None
        if isinstance(d, Normalization):
            return d
        if not isinstance(d, Mapping) or "mean" not in d or "std" not in d:
            raise ValueError(f"normalisation must be {{'mean': [...], 'std': [...]}}, got {d!r}")
        if d["mean"] is None and d["std"] is None:
            return None
        return cls(d["mean"], d["std"])

    def to_dict(self) -> dict:
        """``{"mean": [...], "std": [...]}`` as given (Python floats; JSON / checkpoint metadata)."""
        return {"mean": list(self._stored["mean"]), "std": list(self._stored["std"])}

    @property
    def mean(self) -> np.ndarray:
        """(C,) float32, read-only."""
        return self._mean

    @property
    def std(self) -> np.ndarray:
        """(C,) float32, read-only."""
        return self._std

    @property
    def bands(self) -> int:
        return int(self._mean.size)

    def _check(self, channels: int) -> None:
        if channels != self._mean.size:
            raise ValueError(f"normalisation has {self._mean.size} band(s), the input {channels}")

    def apply_numpy(self, x: np.ndarray) -> np.ndarray:
        """Normalise float32 ``(..., C, H, W)`` in place and return it."""
        if x.dtype != np.float32:
            raise TypeError(f"apply_numpy normalises float32 in place, got {x.dtype}")
        self._check(x.shape[-3])
        x -= self._mean[:, None, None]
        x /= self._std[:, None, None]
        return x

    def apply_torch(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` of a float32 ``(..., C, H, W)`` tensor (a new tensor; same float32
        arithmetic as :meth:`apply_numpy`)."""
        if x.dtype != torch.float32:
            raise TypeError(f"apply_torch normalises float32, got {x.dtype}")
        self._check(x.shape[-3])
        return (x - self._mean_t.to(x.device)) / self._std_t.to(x.device)

    def __eq__(self, other) -> bool:
        if isinstance(other, Mapping):
            try:
                other = Normalization.from_dict(other)
            except ValueError:
                return False
        if not isinstance(other, Normalization):
            return NotImplemented
        return bool(np.array_equal(self._mean, other._mean) and np.array_equal(self._std, other._std))

    def __hash__(self) -> int:
        return hash((self._mean.tobytes(), self._std.tobytes()))

    def __repr__(self) -> str:
        return f"Normalization(mean={self._mean.tolist()}, std={self._std.tolist()})"
