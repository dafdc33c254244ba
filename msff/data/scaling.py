"""How raw band values map to the model's input: the one implementation used by train, evaluate
and predict.

A model is trained on values in some unit (8-bit PNG levels 0..255, Sentinel-2 reflectance
digital numbers 0..10000, …). :class:`InputScale` says how raw values are brought to the unit the
model was trained on *before* the per-band normalisation ``(x - mean) / std``:

* ``none``: raw values as stored;
* ``divide:C``: ``x / C`` (e.g. ``divide:10000`` for reflectance digital numbers);
* ``percentile:LO,HI:MAX``: per band, ``(x - p_LO) / (p_HI - p_LO) * MAX`` clipped to ``[0, MAX]``,
  with the percentiles computed on the training split (stored in the model card) or, when given
  to ``msff predict --input-scale``, on a sample of the scene being mapped (the cross-sensor case).

The scale travels in the checkpoint metadata (``metadata["input_scale"]``) so every consumer
builds the same input.

Example:
    >>> import numpy as np
    >>> s = InputScale.parse("percentile:2,98:255")
    >>> s = s.fit(np.array([[0.0, 100.0, 200.0, 300.0, 400.0]]))
    >>> [round(v, 1) for v in s.apply(np.array([[[8.0, 392.0]]], "float32")).ravel().tolist()]
    [0.0, 255.0]
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Optional

import numpy as np

__all__ = ["InputScale", "ScaleError", "scale_from_metadata"]

KINDS = ("none", "divide", "percentile")


class ScaleError(ValueError):
    """An input scale that cannot be parsed, fitted or applied; the message says which and why."""


@dataclass(frozen=True)
class InputScale:
    """Map raw band values to the model's input units.

    Args:
        kind: ``"none"``, ``"divide"`` or ``"percentile"``.
        divisor: the constant of ``divide`` (> 0).
        percentiles: ``(lo, hi)`` of ``percentile``, with ``0 <= lo < hi <= 100``.
        out_max: ``percentile`` maps ``p_lo → 0`` and ``p_hi → out_max`` (255 or 1 are usual).
        low, high: fitted per-band values at the two percentiles (None until :meth:`fit`).
        fitted_on: where the percentiles came from (``"training split"``, ``"scene"``, …).

    Example:
        >>> InputScale.parse("divide:10000").describe()
        'divide by 10000'
    """

    kind: str = "none"
    divisor: Optional[float] = None
    percentiles: tuple[float, float] = (2.0, 98.0)
    out_max: float = 255.0
    low: Optional[tuple[float, ...]] = None
    high: Optional[tuple[float, ...]] = None
    fitted_on: Optional[str] = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ScaleError(f"input scale kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.kind == "divide":
            if self.divisor is None or not math.isfinite(self.divisor) or self.divisor <= 0:
                raise ScaleError(f"divide needs a finite constant > 0, got {self.divisor!r}")
        lo, hi = self.percentiles
        if not 0.0 <= lo < hi <= 100.0:
            raise ScaleError(f"percentiles must satisfy 0 <= lo < hi <= 100, got {lo}, {hi}")
        if not (math.isfinite(self.out_max) and self.out_max > 0):
            raise ScaleError(f"percentile output maximum must be > 0, got {self.out_max}")
        if (self.low is None) != (self.high is None):
            raise ScaleError("give both low and high percentile values, or neither")
        if self.low is not None:
            object.__setattr__(self, "low", tuple(float(v) for v in self.low))
            object.__setattr__(self, "high", tuple(float(v) for v in self.high))
            if len(self.low) != len(self.high):
                raise ScaleError(f"{len(self.low)} low but {len(self.high)} high percentile values")
        object.__setattr__(self, "percentiles", (float(lo), float(hi)))

    # ---- construction ---------------------------------------------------------------------------
    @classmethod
    def parse(cls, spec: "str | InputScale | dict | None") -> "InputScale":
        """``none`` | ``divide:C`` | ``percentile[:LO,HI[:MAX]]`` (default 2,98 and 255).

        Raises:
            ScaleError: naming the text and the expected form.
        """
        if spec is None:
            return cls()
        if isinstance(spec, InputScale):
            return spec
        if isinstance(spec, dict):
            return cls.from_dict(spec)
        text = str(spec).strip().lower()
        parts = text.split(":")
        form = "expected none, divide:C (e.g. divide:10000) or percentile[:LO,HI[:MAX]] (e.g. percentile:2,98:255)"
        try:
            if parts[0] == "none" and len(parts) == 1:
                return cls()
            if parts[0] == "divide" and len(parts) == 2:
                return cls("divide", divisor=float(parts[1]))
            if parts[0] == "percentile" and len(parts) <= 3:
                pct = (2.0, 98.0)
                if len(parts) >= 2 and parts[1]:
                    lo, hi = (float(v) for v in parts[1].split(","))
                    pct = (lo, hi)
                out_max = float(parts[2]) if len(parts) == 3 else 255.0
                return cls("percentile", percentiles=pct, out_max=out_max)
        except ValueError as e:
            if isinstance(e, ScaleError):
                raise ScaleError(f"input scale {spec!r}: {e}") from None
            raise ScaleError(f"input scale {spec!r}: {form}") from None
        raise ScaleError(f"input scale {spec!r}: {form}")

    @classmethod
    def from_dict(cls, d: dict) -> "InputScale":
        """The inverse of :meth:`to_dict` (a model card entry)."""
        if not isinstance(d, dict) or "kind" not in d:
            raise ScaleError(f"model card input_scale must be a dict with 'kind', got {d!r}")
        known = {"kind", "divisor", "percentiles", "out_max", "low", "high", "fitted_on"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ScaleError(f"model card input_scale has unknown key(s) {unknown}")
        kw = dict(d)
        if kw.get("percentiles") is not None:
            kw["percentiles"] = tuple(kw["percentiles"])
        else:
            kw.pop("percentiles", None)
        return cls(**kw)

    def to_dict(self) -> dict:
        """JSON-ready form stored in the checkpoint metadata."""
        d = asdict(self)
        d["percentiles"] = list(self.percentiles)
        d["low"] = None if self.low is None else list(self.low)
        d["high"] = None if self.high is None else list(self.high)
        return d

    # ---- fitting and applying -------------------------------------------------------------------
    @property
    def needs_fit(self) -> bool:
        """True for a percentile stretch whose per-band values are not known yet."""
        return self.kind == "percentile" and self.low is None

    def fit(self, samples: np.ndarray, fitted_on: str = "training split") -> "InputScale":
        """Per-band percentiles of raw ``samples`` ``(C, N)`` (valid pixels only).

        Returns a new fitted scale (``self`` unchanged; ``none``/``divide`` return ``self``).
        """
        if self.kind != "percentile":
            return self
        samples = np.asarray(samples, dtype=np.float64)
        if samples.ndim != 2 or samples.shape[1] == 0:
            raise ScaleError(f"cannot fit a percentile stretch: no valid pixel values (got shape {samples.shape})")
        lo = np.percentile(samples, self.percentiles[0], axis=1)
        hi = np.percentile(samples, self.percentiles[1], axis=1)
        flat = [i + 1 for i in range(len(lo)) if not hi[i] > lo[i]]
        if flat:
            # a constant band: stretch around its value instead of dividing by zero
            hi = np.where(hi > lo, hi, lo + 1.0)
        return replace(self, low=tuple(lo.tolist()), high=tuple(hi.tolist()), fitted_on=fitted_on)

    def check_bands(self, count: int, source: str = "input") -> None:
        """Raise ScaleError when a fitted stretch has a different band count than ``count``."""
        if self.low is not None and len(self.low) != count:
            raise ScaleError(
                f"the percentile stretch was fitted on {len(self.low)} band(s) but the {source} has {count}"
            )

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Scale float32 ``(..., C, H, W)`` in place and return it."""
        if self.kind == "none":
            return x
        if self.kind == "divide":
            x /= np.float32(self.divisor)
            return x
        if self.low is None:
            raise ScaleError("the percentile stretch has not been fitted (no per-band values)")
        c = x.shape[-3]
        self.check_bands(c)
        lo = np.asarray(self.low, np.float32).reshape(c, 1, 1)
        span = (np.asarray(self.high, np.float32) - np.asarray(self.low, np.float32)).reshape(c, 1, 1)
        x -= lo
        x *= np.float32(self.out_max) / span
        np.clip(x, 0.0, self.out_max, out=x)
        return x

    def apply_samples(self, samples: np.ndarray) -> np.ndarray:
        """Scale ``(C, N)`` pixel samples (a copy, float64)."""
        s = np.asarray(samples, dtype=np.float32)[:, :, None].copy()
        return self.apply(s)[:, :, 0].astype(np.float64)

    def describe(self) -> str:
        """One short phrase for messages and reports."""
        if self.kind == "none":
            return "none (raw values)"
        if self.kind == "divide":
            return f"divide by {self.divisor:g}"
        lo, hi = self.percentiles
        s = f"per-band percentile stretch p{lo:g}..p{hi:g} -> 0..{self.out_max:g}"
        if self.low is not None:
            vals = ", ".join(f"{a:g}..{b:g}" for a, b in zip(self.low, self.high, strict=True))
            s += f" ({vals}; from the {self.fitted_on or 'data'})"
        return s

    def spec(self) -> str:
        """The short text form accepted by :meth:`parse` (without fitted values)."""
        if self.kind == "none":
            return "none"
        if self.kind == "divide":
            return f"divide:{self.divisor:g}"
        return f"percentile:{self.percentiles[0]:g},{self.percentiles[1]:g}:{self.out_max:g}"


def scale_from_metadata(meta: dict, source: str = "checkpoint") -> InputScale:
    """The checkpoint's input scale (``none`` for cards written before scales existed)."""
    d = (meta or {}).get("input_scale")
    if d is None:
        return InputScale()
    try:
        return InputScale.from_dict(d)
    except (ScaleError, TypeError) as e:
        raise ScaleError(f"{source}: {e}") from None

