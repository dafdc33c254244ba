"""The ``msff`` command: ``train``, ``evaluate``, ``demo`` (and ``predict``, ``experiment`` when
those modules are installed).

Examples::

    msff demo --out demo_out
    msff train data/bijie_landslide --out runs/bijie --preset cpu --crop 256 --epochs 30
    msff train data/sichuan_landslide --config realdata-cpu --out runs/sichuan
    msff evaluate runs/bijie data/bijie_holdout
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["main", "build_parser"]

S = argparse.SUPPRESS
CONFIG_DIR = Path(__file__).parent / "configs"

# Data options (not TrainConfig fields) and their defaults.
DATA_DEFAULTS: dict[str, Any] = dict(
    data=[], val=None, test=None, val_ratio=0.2, test_ratio=0.0, split_seed=0, train_list=None,
    val_list=None, test_list=None, image_dir=None, mask_dir=None, pair="auto", mask_color=None,
    mask_threshold=None, ignore_value=[], bands=None, cache=True, runs=1, out=None, input_scale=None,
    dem=None, terrain=None, dates=None, extra_raster=None,
)
MODEL_KWARG_OPTIONS = ("kernel_size", "lkam_blocks")


class UsageError(ValueError):
    """A command-line or config-file mistake."""


# ---- parsing helpers ----------------------------------------------------------------------------
def _int_list(s: str) -> list[int]:
    try:
        return [int(v) for v in s.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _names(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def _color(s: str):
    if s.lower() == "auto":
        return None
    vals = _int_list(s)
    if len(vals) != 3 or not all(0 <= v <= 255 for v in vals):
        raise argparse.ArgumentTypeError(f"expected R,G,B with values 0..255 (or 'auto'), got {s!r}")
    return vals


def _duration(s: str) -> float:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([smh]?)\s*", str(s))
    if not m:
        raise argparse.ArgumentTypeError(f"expected a duration like 900, 900s, 15m or 1h, got {s!r}")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _add_data_options(p: argparse.ArgumentParser, defaults_suppressed: bool = True) -> None:
    d = S if defaults_suppressed else None
    g = p.add_argument_group("data (a dataset is a folder with an image folder and a mask folder)")
    g.add_argument("--image-dir", default=d, metavar="NAME",
                   help="image folder inside each DATA folder (default: auto-detect images/, image/, img/, …)")
    g.add_argument("--mask-dir", default=d, metavar="NAME",
                   help="mask folder inside each DATA folder (default: auto-detect masks/, mask/, labels/, gt/, …)")
    g.add_argument("--pair", choices=("auto", "stem", "number"), default=d,
                   help="pair images and masks by identical stem, by the number in the name "
                        "(Landslide012 ↔ LandslideLabel012), or auto: stem, then number (default)")
    g.add_argument("--mask-color", type=_color, default=d, metavar="R,G,B",
                   help="landslide colour of RGB masks, e.g. 255,255,0 (default auto: most frequent non-black colour)")
    g.add_argument("--mask-threshold", type=float, default=d, metavar="T",
                   help="colour masks: landslide where the pixel reaches this fraction of the landslide colour "
                        "(default 0.5; soft anti-aliased edges split halfway; values > 1 are pixel levels, e.g. 100); "
                        "single-band masks: landslide where value > T (default: auto 0/1 or 0/255)")
    g.add_argument("--ignore-value", type=int, action="append", default=d, metavar="V",
                   help="single-band mask value excluded from loss and metrics (repeatable; nodata is always excluded)")
    g.add_argument("--bands", type=_int_list, default=d, metavar="B,…",
                   help="1-based image bands to use, e.g. 4,3,2 (default: all)")
    g.add_argument("--extra-raster", action="append", default=d, metavar="FILE",
                   help="raster on any grid/CRS (e.g. a 30 m slope) reprojected onto each georeferenced image's grid "
                        "and appended after its bands (repeatable; bilinear, nearest for colour-table files)")
    g.add_argument("--dem", default=d, metavar="FILE",
                   help="DEM raster (any grid/CRS) for --terrain bands, placed on each georeferenced image's grid")
    g.add_argument("--terrain", type=_names, default=d, metavar="NAMES",
                   help="terrain bands from --dem appended after the image bands: slope, hillshade (e.g. slope,hillshade)")
    g.add_argument("--dates", type=_names, default=d, metavar="NAMES",
                   help="the images hold several dates channel-stacked, in this order (e.g. pre,post); kept in the "
                        "model card, where prediction enforces the order")


def _load_config_file(name: str) -> dict:
    path = Path(name)
    if not path.is_file():
        cand = CONFIG_DIR / (name if name.endswith(".json") else f"{name}.json")
        if not cand.is_file():
            known = sorted(p.stem for p in CONFIG_DIR.glob("*.json"))
            raise UsageError(f"config {name!r} is neither a file nor a bundled config ({', '.join(known)})")
        path = cand
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise UsageError(f"config file {path} must hold a JSON object")
    cfg.pop("description", None)
    cfg.pop("_comment", None)
    return cfg


def _bundled_configs() -> str:
    return ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.json"))) or "none"


# ---- parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``msff`` argument parser (subcommands train, evaluate, demo, and predict/experiment
    when their modules are importable)."""
    from msff import __version__ as version  # noqa: F401  (fails loudly if the package is broken)

    parser = argparse.ArgumentParser(
        prog="msff",
        description="MSFFNet landslide segmentation (Yi & Tan 2025): train, evaluate, demo, predict.",
    )
    parser.add_argument("--version", action="version", version=f"msff {version}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    # train
    t = sub.add_parser(
        "train", help="train a model on landslide datasets",
        description="Train on one or more DATA folders (images + masks). Defaults are the paper's recipe "
                    "(BCE, Adam lr 1e-4 wd 1e-6, ReduceLROnPlateau 0.1, early stopping, 150 epochs, batch 32). "
                    "Options override a --config file, which overrides the defaults. "
                    "The data is checked completely before the run folder is created.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    t.add_argument("data", nargs="*", default=S, metavar="DATA", help="dataset folder(s) (training split source)")
    t.add_argument("--out", "-o", default=S, metavar="RUN_DIR", help="run folder (must not exist unless --overwrite/--resume)")
    t.add_argument("--config", "-c", default=None, metavar="FILE",
                   help=f"JSON config (a file, or a bundled name: {_bundled_configs()}); keys are the long option names")
    t.add_argument("--overwrite", action="store_true", help="replace an existing RUN_DIR")
    t.add_argument("--resume", action="store_true", help="continue the interrupted run in RUN_DIR exactly")
    t.add_argument("--runs", type=int, default=S, help="repeat with seeds seed…seed+N-1; report mean ± std (default 1)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    g = t.add_argument_group("splits")
    g.add_argument("--val", nargs="+", default=S, metavar="DIR", help="validation dataset folder(s) (default: split DATA)")
    g.add_argument("--test", nargs="+", default=S, metavar="DIR", help="test dataset folder(s), evaluated with the best model")
    g.add_argument("--val-ratio", type=float, default=S, help="validation fraction when splitting DATA (default 0.2)")
    g.add_argument("--test-ratio", type=float, default=S, help="test fraction when splitting DATA (default 0)")
    g.add_argument("--split-seed", type=int, default=S, help="seed of the ratio split (default 0)")
    g.add_argument("--train-list", default=S, metavar="FILE", help="names of the training images, one per line")
    g.add_argument("--val-list", default=S, metavar="FILE", help="names of the validation images")
    g.add_argument("--test-list", default=S, metavar="FILE", help="names of the test images")
    _add_data_options(t)
    g = t.add_argument_group("model")
    g.add_argument("--model", default=S, help="zoo name: msffnet (default), unet, deeplabv3plus, segnet, fcn, msffnet-baseline, …")
    g.add_argument("--preset", default=S, help="MSFFNet preset: paper (default), cpu, tiny, …")
    g.add_argument("--width-multiplier", type=float, default=S, help="scale all widths (CPU-sized: ≤ 0.25)")
    g.add_argument("--kernel-size", type=int, default=S, help="LKAM kernel size (paper 15)")
    g.add_argument("--lkam-blocks", type=int, default=S, help="LKAM blocks per layer (paper 3)")
    g.add_argument("--backend", default=S, choices=("auto", "reference", "triton", "cuda"), help="LKAM kernel backend")
    g = t.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=S, help="maximum epochs (paper 150)")
    g.add_argument("--batch-size", type=int, default=S, help="images per optimizer step (paper 32)")
    g.add_argument("--accumulate", type=int, default=S, help="gradient accumulation: loader batches per step")
    g.add_argument("--lr", type=float, default=S, help="Adam learning rate (paper 1e-4)")
    g.add_argument("--weight-decay", type=float, default=S, help="Adam weight decay (paper 1e-6)")
    g.add_argument("--loss", choices=("bce", "dice", "bce+dice"), default=S, help="loss (paper bce)")
    g.add_argument("--plateau-patience", type=int, default=S, help="ReduceLROnPlateau patience (epochs)")
    g.add_argument("--input-scale", default=S, metavar="SPEC",
                   help="raw values -> model input, stored in the model card: none (default), divide:C "
                        "(e.g. divide:10000), percentile[:LO,HI[:MAX]] (per-band stretch, percentiles of the training split)")
    g.add_argument("--early-stopping", type=int, default=S, help="stop after N epochs without better val IoU (0 never)")
    g.add_argument("--crop", type=int, default=S, help="random crop size (default: whole images)")
    g.add_argument("--no-augment", dest="augment", action="store_false", default=S, help="no rotation/flip/translation")
    g.add_argument("--samples-per-epoch", type=int, default=S, help="random crops per epoch (default: one per image)")
    g.add_argument("--amp", choices=("none", "bf16", "fp16"), default=S, help="autocast precision")
    g.add_argument("--channels-last", action="store_true", default=S, help="channels-last memory format")
    g.add_argument("--seed", type=int, default=S, help="seed of weights, order and augmentation (default 0)")
    g.add_argument("--time-budget", dest="time_budget_s", type=_duration, default=S,
                   help="stop after the epoch that would overrun this wall time (900, 15m, 1h)")
    g.add_argument("--device", default=S, help="auto, cpu, cuda, cuda:1")
    g.add_argument("--workers", type=int, default=S, help="data loader processes (default 0)")
    g.add_argument("--threshold", type=float, default=S, help="probability threshold (default 0.5)")
    g.add_argument("--eval-batch-size", type=int, default=S, help="validation batch size")
    g.add_argument("--overlays", type=int, default=S, help="validation overlay PNGs to write (default 4)")
    t.set_defaults(func=cmd_train)

    # evaluate
    e = sub.add_parser(
        "evaluate", help="evaluate a checkpoint on labelled data",
        description="Precision, recall, IoU, F1 (micro over all pixels, and per-image means) of a checkpoint "
                    "on DATA folders; printed and written as JSON. The checkpoint's normalisation, bands "
                    "and mask encoding are used unless overridden.",
    )
    e.add_argument("checkpoint", metavar="CHECKPOINT", help="checkpoint folder (config.json + model.pt) or run folder")
    e.add_argument("data", nargs="+", metavar="DATA", help="dataset folder(s)")
    e.add_argument("--out", "-o", default=None, metavar="JSON",
                   help="metrics file (default: evaluation_<DATA name>.json in the run folder)")
    e.add_argument("--threshold", type=float, default=None, help="probability threshold (default: the checkpoint's)")
    e.add_argument("--batch-size", type=int, default=1)
    e.add_argument("--device", default="auto")
    e.add_argument("--list", dest="eval_list", default=None, metavar="FILE", help="evaluate only the images named here")
    e.add_argument("--overlays", default=None, metavar="DIR", help="also write overlay PNGs here")
    e.add_argument("--overlay-count", type=int, default=8)
    e.add_argument("--engine", default="auto", choices=("auto", "onnx", "torch", "nchw"),
                   help="how the network runs: auto (onnxruntime on CPU when msff[onnx] is installed, else "
                        "channels_last torch; NCHW on GPU), onnx, torch, nchw")
    e.add_argument("--overwrite", action="store_true", help="replace an existing metrics JSON (and overlay PNGs)")
    e.add_argument("--input-scale", default=None, metavar="SPEC",
                   help="override the checkpoint's input scale: none, divide:C, percentile[:LO,HI[:MAX]] "
                        "(percentiles then computed on this data)")
    e.add_argument("--strict", action="store_true",
                   help="refuse data whose band statistics are far from the training data's (default: warn)")
    _add_data_options(e, defaults_suppressed=False)
    e.set_defaults(func=cmd_evaluate)

    # demo
    d = sub.add_parser(
        "demo", help="train, evaluate and map a scene with a CPU-sized MSFFNet on built-in synthetic data (~3 min)",
        description="Builds a small synthetic landslide scene set (or uses --data), trains a CPU-sized "
                    "MSFFNet for a few minutes, evaluates it and writes metrics.json, curves.png, "
                    "overlays/*.png and the checkpoint best/ into OUT, then maps a synthetic georeferenced "
                    "GeoTIFF scene with it (map/: probability and mask COGs, polygons, quick-look, run sidecar). "
                    "An existing, non-empty OUT is refused "
                    "unless --overwrite is given (it is then replaced).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d.add_argument("--out", "-o", default="demo_out", help="output folder")
    d.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    d.add_argument("--data", default=None, metavar="DIR", help="use this dataset folder instead of synthetic scenes")
    d.add_argument("--scenes", type=int, default=80, help="synthetic scenes to build (80%% train, 20%% validation)")
    d.add_argument("--size", type=int, default=96, help="synthetic scene size in pixels")
    d.add_argument("--epochs", type=int, default=40, help="maximum epochs")
    d.add_argument("--time-budget", type=_duration, default=_duration("150s"),
                   help="training wall-time budget (the whole demo, with mapping, stays near 3 minutes on 2 cores)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true")
    d.set_defaults(func=cmd_demo)

    _add_optional(sub, "predict", "msff.inference.cli", "add_predict_parser", "run_predict",
                  "whole-scene prediction")
    _add_optional(sub, "experiment", "msff.engine.experiment", "add_experiment_parser", "run_experiment",
                  "run a comparison experiment from a config")
    _add_optional(sub, "erf", "msff.analysis.erf", "add_erf_parser", "run_erf",
                  "effective receptive field of each encoder stage")
    return parser


def _add_optional(sub, name: str, module: str, add_fn: str, run_fn: str, what: str) -> None:
    import importlib

    try:
        mod = importlib.import_module(module)
        add, run = getattr(mod, add_fn), getattr(mod, run_fn)
    except Exception as exc:  # the module is optional; say why the command is missing
        reason = f"{type(exc).__name__}: {exc}"
        p = sub.add_parser(name, help=f"{what} (unavailable: {reason})", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda args, _r=reason: _unavailable(name, module, _r))
        return
    before = set(sub.choices)
    add(sub)
    p = sub.choices.get(name)
    if p is not None and name not in before:
        p.set_defaults(func=run)


def _unavailable(name: str, module: str, reason: str) -> int:
    print(f"msff {name}: not available in this installation ({module}: {reason})", file=sys.stderr)
    return 2


# ---- data assembly ------------------------------------------------------------------------------
def _encoding(opts: dict):
    from msff.data import MaskEncoding

    color = opts.get("mask_color")
    return MaskEncoding(
        color=tuple(int(c) for c in color) if color else None,
        threshold=opts.get("mask_threshold"),
        ignore_values=tuple(opts.get("ignore_value") or ()),
    )


def _pairs(folders: Sequence[str], opts: dict):
    from msff.data import find_pairs

    pairs = []
    for f in folders:
        pairs += find_pairs(f, opts.get("image_dir"), opts.get("mask_dir"), opts.get("pair") or "auto")
    return pairs


def build_datasets(opts: dict):
    """(train, val, test) :class:`~msff.data.SegmentationDataset` from merged train options."""
    from msff.data import DataError, SegmentationDataset, read_list, select_pairs, split_pairs

    if not opts.get("data"):
        raise UsageError("no training data: give DATA folder(s) (or 'data' in the config file)")
    pairs = _pairs(opts["data"], opts)
    if opts.get("train_list") or opts.get("val_list") or opts.get("test_list"):
        if not opts.get("train_list"):
            raise UsageError("--val-list/--test-list need --train-list too")
        train = select_pairs(pairs, read_list(opts["train_list"]), opts["train_list"])
        val = select_pairs(pairs, read_list(opts["val_list"]), opts["val_list"]) if opts.get("val_list") else []
        test = select_pairs(pairs, read_list(opts["test_list"]), opts["test_list"]) if opts.get("test_list") else []
        overlap = {p.image for p in train} & {p.image for p in val + test}
        if overlap:
            raise DataError(f"split lists overlap: {sorted(str(p) for p in overlap)[:3]} are in train and val/test")
    elif opts.get("val"):
        train, val = pairs, _pairs(opts["val"], opts)
        test = []
        if opts.get("test_ratio"):
            train, _, test = split_pairs(train, 0.0, opts["test_ratio"], opts.get("split_seed", 0))
    else:
        train, val, test = split_pairs(pairs, opts.get("val_ratio", 0.2), opts.get("test_ratio", 0.0),
                                       opts.get("split_seed", 0))
    if opts.get("test"):
        test = test + _pairs(opts["test"], opts)
    enc = _encoding(opts)
    kw = dict(encoding=enc, bands=opts.get("bands"), cache=opts.get("cache", True), input_scale=opts.get("input_scale"),
              dem=opts.get("dem"), terrain=opts.get("terrain") or (), dates=opts.get("dates"),
              extra_rasters=opts.get("extra_raster") or ())
    train_ds = SegmentationDataset(train, **kw)
    val_ds = SegmentationDataset(val, **kw) if val else None
    test_ds = SegmentationDataset(test, **kw) if test else None
    return train_ds, val_ds, test_ds


def _merge_train_options(args: argparse.Namespace) -> tuple[dict, dict]:
    from msff.engine import TrainConfig

    given = {k: v for k, v in vars(args).items() if k not in ("func", "command", "config", "overwrite", "resume", "no_progress")}
    file_cfg = _load_config_file(args.config) if args.config else {}
    merged: dict[str, Any] = dict(DATA_DEFAULTS)
    model_kwargs: dict[str, Any] = {}
    for src in (file_cfg, given):
        for k, v in src.items():
            k = k.replace("-", "_")
            if k in MODEL_KWARG_OPTIONS:
                model_kwargs[k] = v
            elif k == "model_kwargs":
                model_kwargs.update(v)
            else:
                merged[k] = v
    if isinstance(merged.get("data"), str):
        merged["data"] = [merged["data"]]
    names = set(TrainConfig.__dataclass_fields__)
    unknown = sorted(k for k in merged if k not in names and k not in DATA_DEFAULTS)
    if unknown:
        raise UsageError(f"unknown option(s) {unknown} in {args.config or 'the command line'}")
    train_kw = {k: v for k, v in merged.items() if k in names}
    train_kw["model_kwargs"] = model_kwargs
    data_opts = {k: v for k, v in merged.items() if k in DATA_DEFAULTS}
    if isinstance(data_opts.get("val"), str):
        data_opts["val"] = [data_opts["val"]]
    if isinstance(data_opts.get("test"), str):
        data_opts["test"] = [data_opts["test"]]
    _check_data_options(data_opts, args.config)
    return train_kw, data_opts


def _check_data_options(opts: dict, source: Optional[str]) -> None:
    """One line naming the key for a data option of the wrong type (config files are JSON)."""
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def is_num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    def is_str_list(v):
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    def is_int_list(v):
        return isinstance(v, list) and all(is_int(x) for x in v)

    rules = {
        "data": (is_str_list, "a list of folder names"), "val": (is_str_list, "a list of folder names"),
        "test": (is_str_list, "a list of folder names"), "val_ratio": (is_num, "a number"),
        "test_ratio": (is_num, "a number"), "split_seed": (is_int, "an integer"), "runs": (is_int, "an integer"),
        "train_list": (lambda v: isinstance(v, str), "a file name"), "val_list": (lambda v: isinstance(v, str), "a file name"),
        "test_list": (lambda v: isinstance(v, str), "a file name"), "image_dir": (lambda v: isinstance(v, str), "a folder name"),
        "mask_dir": (lambda v: isinstance(v, str), "a folder name"), "pair": (lambda v: v in ("auto", "stem", "number"), "auto, stem or number"),
        "mask_color": (lambda v: is_int_list(v) and len(v) == 3, "[R, G, B]"), "mask_threshold": (is_num, "a number"),
        "ignore_value": (is_int_list, "a list of integers"), "bands": (is_int_list, "a list of band numbers"),
        "cache": (lambda v: isinstance(v, bool), "true or false"), "out": (lambda v: isinstance(v, str), "a folder name"),
    }
    for key, (ok, kind) in rules.items():
        v = opts.get(key)
        if v is not None and not ok(v):
            raise UsageError(f"option {key!r} must be {kind}, got {v!r} (in {source or 'the command line'})")


def _fmt(v: float) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _print_metrics(title: str, m: dict) -> None:
    print(f"{title}: precision {_fmt(m['precision'])}  recall {_fmt(m['recall'])}  IoU {_fmt(m['iou'])}  "
          f"F1 {_fmt(m['f1'])}  Boundary IoU {_fmt(m.get('boundary_iou'))}  boundary F {_fmt(m.get('boundary_f'))}   "
          f"(per-image mean IoU {_fmt(m.get('image_iou'))}, F1 {_fmt(m.get('image_f1'))}; "
          f"{m.get('images', '?')} images)")


# ---- commands -----------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from msff.engine import TrainConfig, fit_runs

    train_kw, opts = _merge_train_options(args)
    if not opts.get("out"):
        raise UsageError("give the run folder with --out RUN_DIR")
    out = Path(opts["out"])
    config = TrainConfig.from_dict(train_kw)
    runs = int(opts.get("runs") or 1)
    if runs < 1:
        raise UsageError("--runs must be >= 1")
    if out.exists() and any(out.iterdir()) and not (args.overwrite or args.resume):
        raise UsageError(f"run folder {out} exists and is not empty; use --overwrite to replace it or --resume to continue it")
    train_ds, val_ds, test_ds = build_datasets(opts)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"msff train: {len(train_ds)} training, {len(val_ds) if val_ds else 0} validation, "
              f"{len(test_ds) if test_ds else 0} test images; {train_ds.in_channels} bands; run folder {out}")
    extra = {"data": {k: opts[k] for k in ("data", "val", "test", "val_ratio", "test_ratio", "split_seed") if opts.get(k) is not None},
             "splits": {"train": [p.name for p in train_ds.pairs], "val": [p.name for p in val_ds.pairs] if val_ds else [],
                        "test": [p.name for p in test_ds.pairs] if test_ds else []}}
    res = fit_runs(config, train_ds, val_ds, out, runs=runs, overwrite=args.overwrite, resume=args.resume,
                   test_ds=test_ds, progress=not args.no_progress, extra_metadata=extra)
    from msff.engine.train import _dist

    if _dist()[1] != 0:
        return 0
    for i, r in enumerate(res["runs"]):
        tag = f"run {i} (seed {res['seeds'][i]})" if runs > 1 else "best"
        if "best" in r:
            _print_metrics(f"{tag} validation @ epoch {r['best_epoch']}", r["best"])
        if "test" in r:
            _print_metrics(f"{tag} test", r["test"])
    if runs > 1:
        for k, v in res["summary"].items():
            print(f"  {k}: {_fmt(v['mean'])} ± {_fmt(v['std'])} (n={v['n']})")
        print(f"summary: {out / 'summary.json'}")
    else:
        r = res["runs"][0]
        print(f"stopped: {r['stopped']} after {r['epochs_run']} epochs, {r['seconds']:.0f} s")
        print(f"checkpoint: {out / 'best'}\nmetrics: {out / 'metrics.json'}\nlog: {out / 'log.csv'}\n"
              f"curves: {out / 'curves.png'}\noverlays: {out / 'overlays'}")
    return 0


def _evaluate_domain(ds, meta: dict, ckpt: Path, args: argparse.Namespace) -> dict:
    """Input domain check of evaluation data against the checkpoint's training statistics
    (msff.data.domain): a warning naming bands and numbers, an error under --strict."""
    from msff.data.dataset import sample_pixels
    from msff.data.domain import DomainError, compare_domain

    samples, dtypes = sample_pixels(ds, 65536)
    if ds.input_scale.needs_fit:
        ds.input_scale = ds.input_scale.fit(samples, "evaluation data")
    card = dict(meta, model_name=meta.get("model_name", ckpt.name))
    report = compare_domain(card, samples, dtypes, ds.input_scale, None, " + ".join(str(d) for d in args.data))
    if not report.ok:
        if args.strict:
            raise DomainError(report.message(strict_hint=False) + " (refused under --strict)")
        print(f"msff evaluate: warning: {report.message()}", file=sys.stderr)
    return report.to_dict()


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from msff.data import DataError, MaskEncoding, SegmentationDataset, read_list, select_pairs
    from msff.engine import evaluate, load_checkpoint, write_overlays
    from msff.engine.report import atomic_write_json
    from msff.engine.train import _resolve_device

    ckpt = Path(args.checkpoint)
    if args.out:
        out = Path(args.out)
    else:
        run = ckpt.parent if ckpt.name == "best" else ckpt
        out = run / f"evaluation_{'+'.join(Path(d).resolve().name for d in args.data)}.json"
    # Refuse to replace results before any work, as predict does.
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it (or --out another file)")
    if out.is_dir():
        raise UsageError(f"{out} is a folder, not a file name for the metrics JSON")
    if args.overlays and Path(args.overlays).is_dir() and any(Path(args.overlays).iterdir()) and not args.overwrite:
        raise UsageError(f"overlay folder {args.overlays} exists and is not empty; pass --overwrite to replace its PNGs")
    if args.batch_size < 1 or args.overlay_count < 0:
        raise UsageError(f"need --batch-size >= 1 and --overlay-count >= 0 (got {args.batch_size}, {args.overlay_count})")
    model, meta = load_checkpoint(ckpt)
    run_dir = ckpt.parent if ckpt.name == "best" else ckpt
    if (run_dir / "status.json").is_file():
        state = json.loads((run_dir / "status.json").read_text()).get("state")
        if state != "complete":
            print(f"msff evaluate: warning: run {run_dir} is {state}, not complete; its best/ is from a partial run",
                  file=sys.stderr)
    norm = meta.get("normalization")
    if not norm:
        raise DataError(f"checkpoint {ckpt} has no normalisation statistics in its metadata")
    opts = {k: v for k, v in vars(args).items()}
    pairs = _pairs(args.data, opts)
    if args.eval_list:
        pairs = select_pairs(pairs, read_list(args.eval_list), args.eval_list)
    if args.mask_color is None and args.mask_threshold is None and not args.ignore_value and meta.get("mask_encoding"):
        me = meta["mask_encoding"]
        enc = MaskEncoding(tuple(me["color"]) if me.get("color") else None, me.get("threshold"), tuple(me.get("ignore_values") or ()))
    else:
        enc = _encoding(opts)
    bands = args.bands if args.bands is not None else meta.get("bands")
    card_stack = meta.get("stack") or {}
    ds = SegmentationDataset(pairs, encoding=enc, bands=bands, normalization=norm,
                             input_scale=args.input_scale or meta.get("input_scale"), dem=args.dem,
                             terrain=args.terrain if args.terrain is not None else (card_stack.get("terrain") or ()),
                             dates=card_stack.get("dates"), extra_rasters=args.extra_raster or ())
    domain = _evaluate_domain(ds, meta, ckpt, args)
    expected = len(norm["mean"])
    if ds.in_channels != expected:
        raise DataError(
            f"checkpoint {ckpt} expects {expected} band(s) but {ds.pairs[0].image} has {ds.in_channels}; "
            "select bands with --bands"
        )
    device = _resolve_device(args.device)
    threshold = args.threshold if args.threshold is not None else float(meta.get("threshold", 0.5))
    t0 = time.time()
    from msff.inference.engine import make_engine

    model = make_engine(model.to(device), args.engine, device, in_channels=ds.in_channels)
    with torch.no_grad():
        m = evaluate(model, ds, args.batch_size, device, threshold, loss=None, progress=True)
    result = {"checkpoint": str(ckpt), "data": [str(d) for d in args.data], "threshold": threshold,
              "seconds": time.time() - t0, **m, "input_scale": ds.input_scale.to_dict(), "domain": domain}
    atomic_write_json(out, result)
    if args.overlays:
        write_overlays(model, ds, args.overlays, args.overlay_count, device, threshold)
    print(json.dumps({k: m[k] for k in ("precision", "recall", "iou", "f1", "image_iou", "image_f1", "boundary_iou",
                                         "boundary_f", "image_boundary_iou", "image_boundary_f", "images")}, indent=2))
    print(f"metrics written to {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from msff.data import SegmentationDataset, find_pairs, split_pairs, write_scene_dataset
    from msff.engine import TrainConfig, fit
    from msff.fileio import make_temp_dir

    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite:
        raise UsageError(f"output folder {out} exists and is not empty; pass --overwrite to replace it")
    t0 = time.time()
    staging = None
    if args.data:
        data_root = Path(args.data)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = make_temp_dir(out.parent / "msff-demo-scenes")  # the umask's folder mode
        print(f"msff demo: building {args.scenes} synthetic {args.size}×{args.size} landslide scenes …")
        data_root = write_scene_dataset(staging, args.scenes, args.size, seed=args.seed)
    try:
        train, val, _ = split_pairs(find_pairs(data_root), 0.2, 0.0, args.seed)
        train_ds, val_ds = SegmentationDataset(train), SegmentationDataset(val)
        # CPU-sized MSFFNet (all of its parts, narrow and with a 7×7 large kernel) and a learning rate
        # raised from the paper's 1e-4 because the demo has only a few hundred steps.
        cfg = TrainConfig(
            preset="tiny", epochs=args.epochs, batch_size=8, lr=1e-3, crop=None if args.data is None else 128,
            early_stopping=10, plateau_patience=4, time_budget_s=args.time_budget, seed=args.seed,
            device="cpu", overlays=6, eval_batch_size=8,
        )
        print(f"msff demo: training MSFFNet (preset tiny) on {len(train_ds)} scenes, validating on {len(val_ds)}, "
              f"budget {args.time_budget:.0f} s …")
        res = fit(cfg, train_ds, val_ds, out, overwrite=args.overwrite, progress=not args.no_progress,
                  extra_metadata={"data": {"demo": str(args.data or "synthetic scenes"), "seed": args.seed}})
        if staging is not None:
            shutil.move(str(staging), str(out / "scenes"))
            staging = None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    _print_metrics(f"validation (best epoch {res['best_epoch']} of {res['epochs_run']})", res["best"])
    from msff.inference.demo import map_demo_scene

    print("msff demo: mapping a synthetic georeferenced scene (GeoTIFF, EPSG:32654, nodata border) with best/ …")
    mp = map_demo_scene(out / "best", out / "map", seed=args.seed, chip=args.size if not args.data else 96,
                        progress=not args.no_progress)
    for w in mp["warnings"]:
        print(f"msff demo: warning: {w}", file=sys.stderr)
    print(f"mapped {mp['width']}x{mp['height']} px ({mp['crs']}) in {mp['tiles']} tiles: {mp['polygon_count']} landslide "
          f"polygons, {mp['landslide_area_m2'] / 1e4:.2f} ha; IoU with the true mask {_fmt(mp['iou'])}")
    print(f"done in {time.time() - t0:.0f} s. Outputs in {out}/:\n"
          f"  metrics.json    validation metrics of the best model\n"
          f"  curves.png      training curves\n"
          f"  overlays/       image | ground truth | prediction PNGs\n"
          f"  best/           the checkpoint (msff evaluate {out / 'best'} DATA, msff predict …)\n"
          f"  log.csv         per-epoch log"
          + ("\n  scenes/         the synthetic scenes (images/, masks/)" if not args.data else "")
          + f"\n  map/            the mapped scene:\n"
          f"    {mp['scene']}  input GeoTIFF\n"
          f"    {mp['prob']}  probability COG (float32, NaN nodata)\n"
          f"    {mp['mask']}  mask COG (1 landslide, 0 background, 255 nodata)\n"
          f"    {mp['polygons']}  polygons with area_m2\n"
          f"    {mp['quicklook']}  quick-look PNG\n"
          f"    {mp['run']}  run sidecar (domain check, counts)")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``msff`` console script. Returns the exit status.

    Errors in the input (missing or unpaired files, unknown mask encodings, size or band mismatches,
    NaNs, empty datasets, run-folder conflicts) end with one ``msff: error: …`` line and status 2.
    """
    from msff.data import DataError
    from msff.engine import RunError
    from msff.fileio import DiskFullError

    try:
        from msff.models import CheckpointError
    except ImportError:  # pragma: no cover
        CheckpointError = ValueError  # type: ignore[misc,assignment]
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (DataError, RunError, CheckpointError, UsageError, FileNotFoundError, DiskFullError) as e:
        print(f"msff: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"msff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("msff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
