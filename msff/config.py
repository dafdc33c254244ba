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

import copy
import dataclasses
import json
import math
import numbers
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

__all__ = [
    "COMMANDS",
    "CONFIG_DIR",
    "ConfigError",
    "DataConfig",
    "DemoConfig",
    "EvaluateConfig",
    "ExperimentConfig",
    "ExperimentRunConfig",
    "PredictConfig",
    "RunConfig",
    "SplitConfig",
    "TrainConfig",
    "build_configs",
    "check_command_values",
    "check_types",
    "check_value",
    "command_fields",
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
    if hint is Any:
        return True
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
    d = {k: v for k, v in d.items() if k not in _DOC_KEYS or k in names}
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


def load_config_file(name: str | os.PathLike, prefix: str = "", keep_doc: bool = False) -> tuple[dict, Path]:
    """Read a JSON or YAML config file (or a shipped config by name) as a dict.

    Returns:
        ``(values, path)``; the free-text keys ``description`` and ``_comment`` are dropped
        unless ``keep_doc``.

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
    return {k: v for k, v in values.items() if keep_doc or k not in _DOC_KEYS}, path


def _cli(default: Any = dataclasses.MISSING, *, factory: Any = None, **cli) -> Any:
    """A dataclass field with how the command line spells it (``metadata["cli"]``): ``flags``
    (extra option strings), ``nargs`` ("+"/"*": several values after one flag), ``comma`` (one
    comma-separated value), ``append`` (flag repeated), ``positional``, ``negate`` (a ``--no-x``
    flag), ``kind`` (``duration``: 900, 15m, 1h)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"cli": cli})
    return field(default=default, metadata={"cli": cli})


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
    augment: bool = _cli(True, negate="--no-augment")
    samples_per_epoch: Optional[int] = None
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = False
    seed: int = 0
    time_budget_s: Optional[float] = _cli(None, flags=("--time-budget",), kind="duration")
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


def _check_color(color, what: str) -> None:
    if color is not None and (len(color) != 3 or not all(0 <= c <= 255 for c in color)):
        raise ConfigError(f"{what} option 'mask_color' must be [R, G, B] with values 0..255, got {color!r}")


# ---- data ---------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """How to read labelled datasets (each a folder with an image folder and a mask folder).

    Args:
        data: dataset folder(s).
        image_dir: image folder inside each dataset folder (None: auto-detect images/, image/, img/, …).
        mask_dir: mask folder inside each dataset folder (None: auto-detect masks/, mask/, labels/, gt/, …).
        pair: pair images and masks by identical stem, by the number in the name
            (Landslide012 ↔ LandslideLabel012), or auto: stem, then number.
        mask_color: landslide colour [R, G, B] of RGB masks (None: auto, the most frequent non-black colour).
        mask_threshold: colour masks: landslide where the pixel reaches this fraction of the landslide
            colour (default 0.5; values > 1 are pixel levels); single-band masks: landslide where
            value > T (None: auto 0/1 or 0/255).
        ignore_value: single-band mask values excluded from loss and metrics (nodata always is).
        bands: 1-based image bands to use, e.g. [4, 3, 2] (None: all; evaluate: the checkpoint's).
        cache: read and decode every file once and keep it in memory.
        input_scale: raw values -> model input, stored in the model card: none, divide:C
            (e.g. divide:10000), percentile[:LO,HI[:MAX]] (evaluate: overrides the checkpoint's).
        dem: DEM raster (any grid/CRS) for the terrain bands.
        terrain: terrain bands from the DEM appended after the image bands: slope, hillshade.
        dates: the images hold several dates channel-stacked, in this order (e.g. [pre, post]).
        extra_raster: rasters on any grid/CRS (e.g. a 30 m slope) reprojected onto each
            georeferenced image's grid and appended after its bands.
    """

    data: list[str] = _cli(factory=list, positional=True)
    image_dir: Optional[str] = None
    mask_dir: Optional[str] = None
    pair: Literal["auto", "stem", "number"] = "auto"
    mask_color: Optional[list[int]] = _cli(None, comma=True, auto=True)
    mask_threshold: Optional[float] = None
    ignore_value: list[int] = _cli(factory=list, append=True)
    bands: Optional[list[int]] = _cli(None, comma=True)
    cache: bool = True
    input_scale: Optional[str] = None
    dem: Optional[str] = None
    terrain: list[str] = _cli(factory=list, comma=True)
    dates: Optional[list[str]] = _cli(None, comma=True)
    extra_raster: list[str] = _cli(factory=list, append=True)

    def __post_init__(self):
        check_types(self, "data")
        _check_color(self.mask_color, "data")
        if self.bands is not None and (not self.bands or min(self.bands) < 1):
            raise ConfigError(f"data option 'bands' must be 1-based band numbers, got {self.bands}")

    @classmethod
    def from_dict(cls, d: dict, source: Optional[str] = None) -> "DataConfig":
        """Build from a dict, rejecting unknown keys and wrong types by name."""
        return _from_dict(cls, d, "data", source)


@dataclass
class SplitConfig:
    """How the training data is split into training, validation and test images.

    Args:
        val: validation dataset folder(s) (None: split DATA by val_ratio).
        test: test dataset folder(s), evaluated with the best model.
        val_ratio: validation fraction when splitting DATA.
        test_ratio: test fraction when splitting DATA.
        split_seed: seed of the ratio split.
        train_list: file naming the training images, one per line.
        val_list: file naming the validation images.
        test_list: file naming the test images.
    """

    val: Optional[list[str]] = _cli(None, nargs="+")
    test: Optional[list[str]] = _cli(None, nargs="+")
    val_ratio: float = 0.2
    test_ratio: float = 0.0
    split_seed: int = 0
    train_list: Optional[str] = None
    val_list: Optional[str] = None
    test_list: Optional[str] = None

    def __post_init__(self):
        check_types(self, "split")
        for name in ("val_ratio", "test_ratio"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"split option {name!r} must be in [0, 1), got {getattr(self, name)}")
        if self.val_ratio + self.test_ratio >= 1:
            raise ConfigError(f"split options 'val_ratio' + 'test_ratio' must be < 1, got "
                              f"{self.val_ratio} + {self.test_ratio}")
        if (self.val_list or self.test_list) and not self.train_list:
            raise ConfigError("split options 'val_list'/'test_list' need 'train_list' too")

    @classmethod
    def from_dict(cls, d: dict, source: Optional[str] = None) -> "SplitConfig":
        """Build from a dict, rejecting unknown keys and wrong types by name."""
        return _from_dict(cls, d, "split", source)


@dataclass
class RunConfig:
    """The run of ``msff train``: where it goes, how often, and two model shortcuts.

    Args:
        out: run folder (must not exist unless overwrite or resume).
        runs: repeat with seeds seed … seed+N-1 and report mean ± std.
        overwrite: replace an existing run folder.
        resume: continue the interrupted run in the run folder exactly.
        progress: show progress bars.
        kernel_size: LKAM kernel size (paper 15); shortcut for model_kwargs.kernel_size.
        lkam_blocks: LKAM blocks per layer (paper 3); shortcut for model_kwargs.lkam_blocks.
    """

    out: Optional[str] = _cli(None, flags=("-o",))
    runs: int = 1
    overwrite: bool = False
    resume: bool = False
    progress: bool = _cli(True, negate="--no-progress")
    kernel_size: Optional[int] = None
    lkam_blocks: Optional[int] = None

    def __post_init__(self):
        check_types(self, "run")
        if self.runs < 1:
            raise ConfigError(f"run option 'runs' must be >= 1, got {self.runs}")
        if self.overwrite and self.resume:
            raise ConfigError("run options 'overwrite' and 'resume' exclude each other")


# ---- evaluation, prediction, demo ---------------------------------------------------------------
@dataclass
class EvaluateConfig:
    """``msff evaluate``: metrics of a checkpoint on labelled data (the data options: :class:`DataConfig`).

    Args:
        checkpoint: checkpoint folder (config.json + model.pt) or run folder.
        out: metrics file (None: evaluation_<DATA name>.json in the run folder).
        threshold: probability threshold (None: the checkpoint's).
        batch_size: images per forward pass.
        device: auto, cpu, cuda, cuda:1, …
        eval_list: evaluate only the images named in this file.
        overlays: also write overlay PNGs into this folder.
        overlay_count: number of overlay PNGs.
        engine: how the network runs: auto (onnxruntime on CPU when msff[onnx] is installed, else
            channels_last torch; NCHW on GPU), onnx, torch, nchw.
        overwrite: replace an existing metrics JSON (and overlay PNGs).
        strict: refuse data whose band statistics are far from the training data's (default: warn).
    """

    checkpoint: str = _cli(positional=True)
    out: Optional[str] = _cli(None, flags=("-o",))
    threshold: Optional[float] = None
    batch_size: int = 1
    device: str = "auto"
    eval_list: Optional[str] = _cli(None, flags=("--list",))
    overlays: Optional[str] = None
    overlay_count: int = 8
    engine: Literal["auto", "onnx", "torch", "nchw"] = "auto"
    overwrite: bool = False
    strict: bool = False

    def __post_init__(self):
        w = "evaluate"
        check_types(self, w)
        _positive(self, "batch_size", what=w)
        _nonneg(self, "overlay_count", what=w)
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ConfigError(f"{w} option 'threshold' must be in [0, 1], got {self.threshold}")
        _check_device(self.device, w)


@dataclass
class PredictConfig:
    """``msff predict``: whole-scene mapping with a trained checkpoint.

    Args:
        checkpoint: checkpoint folder (config.json + model.pt) or a run folder with best/.
        inputs: raster file(s); each is one scene (or a quoted glob, 'tiles/*.tif').
        bands: one scene stacked from single-band files on the same grid, in the model's band order.
        resampling: files on another grid than the first are reprojected onto it: bilinear
            (default; continuous values) or nearest (classes), one for all or one per file (M[,M...]).
        date: one date of a multi-date scene: its name and band files (repeat per date, e.g.
            --date pre pre/B4.tif pre/B3.tif pre/B2.tif --date post post/B4.tif ...).
        reorder_dates: put --date groups given in another order than the model card's into the
            card's order (else refused).
        dem: DEM raster for terrain bands (any grid/CRS).
        terrain: terrain bands computed from the DEM, e.g. slope,hillshade (None: the model card's).
        band_indexes: 1-based bands of the input (or of the --bands stack) to use, in order, e.g. 4,3,2.
        out: output prefix (out/iburi -> out/iburi_prob.tif, ...) or folder (existing, or ending
            with /); None: the current folder.
        threshold: mask threshold (None: the checkpoint's, else 0.5).
        nodata: input nodata value (None: from the files / their masks).
        tile: window size in pixels.
        overlap: overlap of neighbouring windows in pixels.
        margin: zero-weight pixels at inner window edges (None: overlap/4).
        batch_size: windows per forward pass.
        tta: flip test-time augmentation (4 passes).
        vector: write landslide polygons: a .gpkg/.geojson path (one scene), or just the format
            (gpkg, geojson) to write PREFIX_polygons.<ext> beside the rasters.
        min_area: drop polygons smaller than this many m².
        prob_dtype: probability raster encoding.
        quicklook: also write PREFIX_quicklook.png (mask over the scene).
        overwrite: replace existing outputs.
        scene_list: text file naming one raster (scene) per line, added to the inputs.
        resume: skip scenes whose outputs are complete and valid; predict incomplete ones again.
        summary: summary table of a multi-scene run (None: OUT/summary.csv); failed scenes are
            recorded there and the run goes on (exit status 1 at the end).
        device: auto, cpu, cuda, cuda:1, ...
        amp: mixed precision (bf16 where supported, else fp16).
        backend: MSFFNet kernel backend (None: the checkpoint's / MSFF_BACKEND).
        engine: how the network runs: auto (onnxruntime on CPU when msff[onnx] is installed, else
            channels_last torch; NCHW torch on GPU), onnx, torch (channels_last on CPU), nchw.
        quiet: no progress bar.
        input_scale: override the checkpoint's input scale: none, divide:C, or percentile[:LO,HI[:MAX]]
            (per-band stretch of this scene; for a scene from another sensor than the training data).
        strict: refuse (exit 2, nothing written) a scene whose band statistics are far from the training data's.
        no_domain_check: skip the input domain check.
    """

    checkpoint: str = _cli(positional=True)
    inputs: list[str] = _cli(factory=list, positional=True)
    bands: Optional[list[str]] = _cli(None, nargs="+")
    resampling: Optional[str] = None
    date: Optional[list[list[str]]] = _cli(None, nargs="+", append=True)
    reorder_dates: bool = False
    dem: Optional[str] = None
    terrain: Optional[list[str]] = _cli(None, comma=True)
    band_indexes: Optional[list[int]] = _cli(None, comma=True)
    out: Optional[str] = None
    threshold: Optional[float] = None
    nodata: Optional[float] = None
    tile: int = 512
    overlap: int = 128
    margin: Optional[int] = None
    batch_size: int = 4
    tta: bool = False
    vector: Optional[str] = None
    min_area: float = 0.0
    prob_dtype: Literal["float32", "uint8"] = "float32"
    quicklook: bool = False
    overwrite: bool = False
    scene_list: Optional[str] = None
    resume: bool = False
    summary: Optional[str] = None
    device: str = "auto"
    amp: bool = False
    backend: Optional[Literal["auto", "reference", "triton", "cuda"]] = None
    engine: Literal["auto", "onnx", "torch", "nchw"] = "auto"
    quiet: bool = False
    input_scale: Optional[str] = None
    strict: bool = False
    no_domain_check: bool = False

    def __post_init__(self):
        w = "predict"
        check_types(self, w)
        if self.tile < 1 or not 0 <= self.overlap < self.tile:
            raise ConfigError(f"need --tile >= 1 and 0 <= --overlap < --tile (got {self.tile}, {self.overlap})")
        _positive(self, "batch_size", what=w)
        if self.margin is not None and self.margin < 0:
            raise ConfigError(f"{w} option 'margin' must be >= 0 or null, got {self.margin}")
        if self.threshold is not None and not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(f"--threshold must be in [0, 1], got {self.threshold}")
        if self.band_indexes is not None and (not self.band_indexes or min(self.band_indexes) < 1):
            raise ConfigError(f"--band-indexes must be 1-based band numbers, got {self.band_indexes}")


@dataclass
class DemoConfig:
    """``msff demo``: train, evaluate and map a scene with a CPU-sized MSFFNet on synthetic data.

    Args:
        out: output folder (an existing, non-empty one is refused unless overwrite).
        overwrite: replace an existing output folder.
        data: use this dataset folder instead of synthetic scenes.
        scenes: synthetic scenes to build (80 % train, 20 % validation).
        size: synthetic scene size in pixels.
        epochs: maximum epochs.
        time_budget: training wall-time budget in seconds (900, 15m, 1h); the whole demo, with
            mapping, stays near 3 minutes on 2 cores.
        seed: seed of the scenes, the split and the training.
        progress: show progress bars.
    """

    out: str = _cli("demo_out", flags=("-o",))
    overwrite: bool = False
    data: Optional[str] = None
    scenes: int = 80
    size: int = 96
    epochs: int = 40
    time_budget: float = _cli(150.0, kind="duration")
    seed: int = 0
    progress: bool = _cli(True, negate="--no-progress")

    def __post_init__(self):
        w = "demo"
        check_types(self, w)
        _positive(self, "scenes", "size", "epochs", "time_budget", what=w)
        if self.data is None and self.scenes < 5:
            raise ConfigError(f"{w} option 'scenes' must be >= 5 (a validation split needs some), got {self.scenes}")


# ---- experiments --------------------------------------------------------------------------------
_SOIL_KEYS = ("red", "green", "blue", "nir", "greenness_max", "ndvi_max", "brightness_quantile")


@dataclass
class ExperimentConfig:
    """A comparison experiment (:mod:`msff.engine.experiment`): datasets, one fixed split, the
    models, the seeds, and the training options every run shares.

    Args:
        datasets: label -> dataset folder under data_root (a list: labels are the folder names).
        models: zoo names, or {"name", "kwargs", "label"} objects.
        seeds: the seeds every model runs with (paired design).
        name: experiment name.
        description: free text.
        data_root: folder holding the dataset folders (relative to the working directory).
        split: {"val_ratio", "test_ratio", "seed"} per dataset (defaults 0.0, 0.2, 0).
        reference: the model label the others are compared with (None: the first model).
        select: evaluate the last or the best (validation IoU) weights.
        train: :class:`TrainConfig` fields shared by every run (not model or seed).
        mask_encoding: {"color", "threshold", "ignore_values"} of the masks.
        bands: 1-based image bands to use.
        threads: torch CPU threads.
        notes: free text or data.
        soil_proxy: 1-based input bands of the soil-like proxy ({"red", "green", "blue", "nir", ...});
            "auto": RGB = bands 1-3 for 3-band data, else off; None: off.

    Example:
        >>> cfg = ExperimentConfig.from_file("cpu")
        >>> cfg.train["crop"], cfg.models[0]["label"], cfg.split["test_ratio"]
        (256, 'msffnet', 0.2)
        >>> ExperimentConfig.from_dict({"datasets": ["a"], "models": ["unet"], "seeds": "0"})
        Traceback (most recent call last):
        ...
        msff.config.ConfigError: experiment option 'seeds' must be a list of integers, got '0' (str)
    """

    datasets: Union[dict[str, str], list[str]]
    models: list[Union[str, dict]]
    seeds: list[int]
    name: str = "experiment"
    description: str = ""
    data_root: str = "."
    split: dict = field(default_factory=dict)
    reference: Optional[str] = None
    select: Literal["last", "best"] = "last"
    train: dict = field(default_factory=dict)
    mask_encoding: Optional[dict] = None
    bands: Optional[list[int]] = None
    threads: Optional[int] = None
    notes: Any = None
    soil_proxy: Union[dict, None, Literal["auto"]] = "auto"

    def __post_init__(self):
        w = "experiment"
        check_types(self, w)
        for key in ("datasets", "models", "seeds"):
            if not getattr(self, key):
                raise ConfigError(f"experiment config needs a non-empty {key!r}")
        if isinstance(self.datasets, list):
            self.datasets = {Path(d).name: d for d in self.datasets}
        split = {"val_ratio": 0.0, "test_ratio": 0.2, "seed": 0}
        unknown = sorted(set(self.split) - set(split))
        if unknown:
            raise ConfigError(f"unknown experiment option(s) split.{unknown}; known: {sorted(split)}")
        split.update(self.split)
        for k, kind in (("val_ratio", float), ("test_ratio", float), ("seed", int)):
            if not _ok(split[k], kind):
                raise ConfigError(f"experiment option 'split.{k}' must be {describe_type(kind)}, got {split[k]!r}")
        self.split = split
        if self.select == "best" and not split["val_ratio"] > 0:
            raise ConfigError("select='best' needs a validation split (split.val_ratio > 0)")
        models = []
        for m in self.models:
            m = {"name": m} if isinstance(m, str) else copy.deepcopy(m)
            if set(m) - {"name", "kwargs", "label"} or not isinstance(m.get("name"), str):
                raise ConfigError(f"model entry {m} may only have 'name' (a string), 'kwargs', 'label'")
            m.setdefault("kwargs", {})
            m.setdefault("label", m["name"])
            if not isinstance(m["kwargs"], dict) or not isinstance(m["label"], str):
                raise ConfigError(f"model entry {m}: 'kwargs' must be an object and 'label' a string")
            models.append(m)
        labels = [m["label"] for m in models]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"model labels must be unique, got {labels}")
        self.models = models
        from msff.models.zoo import model_info

        for m in models:
            model_info(m["name"])  # unknown names fail now, not after an hour of training
        if self.reference is None:
            self.reference = labels[0]
        if self.reference not in labels:
            raise ConfigError(f"reference {self.reference!r} is not one of the model labels {labels}")
        if "model" in self.train or "seed" in self.train:
            raise ConfigError("train options must not set 'model' or 'seed': the experiment sets them per run")
        TrainConfig.from_dict(dict(self.train))  # unknown or mistyped training options fail now
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"experiment option 'threads' must be >= 1 or null, got {self.threads}")
        sp = self.soil_proxy
        if isinstance(sp, dict):
            if set(sp) - set(_SOIL_KEYS):
                raise ConfigError(f"soil_proxy must be null or a dict with keys from {sorted(_SOIL_KEYS)}, got {sp!r}")
            for k in ("red", "green", "blue", "nir"):
                if sp.get(k) is not None and (not _ok(sp[k], int) or sp[k] < 1):
                    raise ConfigError(f"soil_proxy.{k} must be a 1-based band number, got {sp[k]!r}")

    @classmethod
    def from_dict(cls, d: dict, source: Optional[str] = None) -> "ExperimentConfig":
        """Validate an experiment config dict (one line naming the key on error)."""
        return _from_dict(cls, d, "experiment", source)

    @classmethod
    def from_file(cls, name: str | os.PathLike) -> "ExperimentConfig":
        """Read and validate an experiment config: a JSON/YAML file or a shipped name (``cpu``, ``paper``)."""
        values, path = load_config_file(name, prefix="experiment_", keep_doc=True)
        return cls.from_dict(values, source=str(path))

    def to_dict(self) -> dict:
        """The resolved config as the engine reads it: a dict with ``models`` as
        ``[{"name", "kwargs", "label"}]`` and the full ``split``; unset optional keys (and
        ``soil_proxy`` when "auto") are absent."""
        d = copy.deepcopy(dataclasses.asdict(self))
        if d["soil_proxy"] == "auto":
            del d["soil_proxy"]
        for k in ("mask_encoding", "bands", "threads", "notes"):  # absent, as in the file
            if d[k] is None:
                del d[k]
        return d


@dataclass
class ExperimentRunConfig:
    """``msff experiment``: run (or continue) a comparison experiment from its config.

    Args:
        experiment: experiment config (JSON/YAML file, or a shipped name: cpu, cpu-long, paper).
        out: output folder (runs, results.md/csv/json/png).
        data_root: folder holding the dataset folders (overrides the config's).
        models: model labels to run (default: all of the config's).
        seeds: seeds to run (default: the config's).
        resume: skip finished runs and continue interrupted ones (--no-resume: start every selected run anew).
        progress: show progress bars.
        dry_run: validate the config and print the plan.
    """

    experiment: str = _cli(positional=True)
    out: Optional[str] = None
    data_root: Optional[str] = None
    models: Optional[list[str]] = _cli(None, comma=True)
    seeds: Optional[list[int]] = _cli(None, comma=True)
    resume: bool = _cli(True, negate="--no-resume")
    progress: bool = False
    dry_run: bool = False

    def __post_init__(self):
        check_types(self, "experiment")
        if self.out is None and not self.dry_run:
            raise ConfigError("experiment option 'out' is required: give the output folder with --out DIR")


COMMANDS: dict[str, tuple[type, ...]] = {
    "train": (DataConfig, SplitConfig, TrainConfig, RunConfig),
    "evaluate": (EvaluateConfig, DataConfig),
    "predict": (PredictConfig,),
    "demo": (DemoConfig,),
    "experiment": (ExperimentRunConfig,),
}
"""The typed configs of each ``msff`` command, in the order of their positional arguments."""


def check_value(cls: type, key: str, value: Any, source: Optional[str] = None) -> None:
    """Check one config-file value against the type of field ``key`` of ``cls`` (no coercion).

    Raises:
        ConfigError: ``"option '<key>' must be <kind>, got <value> (in <source>)"``.
    """
    hint = typing.get_type_hints(cls)[key]
    if not _ok(value, hint):
        raise ConfigError(f"option {key!r} must be {describe_type(hint)}, got {value!r} "
                          f"({type(value).__name__}){_in(source)}")


def command_fields(command: str) -> dict[str, type]:
    """Field name -> the config class owning it, over the typed configs of ``command``."""
    owners: dict[str, type] = {}
    for cls in COMMANDS[command]:
        for f in dataclasses.fields(cls):
            owners.setdefault(f.name, cls)
    return owners


def check_command_values(command: str, values: dict, source: Optional[str] = None) -> None:
    """Check a config file's keys and value types for ``command`` (one line naming the key).

    Example:
        >>> check_command_values("train", {"epochs": 3, "crop": 64, "val_ratio": 0.3})
        >>> check_command_values("train", {"crop": True})
        Traceback (most recent call last):
        ...
        msff.config.ConfigError: option 'crop' must be an integer or null, got True (bool)
    """
    owners = command_fields(command)
    unknown = sorted(set(values) - set(owners))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}{_in(source)}; known: {sorted(owners)}")
    for key, value in values.items():
        check_value(owners[key], key, value, source)


def build_configs(command: str, values: dict, source: Optional[str] = None) -> dict[type, Any]:
    """The typed configs of ``command`` from one flat dict of option values (every key must
    belong to one of them; each config validates itself).

    Example:
        >>> cfgs = build_configs("train", {"data": ["d"], "epochs": 3, "val_ratio": 0.3})
        >>> cfgs[TrainConfig].epochs, cfgs[SplitConfig].val_ratio, cfgs[DataConfig].data
        (3, 0.3, ['d'])
    """
    owners = command_fields(command)
    unknown = sorted(set(values) - set(owners))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}{_in(source)}; known: {sorted(owners)}")
    out = {}
    for cls in COMMANDS[command]:
        kw = {k: v for k, v in values.items() if owners[k] is cls}
        try:
            out[cls] = cls(**kw)
        except TypeError as e:  # a required field (a positional argument) is missing
            missing = re.findall(r"'(\w+)'", str(e))
            raise ConfigError(f"msff {command} needs {', '.join(m.upper() for m in missing) or str(e)}") from None
        except ConfigError as e:
            raise ConfigError(f"{e}{_in(source)}") from None
    return out
