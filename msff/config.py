"""Typed configs: the one source of the options of training, evaluation, prediction, experiments
and the demo.

Each config is a dataclass whose fields, type hints and docstring are at once the Python API,
the command line of ``msff`` (generated from them with jsonargparse, :mod:`msff.cli`), the schema
of config files (JSON or YAML) and their validation. A value of the wrong type or out of range is
refused with one line naming the key (``training option 'epochs' must be an integer, got 'ten'``);
no value is coerced (``"64"`` is not an integer, ``true`` is not a crop size).

Example:
    >>> from msff.config import TrainConfig
    >>> TrainConfig(preset="tiny", epochs=2, crop=64).loss
    'bce'
    >>> TrainConfig.from_dict({"crop": "64"})
    Traceback (most recent call last):
    ...
    msff.config.ConfigError: training option 'crop' must be an integer or null, got '64' (str)
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

__all__ = [
    "CONFIG_DIR",
    "ConfigError",
    "TrainConfig",
    "check_types",
    "describe_type",
    "load_config_file",
    "resolve_config",
    "shipped_configs",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
"""The shipped configs (``msff/configs/*.json``): training configs by name (``realdata-cpu``,
``demo``), experiment configs as ``experiment_<name>.json``."""

LOSS_NAMES = ("bce", "dice", "bce+dice")  # == msff.engine.losses.LOSSES (a test keeps them equal)
BACKENDS = ("auto", "reference", "triton", "cuda")
ENGINES = ("auto", "onnx", "torch", "nchw")
_DOC_KEYS = ("description", "_comment")  # free text allowed in every config file


class ConfigError(ValueError):
    """A config value of the wrong type, out of range, or an unknown key (one line naming it)."""


# ---- strict type checking -----------------------------------------------------------------------
def _optional_inner(hint):
    if typing.get_origin(hint) in (Union, types.UnionType):
        args = typing.get_args(hint)
        if type(None) in args:
            rest = [a for a in args if a is not type(None)]
            return True, (rest[0] if len(rest) == 1 else Union[tuple(rest)])
    return False, hint


def describe_type(hint) -> str:
    """Words for a type hint, as used in error messages (``'an integer or null'``)."""
    optional, hint = _optional_inner(hint)
    origin = typing.get_origin(hint)
    if origin is Literal:
        kind = "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    elif origin in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        inner = describe_type(args[0]) if args else "values"
        kind = f"a list of {inner.removeprefix('an ').removeprefix('a ')}s"
        if origin is tuple and Ellipsis not in typing.get_args(hint) and args:
            kind = f"a list of {len(typing.get_args(hint))} {inner.removeprefix('an ').removeprefix('a ')}s"
    elif origin is dict or hint is dict:
        kind = "an object ({...})"
    else:
        kind = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}.get(
            hint, getattr(hint, "__name__", str(hint)))
    return kind + (" or null" if optional else "")


def _ok(value, hint) -> bool:
    optional, hint = _optional_inner(hint)
    if value is None:
        return optional
    origin = typing.get_origin(hint)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(hint))
    if origin in (Union, types.UnionType):
        return any(_ok(value, a) for a in typing.get_args(hint))
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(hint)
        if origin is tuple and args and Ellipsis not in args:
            return len(value) == len(args) and all(_ok(v, a) for v, a in zip(value, args, strict=True))
        return not args or all(_ok(v, args[0]) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if hint is Any:
        return True
    return isinstance(value, hint)


def check_types(obj, what: str) -> None:
    """Check every field of dataclass ``obj`` against its type hint, exactly (no coercion).

    Raises:
        ConfigError: ``"<what> option '<key>' must be <kind>, got <value> (<type>)"``.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not _ok(value, hints[f.name]):
            raise ConfigError(f"{what} option {f.name!r} must be {describe_type(hints[f.name])}, "
                              f"got {value!r} ({type(value).__name__})")


def _from_dict(cls, d: dict, what: str, source: Optional[str] = None):
    if not isinstance(d, dict):
        raise ConfigError(f"{what} config{_in(source)} must be an object ({{key: value}}), got {type(d).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    d = {k: v for k, v in d.items() if k not in _DOC_KEYS}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {what} option(s) {unknown}{_in(source)}; known: {sorted(names)}")
    try:
        return cls(**d)
    except ConfigError as e:
        raise ConfigError(f"{e}{_in(source)}") from None


def _in(source: Optional[str]) -> str:
    return f" (in {source})" if source else ""


def _nonneg(obj, *names: str, what: str) -> None:
    for name in names:
        if getattr(obj, name) < 0:
            raise ConfigError(f"{what} option {name!r} must be >= 0, got {getattr(obj, name)}")


def _positive(obj, *names: str, what: str, optional: bool = False) -> None:
    for name in names:
        v = getattr(obj, name)
        if v is None and optional:
            continue
        if not v > 0:
            raise ConfigError(f"{what} option {name!r} must be > 0{' or null' if optional else ''}, got {v}")


def _check_device(device: str, what: str) -> None:
    if device == "auto":
        return
    import torch

    try:
        torch.device(device)
    except RuntimeError:
        raise ConfigError(f"{what} option 'device' must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None


# ---- config files -------------------------------------------------------------------------------
def shipped_configs(prefix: str = "") -> list[str]:
    """Names of the shipped configs (``experiment_`` prefix: the experiment configs, stripped)."""
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
    if prefix:
        return [n[len(prefix):] for n in names if n.startswith(prefix)]
    return [n for n in names if not n.startswith("experiment_")]


def resolve_config(name: str | os.PathLike, prefix: str = "") -> Path:
    """A config file path: ``name`` itself when it is a file, else the shipped config of that name.

    Raises:
        ConfigError: neither a file nor a shipped name (the message lists the shipped names).
    """
    path = Path(name)
    if path.is_file():
        return path
    stem = str(name).removesuffix(".json")
    cand = CONFIG_DIR / f"{prefix}{stem}.json"
    if "/" not in stem and cand.is_file():
        return cand
    raise ConfigError(f"config {str(name)!r} is neither a file nor a shipped config "
                      f"({', '.join(shipped_configs(prefix)) or 'none'})")


def load_config_file(name: str | os.PathLike, prefix: str = "") -> tuple[dict, Path]:
    """Read a JSON or YAML config file (or a shipped config by name) as a dict.

    Returns:
        ``(values, path)``; the free-text keys ``description`` and ``_comment`` are dropped.

    Raises:
        ConfigError: not found, not valid JSON/YAML, or not a mapping (one line naming the file).
    """
    path = resolve_config(name, prefix)
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None
    except Exception as e:  # yaml.YAMLError (yaml is imported lazily; its error is multi-line)
        if type(e).__module__.split(".")[0] != "yaml":
            raise
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option names to values")
    return {k: v for k, v in values.items() if k not in _DOC_KEYS}, path


# ---- training -----------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Training settings. The defaults are the paper's recipe.

    Args:
        model: zoo name (``msffnet``, ``unet``, ``deeplabv3plus``, ``msffnet-baseline``, …).
        preset: MSFFNet preset (:data:`msff.models.PRESETS`: ``paper``, ``cpu``, ``tiny``, …);
            used for MSFFNet variants only.
        width_multiplier: overrides the preset's width multiplier (CPU-sized runs: 0.25 or less).
        model_kwargs: extra constructor arguments (e.g. ``{"kernel_size": 7, "lkam_blocks": 1}``).
        backend: kernel backend of MSFFNet's LKAM blocks (``auto``, ``reference``, ``triton``, ``cuda``).
        epochs: maximum epochs (paper: 150).
        batch_size: images per optimizer step over all processes (paper: 32).
        accumulate: gradient accumulation: each step sums ``accumulate`` loader batches of
            ``batch_size / accumulate`` images (same effective batch, less memory).
        lr: Adam learning rate (paper: 1e-4).
        weight_decay: Adam weight decay (paper: 1e-6).
        loss: ``bce`` (paper), ``dice`` or ``bce+dice``.
        plateau_factor: ReduceLROnPlateau factor on validation IoU (paper: 0.1).
        plateau_patience: ReduceLROnPlateau patience in epochs.
        early_stopping: stop after this many epochs without a better validation IoU (0: never).
        crop: random crop size for training (None: whole images, padded to the batch's largest).
        augment: the paper's augmentations (random rotation, flips, translation).
        samples_per_epoch: random crops per epoch (None: one per training image).
        amp: ``none``, ``bf16`` or ``fp16`` autocast (fp16 uses a gradient scaler on CUDA).
        channels_last: channels-last memory format for model and inputs.
        seed: seed of weights, shuffling and augmentation (a CPU run repeats exactly).
        time_budget_s: stop after the epoch that would overrun this wall time in seconds (None: no budget).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``, …
        workers: DataLoader worker processes.
        threshold: probability threshold for metrics and overlays.
        eval_batch_size: validation batch size (images are padded to a common size).
        overlays: number of validation images drawn as overlay PNGs at the end.

    Example:
        >>> cfg = TrainConfig(preset="tiny", epochs=2, batch_size=4, crop=64)
        >>> cfg.lr, cfg.loss
        (0.0001, 'bce')
    """

    model: str = "msffnet"
    preset: str = "paper"
    width_multiplier: Optional[float] = None
    model_kwargs: dict = field(default_factory=dict)
    backend: Literal["auto", "reference", "triton", "cuda"] = "auto"
    epochs: int = 150
    batch_size: int = 32
    accumulate: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-6
    loss: Literal["bce", "dice", "bce+dice"] = "bce"
    plateau_factor: float = 0.1
    plateau_patience: int = 5
    early_stopping: int = 15
    crop: Optional[int] = None
    augment: bool = True
    samples_per_epoch: Optional[int] = None
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    seed: int = 0
    time_budget_s: Optional[float] = None
    device: str = "auto"
    workers: int = 0
    threshold: float = 0.5
    eval_batch_size: int = 4
    overlays: int = 4

    def __post_init__(self):
        w = "training"
        check_types(self, w)
        if self.epochs < 1 or self.batch_size < 1 or self.accumulate < 1:
            bad = next(n for n in ("epochs", "batch_size", "accumulate") if getattr(self, n) < 1)
            raise ConfigError(f"{w} option {bad!r} must be >= 1, got {getattr(self, bad)} "
                              "(epochs, batch_size and accumulate must be >= 1)")
        if self.batch_size % self.accumulate:
            raise ConfigError(f"{w} option 'batch_size' ({self.batch_size}) must be a multiple of accumulate "
                              f"({self.accumulate})")
        _positive(self, "crop", "samples_per_epoch", "time_budget_s", "width_multiplier", what=w, optional=True)
        _positive(self, "lr", "eval_batch_size", what=w)
        _nonneg(self, "weight_decay", "plateau_patience", "early_stopping", "workers", "overlays", "seed", what=w)
        if not 0 < self.plateau_factor < 1:
            raise ConfigError(f"{w} option 'plateau_factor' must be in (0, 1), got {self.plateau_factor}")
        if not 0 <= self.threshold <= 1:
            raise ConfigError(f"{w} option 'threshold' must be in [0, 1], got {self.threshold}")
        _check_device(self.device, w)

    @classmethod
    def from_dict(cls, d: dict, source: Optional[str] = None) -> "TrainConfig":
        """Build from a dict (a config file's), rejecting unknown keys and wrong types by name."""
        return _from_dict(cls, d, "training", source)
