"""Is this input like the data the model was trained on? Training statistics stored in the model
card, and the comparison run before prediction and evaluation.

Training stores, per band (``metadata["domain"]``): the raw dtype and value range (min, max, 1st and
99th percentile, as stored on disk) and the range in model-input units (after the
:class:`~msff.data.scaling.InputScale`); the mean and standard deviation are the normalisation
statistics. It also stores the landslide fraction seen in training (over all pixels and per image).

:func:`compare_domain` takes pixel samples of new input (raw values), applies the input scale the
model will apply, and flags a band when

* its mean lies more than ``Z_LIMIT`` (3) training standard deviations from the training mean;
* its standard deviation is more than ``STD_RATIO_LIMIT`` (3) times larger or smaller; or
* more than ``OUT_OF_RANGE_LIMIT`` (5 %) of its values lie outside the training range (widened
  by 5 % of its span on each side).

Example:
    >>> import numpy as np
    >>> card = {"normalization": {"mean": [100.0], "std": [50.0]}}
    >>> r = compare_domain(card, np.full((1, 1000), 800.0), ["uint16"], band_names=["B4"])
    >>> r.ok, round(r.bands[0]["z"], 1)
    (False, 14.0)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from msff.data.scaling import InputScale

__all__ = [
    "DomainReport",
    "DomainError",
    "DomainWarning",
    "training_domain",
    "compare_domain",
    "fraction_check",
    "Z_LIMIT",
    "STD_RATIO_LIMIT",
    "OUT_OF_RANGE_LIMIT",
]

Z_LIMIT = 3.0
STD_RATIO_LIMIT = 3.0
OUT_OF_RANGE_LIMIT = 0.05
#: A scene whose predicted landslide fraction exceeds max(FRACTION_FACTOR × the training pixel
#: fraction, the 95th percentile of the per-image fractions) gets a warning.
FRACTION_FACTOR = 3.0


class DomainError(ValueError):
    """Input far from the training data under ``--strict``."""


class DomainWarning(UserWarning):
    """Input far from the training data, or a predicted landslide fraction far above training."""


def _g(v: float) -> str:
    if v is None or not np.isfinite(v):
        return "n/a"
    a = abs(v)
    if a >= 1000 or a == 0 or a >= 10 and float(v).is_integer():
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 0.01:
        return f"{v:.3g}"
    return f"{v:.2g}"


def training_domain(
    raw_samples: np.ndarray,
    dtypes: Sequence[str],
    scale: InputScale,
    band_names: Optional[Sequence[str]] = None,
    landslide_fractions: Optional[Sequence[float]] = None,
    landslide_pixels: Optional[tuple[int, int]] = None,
) -> dict:
    """The model-card entry describing the training inputs.

    Args:
        raw_samples: ``(C, N)`` raw values of valid training pixels (a bounded sample is fine).
        dtypes: the stored dtype of each band.
        scale: the input scale applied before normalisation (fitted).
        band_names: names for messages.
        landslide_fractions: per training image, landslide pixels / valid pixels.
        landslide_pixels: ``(landslide, valid)`` pixel counts over the whole training split.

    Returns:
        a JSON-ready dict (``metadata["domain"]``).
    """
    raw = np.asarray(raw_samples, np.float64)
    scaled = scale.apply_samples(raw)
    bands = []
    for b in range(raw.shape[0]):
        r, s = raw[b], scaled[b]
        bands.append({
            "name": None if band_names is None else str(band_names[b]),
            "dtype": str(dtypes[b]),
            "raw_min": float(r.min()), "raw_max": float(r.max()),
            "raw_p01": float(np.percentile(r, 1)), "raw_p99": float(np.percentile(r, 99)),
            "min": float(s.min()), "max": float(s.max()),
            "p01": float(np.percentile(s, 1)), "p99": float(np.percentile(s, 99)),
        })
    out: dict = {"pixels_sampled": int(raw.shape[1]), "bands": bands}
    if landslide_fractions is not None and len(landslide_fractions):
        f = np.asarray(landslide_fractions, np.float64)
        lf = {"images": int(f.size), "images_mean": float(f.mean()),
              "images_p95": float(np.percentile(f, 95)), "images_max": float(f.max())}
        if landslide_pixels is not None and landslide_pixels[1] > 0:
            lf["pixels"] = float(landslide_pixels[0] / landslide_pixels[1])
        out["landslide_fraction"] = lf
    return out


@dataclass
class DomainReport:
    """Outcome of :func:`compare_domain`.

    Attributes:
        ok: no band is flagged.
        bands: one dict per band with the numbers (``scene_mean``, ``train_mean``, ``z``, …) and
            ``problems`` (list of short texts).
        source: what was checked (file names); model: the model's name; scale: the input scale
            used; pixels: valid pixels sampled; notes: what could not be checked.
    """

    ok: bool
    bands: list
    source: str
    model: str
    scale: str
    pixels: int
    notes: list = field(default_factory=list)

    @property
    def flagged(self) -> list:
        return [b for b in self.bands if b["problems"]]

    def message(self, strict_hint: bool = True) -> str:
        """One paragraph naming each flagged band with its numbers and what to do."""
        if self.ok:
            return f"input domain check passed for {self.source} ({self.pixels} valid pixels sampled)"
        parts = []
        for b in self.flagged:
            parts.append(f"band {b['index']} ({b['name']}): " + "; ".join(b["problems"]))
        units = "" if self.scale.startswith("none") else f" after input scale '{self.scale}'"
        text = (
            f"{self.source} does not look like the training data of model {self.model!r}"
            f"{units} ({self.pixels} valid pixels sampled): " + " | ".join(parts) + ". "
            "The map will not be trustworthy. Bring the input to the training units: "
            "--input-scale percentile:2,98:255 (stretch each band of this scene to 0..255, like 8-bit "
            "training images), --input-scale divide:N (e.g. 10000 for reflectance digital numbers), "
            "or retrain on data from this sensor"
        )
        if strict_hint:
            text += "; --strict turns this warning into an error"
        return text

    def to_dict(self) -> dict:
        return {"ok": self.ok, "source": self.source, "model": self.model, "input_scale": self.scale,
                "pixels_sampled": self.pixels, "bands": self.bands, "notes": self.notes,
                "limits": {"z": Z_LIMIT, "std_ratio": STD_RATIO_LIMIT, "out_of_range": OUT_OF_RANGE_LIMIT}}


def compare_domain(
    card: dict,
    raw_samples: np.ndarray,
    dtypes: Sequence[str],
    scale: Optional[InputScale] = None,
    band_names: Optional[Sequence[str]] = None,
    source: str = "input",
) -> DomainReport:
    """Compare pixel samples of new input with the training statistics of a model card.

    Args:
        card: checkpoint metadata (``normalization`` required; ``domain`` used when present).
        raw_samples: ``(C, N)`` raw values of valid input pixels.
        dtypes: stored dtype per input band.
        scale: the input scale the model will apply (default: none).
        band_names: names for messages (default: the card's ``bands`` or ``band N``).
        source: what is being checked, for messages.

    Returns:
        a :class:`DomainReport`.
    """
    scale = scale or InputScale()
    raw = np.asarray(raw_samples, np.float64)
    c, n = raw.shape
    norm = card.get("normalization") or {}
    dom = card.get("domain") or {}
    tbands = dom.get("bands") or []
    notes = []
    if not tbands:
        notes.append("the checkpoint stores no training value ranges (trained before domain checks): "
                     "only means and standard deviations were compared")
    names = list(band_names) if band_names is not None else None
    if names is None:
        names = [b.get("name") for b in tbands] if len(tbands) == c else [None] * c
    names = [nm or f"band {i + 1}" for i, nm in enumerate(names)]
    scaled = scale.apply_samples(raw) if n else raw
    bands = []
    for i in range(c):
        s, r = scaled[i], raw[i]
        info: dict = {"index": i + 1, "name": names[i], "dtype": str(dtypes[i]) if i < len(dtypes) else None,
                      "problems": []}
        if n == 0:
            info["problems"].append("no valid pixel to check")
            bands.append(info)
            continue
        sm, ss = float(s.mean()), float(s.std())
        info.update(scene_mean=sm, scene_std=ss, scene_min=float(s.min()), scene_max=float(s.max()),
                    scene_raw_min=float(r.min()), scene_raw_max=float(r.max()),
                    scene_raw_p01=float(np.percentile(r, 1)), scene_raw_p99=float(np.percentile(r, 99)))
        tb = tbands[i] if i < len(tbands) else {}
        if norm.get("mean") is not None and i < len(norm["mean"]):
            tm, ts = float(norm["mean"][i]), float(norm["std"][i])
            z = (sm - tm) / ts
            ratio = ss / ts if ts > 0 else float("inf")
            info.update(train_mean=tm, train_std=ts, z=z, std_ratio=ratio)
            if abs(z) > Z_LIMIT:
                info["problems"].append(
                    f"mean {_g(sm)} vs training {_g(tm)} ± {_g(ts)} ({z:+.1f} training std)")
            if ratio > STD_RATIO_LIMIT or ratio < 1.0 / STD_RATIO_LIMIT:
                info["problems"].append(f"std {_g(ss)} vs training {_g(ts)} ({ratio:.2g}×)")
        if tb:
            lo, hi = float(tb["min"]), float(tb["max"])
            pad = 0.05 * max(hi - lo, 1e-12)
            out = float(np.mean((s < lo - pad) | (s > hi + pad)))
            info.update(train_min=lo, train_max=hi, train_dtype=tb.get("dtype"), out_of_range=out,
                        train_raw_min=tb.get("raw_min"), train_raw_max=tb.get("raw_max"))
            if out > OUT_OF_RANGE_LIMIT:
                what = (f"values {_g(info['scene_raw_min'])}..{_g(info['scene_raw_max'])} ({info['dtype']})"
                        f" vs training {_g(tb['raw_min'])}..{_g(tb['raw_max'])} ({tb.get('dtype')})")
                if scale.kind != "none":
                    what += f"; after scaling {_g(info['scene_min'])}..{_g(info['scene_max'])} vs {_g(lo)}..{_g(hi)}"
                info["problems"].append(f"{what}: {100 * out:.0f} % outside the training range")
        if info["problems"] and info["dtype"] and tb.get("dtype") and info["dtype"] != tb.get("dtype"):
            info["problems"].append(f"stored as {info['dtype']}, training images were {tb['dtype']}")
        bands.append(info)
    ok = not any(b["problems"] for b in bands)
    return DomainReport(ok=ok, bands=bands, source=source, model=str(card.get("model_name", "model")),
                        scale=scale.describe(), pixels=int(n), notes=notes)


def fraction_check(card: dict, fraction: float) -> Optional[str]:
    """A warning text when ``fraction`` (predicted landslide / valid pixels) is far above the
    training data's landslide fraction, else None (also None when the card has no record)."""
    lf = (card.get("domain") or {}).get("landslide_fraction")
    if not lf:
        return None
    base = lf.get("pixels", lf.get("images_mean", 0.0))
    limit = max(FRACTION_FACTOR * base, lf.get("images_p95", 0.0))
    if fraction <= limit:
        return None
    return (
        f"the predicted landslide fraction {100 * fraction:.1f} % of valid pixels is far above the training "
        f"data ({100 * base:.1f} % of pixels; 95th percentile per image {100 * lf.get('images_p95', 0):.1f} %, "
        f"max {100 * lf.get('images_max', 0):.1f} %): check the input domain and scaling before trusting this map"
    )
