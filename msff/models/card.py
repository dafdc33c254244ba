"""The model card: what a checkpoint needs besides its weights, typed.

A :class:`ModelCard` travels with the weights (``config.json`` of every checkpoint, written by
:meth:`msff.models.SegmentationModel.save_pretrained`) and is read back typed by every consumer:
evaluation, prediction and experiments. It holds how the input was prepared (input scaling,
normalisation, bands), how the training masks were encoded, the decision threshold, and a summary
of the training data (statistics for the domain check, the training options, data sources by
name — never machine-specific absolute paths).

For code written against the old metadata dictionaries the card is also a read-only
:class:`~collections.abc.Mapping` with the old keys (``card["normalization"]["mean"]``,
``card.get("threshold", 0.5)``, ``dict(card)``), so callers can switch at their own pace.

Example:
    >>> card = ModelCard(normalization=Normalization([0.1, 0.2], [1.0, 2.0]), bands=[4, 3], threshold=0.4)
    >>> card["normalization"]
    {'mean': [0.1, 0.2], 'std': [1.0, 2.0]}
    >>> ModelCard.from_dict(card.to_dict()) == card
    True
    >>> ModelCard.from_dict({"data": {"data": "/home/me/iburi/train"}}).data
    {'data': 'train'}
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any, Iterator, Optional

__all__ = ["CheckpointError", "ModelCard", "Normalization", "MaskEncodingCard", "portable"]


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the model it is loaded into."""


def _fail(source: str, key: str, what: str, got: Any) -> CheckpointError:
    return CheckpointError(f"{source}: model card key {key!r} must be {what}, got {got!r}")


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_abs_path(s: str) -> bool:
    if not s or "\n" in s or len(s) > 4096:
        return False
    return PurePosixPath(s).is_absolute() or (PureWindowsPath(s).is_absolute() and PureWindowsPath(s).drive != "")


def portable(obj: Any) -> Any:
    """``obj`` with every absolute path (in strings, lists and dict values) replaced by its last
    component, and tuples as lists: a training-data summary that means the same on any machine.

    Example:
        >>> portable({"data": ["/srv/iburi/train", "rel/val"], "seed": 1})
        {'data': ['train', 'rel/val'], 'seed': 1}
    """
    if isinstance(obj, os.PathLike):
        obj = os.fspath(obj)
    if isinstance(obj, str):
        if _is_abs_path(obj):
            name = PureWindowsPath(obj).name if "\\" in obj and "/" not in obj else PurePosixPath(obj).name
            return name or obj
        return obj
    if isinstance(obj, Mapping):
        return {str(k): portable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [portable(v) for v in obj]
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy / torch scalars and arrays
        return portable(obj.tolist())
    return obj


def _json_ready(obj: Any, source: str, key: str) -> Any:
    """Round-trip through JSON (tuples become lists); anything not JSON-able is one clear error."""
    try:
        return json.loads(json.dumps(portable(obj)))  # NaN metrics stay NaN, as before the card
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: model card key {key!r} is not JSON-serialisable: {e}") from None


@dataclass(frozen=True)
class Normalization:
    """Per-band ``(x - mean) / std``, applied after the input scale.

    Example:
        >>> Normalization([1, 2], [3, 4]).to_dict()
        {'mean': [1.0, 2.0], 'std': [3.0, 4.0]}
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self):
        for name in ("mean", "std"):
            vals = getattr(self, name)
            if isinstance(vals, (str, bytes)) or not hasattr(vals, "__iter__"):
                raise ValueError(f"normalization {name} must be a list of numbers, got {vals!r}")
            vals = tuple(float(v) if _is_number(v) else v for v in vals)
            if not vals or not all(isinstance(v, float) and math.isfinite(v) for v in vals):
                raise ValueError(f"normalization {name} must be a non-empty list of finite numbers, got {list(vals)!r}")
            object.__setattr__(self, name, vals)
        if len(self.mean) != len(self.std):
            raise ValueError(f"normalization has {len(self.mean)} means but {len(self.std)} stds")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"normalization std must be > 0, got {list(self.std)}")

    @property
    def bands(self) -> int:
        return len(self.mean)

    def to_dict(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: Any, source: str = "model card") -> "Normalization":
        if isinstance(d, Normalization):
            return d
        if not isinstance(d, Mapping) and callable(getattr(d, "to_dict", None)):  # msff.data.normalization's
            d = d.to_dict()
        if not isinstance(d, Mapping) or set(d) - {"mean", "std"} or not {"mean", "std"} <= set(d):
            raise _fail(source, "normalization", "{'mean': [...], 'std': [...]}", d)
        try:
            return cls(d["mean"], d["std"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: model card key 'normalization': {e}") from None


@dataclass(frozen=True)
class MaskEncodingCard:
    """How the training masks encoded landslide pixels (the fields of
    :class:`msff.data.io.MaskEncoding`), so evaluation can read new masks the same way."""

    color: Optional[tuple[int, int, int]] = None
    threshold: Optional[float] = None
    ignore_values: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        return {"color": None if self.color is None else list(self.color), "threshold": self.threshold,
                "ignore_values": list(self.ignore_values)}

    @classmethod
    def from_dict(cls, d: Any, source: str = "model card") -> "MaskEncodingCard":
        if isinstance(d, MaskEncodingCard):
            return d
        if dataclasses.is_dataclass(d) and not isinstance(d, type):
            d = dataclasses.asdict(d)
        what = "{'color': [r, g, b] | None, 'threshold': number | None, 'ignore_values': [int, ...]}"
        if not isinstance(d, Mapping) or set(d) - {"color", "threshold", "ignore_values"}:
            raise _fail(source, "mask_encoding", what, d)
        color, thr, ign = d.get("color"), d.get("threshold"), d.get("ignore_values") or ()
        if color is not None and (not isinstance(color, (list, tuple)) or len(color) != 3
                                  or not all(isinstance(c, int) and not isinstance(c, bool) for c in color)):
            raise _fail(source, "mask_encoding", what, d)
        if thr is not None and not _is_number(thr):
            raise _fail(source, "mask_encoding", what, d)
        if not isinstance(ign, (list, tuple)) or not all(isinstance(v, int) and not isinstance(v, bool) for v in ign):
            raise _fail(source, "mask_encoding", what, d)
        return cls(None if color is None else tuple(color), None if thr is None else float(thr), tuple(ign))

    def to_encoding(self):
        """The :class:`msff.data.io.MaskEncoding` that reads masks this way."""
        from msff.data.io import MaskEncoding

        return MaskEncoding(self.color, self.threshold, self.ignore_values)


# Old metadata key -> card field, for keys whose name changed.
_LEGACY_KEYS = {"train": "training"}
_FIELD_KEYS = {v: k for k, v in _LEGACY_KEYS.items()}


@dataclass(eq=False)
class ModelCard(Mapping):
    """Everything a trained segmentation model needs besides its weights.

    Args:
        model_name: zoo name (``msffnet``, ``unet``, …) or a free label.
        in_channels: input bands the model takes.
        bands: which bands of the source files were read (1-based numbers or names); None: all.
        normalization: per-band mean and std applied after the input scale.
        input_scale: :meth:`msff.data.scaling.InputScale.to_dict` form (see :attr:`scale`).
        mask_encoding: how the training masks were encoded.
        threshold: probability at or above which a pixel is mapped as landslide.
        domain: training-data statistics for the domain check (:mod:`msff.data.domain`).
        stack: how the input stack was built (terrain bands, dates, extra rasters).
        training: the training options (``TrainConfig`` as a dict).
        data: training-data summary (sources by name, splits); absolute paths are reduced to
            their last component.
        best_epoch: epoch of the saved weights, if known.
        val_metrics: validation metrics of the saved weights.
        extra: any other JSON-ready entries (experiment name, labels, …).

    Reading the card as a mapping gives the old metadata dictionary (``to_dict()``); see the
    module docstring.
    """

    model_name: Optional[str] = None
    in_channels: Optional[int] = None
    bands: Optional[list] = None
    normalization: Optional[Normalization] = None
    input_scale: Optional[dict] = None
    mask_encoding: Optional[MaskEncodingCard] = None
    threshold: float = 0.5
    domain: Optional[dict] = None
    stack: Optional[dict] = None
    training: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    best_epoch: Optional[int] = None
    val_metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self._validate("model card")

    def _validate(self, source: str) -> None:
        if self.model_name is not None and not isinstance(self.model_name, str):
            raise _fail(source, "model_name", "a string", self.model_name)
        if self.in_channels is not None and (not isinstance(self.in_channels, int) or isinstance(self.in_channels, bool)
                                             or self.in_channels < 1):
            raise _fail(source, "in_channels", "an integer >= 1", self.in_channels)
        if self.bands is not None:
            if not isinstance(self.bands, (list, tuple)) or not all(
                    isinstance(b, (int, str)) and not isinstance(b, bool) for b in self.bands):
                raise _fail(source, "bands", "a list of band numbers or names", self.bands)
            self.bands = list(self.bands)
        if self.normalization is not None:
            self.normalization = Normalization.from_dict(self.normalization, source)
        if self.input_scale is not None:
            if not isinstance(self.input_scale, Mapping) or "kind" not in self.input_scale:
                raise _fail(source, "input_scale", "a dict with 'kind' (InputScale.to_dict())", self.input_scale)
            self.input_scale = _json_ready(dict(self.input_scale), source, "input_scale")
        if self.mask_encoding is not None:
            self.mask_encoding = MaskEncodingCard.from_dict(self.mask_encoding, source)
        if not _is_number(self.threshold) or not 0.0 <= float(self.threshold) <= 1.0:
            raise _fail(source, "threshold", "a number in [0, 1]", self.threshold)
        self.threshold = float(self.threshold)
        for key in ("domain", "stack"):
            v = getattr(self, key)
            if v is not None:
                if not isinstance(v, Mapping):
                    raise _fail(source, key, "a dict", v)
                setattr(self, key, _json_ready(v, source, key))
        for key in ("training", "data", "val_metrics", "extra"):
            v = getattr(self, key)
            if v is None:
                v = {}
            if not isinstance(v, Mapping):
                raise _fail(source, _FIELD_KEYS.get(key, key), "a dict", v)
            setattr(self, key, _json_ready(v, source, _FIELD_KEYS.get(key, key)))
        if self.best_epoch is not None and (not isinstance(self.best_epoch, int) or isinstance(self.best_epoch, bool)):
            raise _fail(source, "best_epoch", "an integer", self.best_epoch)
        clash = sorted(set(self.extra) & (_FIELDS | set(_LEGACY_KEYS)))
        if clash:
            raise CheckpointError(f"{source}: model card extra entries {clash} shadow card fields; set the fields")

    # ---- typed views -----------------------------------------------------------------------
    @property
    def scale(self):
        """The :class:`msff.data.scaling.InputScale` (``none`` for cards without one)."""
        from msff.data.scaling import InputScale

        return InputScale() if self.input_scale is None else InputScale.from_dict(dict(self.input_scale))

    # ---- dict form -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The JSON form stored in ``config.json`` (the old metadata keys; None entries left out).

        Example:
            >>> ModelCard(model_name="unet").to_dict()
            {'model_name': 'unet', 'threshold': 0.5}
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            v = getattr(self, f.name)
            if v is None or (isinstance(v, dict) and not v and f.name in ("training", "data", "val_metrics")):
                continue
            if isinstance(v, (Normalization, MaskEncodingCard)):
                v = v.to_dict()
            elif isinstance(v, (dict, list)):
                v = json.loads(json.dumps(v))  # a copy: the card is not changed through its dict form
            out[_FIELD_KEYS.get(f.name, f.name)] = v
        out.update(json.loads(json.dumps(self.extra)))
        return out

    @classmethod
    def from_dict(cls, d: Optional[Mapping], source: str = "model card") -> "ModelCard":
        """Build a card from its dict form (or an old checkpoint's metadata dict).

        Unknown keys go to :attr:`extra`; a wrong type is one :class:`CheckpointError` line naming
        ``source`` and the key.

        Example:
            >>> ModelCard.from_dict({"threshold": "high"}, "ckpt/config.json")
            Traceback (most recent call last):
            ...
            msff.models.card.CheckpointError: ckpt/config.json: model card key 'threshold' must be a number in [0, 1], got 'high'
        """
        if d is None:
            return cls()
        if isinstance(d, ModelCard):
            return d.copy()
        if not isinstance(d, Mapping):
            raise CheckpointError(f"{source}: the model card must be a dict, got {type(d).__name__}")
        kw: dict[str, Any] = {"extra": {}}
        for k, v in d.items():
            name = _LEGACY_KEYS.get(k, k)
            if name in _FIELDS and name != "extra":
                kw[name] = v
            else:
                kw["extra"][str(k)] = v
        card = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            setattr(card, f.name, kw[f.name] if f.name in kw else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default))
        card._validate(source)
        return card

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike) -> "ModelCard":
        """Read the card of a checkpoint folder (or its ``config.json``) without loading weights;
        reads every checkpoint format msff has written (see :mod:`msff.models.base`).

        Raises:
            FileNotFoundError: no such folder or no ``config.json``.
            CheckpointError: unreadable config or a malformed card (one line naming the file).
        """
        from msff.models.checkpoint import read_checkpoint_config

        return read_checkpoint_config(path).card

    def copy(self) -> "ModelCard":
        return ModelCard.from_dict(self.to_dict())

    def replace(self, **changes) -> "ModelCard":
        """A copy with fields (or old metadata keys, e.g. ``train=...``) changed; unknown keys go
        to :attr:`extra`.

        Example:
            >>> ModelCard().replace(threshold=0.3, experiment="iburi").to_dict()
            {'threshold': 0.3, 'experiment': 'iburi'}
        """
        d = self.to_dict()
        for k, v in changes.items():
            d[_FIELD_KEYS.get(k, k)] = v.to_dict() if isinstance(v, (Normalization, MaskEncodingCard)) else v
        return ModelCard.from_dict(d)

    # ---- Mapping (read-only, the old metadata dict) ------------------------------------------
    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_dict())

    def __len__(self) -> int:
        return len(self.to_dict())

    def __contains__(self, key: object) -> bool:
        return key in self.to_dict()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ModelCard):
            return self.to_dict() == other.to_dict()
        if isinstance(other, Mapping):
            return self.to_dict() == ModelCard.from_dict(other).to_dict()
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        parts = [f"{k}={v!r}" for k, v in self.to_dict().items() if k not in ("domain", "train", "stack")]
        return "ModelCard(" + ", ".join(parts) + ")"


_FIELDS = {f.name for f in dataclasses.fields(ModelCard)}

