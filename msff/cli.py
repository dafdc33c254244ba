"""The ``msff`` command: ``train``, ``evaluate``, ``predict``, ``experiment``, ``demo`` (and ``erf``).

Every command's options are the fields of its typed configs in :mod:`msff.config`
(:data:`msff.config.COMMANDS`); the command line is generated from them with jsonargparse: the
field's type hint types the option, its docstring line is the help. Each option is spelt
``--batch-size`` and ``--batch_size``; a config file (``--config FILE``, JSON or YAML, or a shipped
name) holds the same names as keys and is overridden by the command line; ``--print_config``
prints the resolved options as YAML (a valid config file) and exits. A value of the wrong type is
one line naming the key, exit status 2.

Examples::

    msff demo --out demo_out
    msff train data/bijie_landslide --out runs/bijie --preset cpu --crop 256 --epochs 30
    msff train data/sichuan_landslide --config realdata-cpu --out runs/sichuan
    msff train data/sichuan_landslide --config realdata-cpu --epochs 5 --print_config > my.yaml
    msff evaluate runs/bijie data/bijie_holdout
    msff experiment cpu --out runs/experiment_cpu
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import time
import typing
from pathlib import Path
from typing import Any, Optional, Sequence

from msff.config import (
    COMMANDS,
    ConfigError,
    DataConfig,
    DemoConfig,
    EvaluateConfig,
    ExperimentConfig,
    ExperimentRunConfig,
    PredictConfig,
    RunConfig,
    SplitConfig,
    TrainConfig,
    build_configs,
    check_command_values,
    load_config_file,
    shipped_configs,
)

__all__ = ["main", "build_parser", "build_command_parser", "parse_command", "train", "evaluate", "demo",
           "experiment", "build_datasets"]

CONFIG_DIR = Path(__file__).parent / "configs"
HELP = {
    "train": "train a model on landslide datasets",
    "evaluate": "evaluate a checkpoint on labelled data",
    "predict": "whole-scene prediction from GeoTIFFs (seamless tiling, COG outputs, polygons)",
    "experiment": "train and compare models under one protocol, several seeds; write a results table",
    "demo": "train, evaluate and map a scene with a CPU-sized MSFFNet on built-in synthetic data (~3 min)",
}
DESCRIPTION = {
    "train": "Train on one or more DATA folders (images + masks). Defaults are the paper's recipe (BCE, Adam "
             "lr 1e-4 wd 1e-6, ReduceLROnPlateau 0.1, early stopping, 150 epochs, batch 32). Options override "
             "a --config file, which overrides the defaults. The data is checked completely before the run "
             "folder is created.",
    "evaluate": "Precision, recall, IoU, F1 (micro over all pixels, and per-image means) of a checkpoint on DATA "
                "folders; printed and written as JSON. The checkpoint's normalisation, bands and mask encoding "
                "are used unless overridden.",
    "experiment": "Run a comparison experiment: every listed model, every seed, one protocol. Resumable: "
                  "finished runs are skipped, interrupted ones continue.",
    "demo": "Builds a small synthetic landslide scene set (or uses --data), trains a CPU-sized MSFFNet for a few "
            "minutes, evaluates it and writes metrics.json, curves.png, overlays/*.png and the checkpoint best/ "
            "into OUT, then maps a synthetic georeferenced GeoTIFF scene with it (map/: probability and mask "
            "COGs, polygons, quick-look, run sidecar). An existing, non-empty OUT is refused unless "
            "--overwrite is given (it is then replaced).",
}


class UsageError(ValueError):
    """A command-line or config-file mistake."""


# ---- the command line, generated from the typed configs -----------------------------------------
# jsonargparse validates the parsed values again with the same converter: each converter accepts its
# own output (a number, a list) as well as the command-line text.
def _duration(s) -> float:
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return float(s)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([smh]?)\s*", str(s))
    if not m:
        raise argparse.ArgumentTypeError(f"expected a duration like 900, 900s, 15m or 1h, got {s!r}")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _comma_list(elem: type, auto: bool):
    def parse(s):
        if s is None or isinstance(s, list):
            return s
        if auto and s.strip().lower() in ("auto", "null", "none"):
            return None
        if s.strip().startswith("["):  # the YAML/JSON form, as --print_config writes it
            try:
                vals = json.loads(s)
            except json.JSONDecodeError:
                raise argparse.ArgumentTypeError(f"expected a list like [4, 3, 2], got {s!r}") from None
        else:
            vals = [v.strip() for v in s.split(",") if v.strip()]
        try:
            return [elem(v) for v in vals]
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected comma-separated {elem.__name__} values, got {s!r}") from None

    parse.__name__ = f"comma-separated {elem.__name__}"
    return parse


def _plain(elem: type):
    """A plain argparse converter (jsonargparse would apply a type hint to the whole appended list)."""
    def convert(s):
        if isinstance(s, list):
            return [convert(v) for v in s]
        try:
            return elem(s)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {elem.__name__}, got {s!r}") from None

    convert.__name__ = elem.__name__
    return convert


def _strip_optional(hint):
    args = typing.get_args(hint)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
    return hint


def _elem(hint) -> type:
    inner = _strip_optional(hint)
    while typing.get_origin(inner) is list:
        inner = typing.get_args(inner)[0]
    return inner


def _add_config_arguments(parser, cls: type, title: str) -> None:
    """Add one option per field of dataclass ``cls`` (positional where the field says so)."""
    import docstring_parser

    docs = {p.arg_name: " ".join((p.description or "").split()) for p in docstring_parser.parse(cls.__doc__).params}
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(title)
    for f in dataclasses.fields(cls):
        cli = f.metadata.get("cli", {})
        hint, name = hints[f.name], f.name
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        helptext = docs.get(name, "").replace("%", "%%")
        if cli.get("positional"):
            many = typing.get_origin(_strip_optional(hint)) is list
            parser.add_argument(name, metavar=name.upper(), nargs="*" if many else None, type=str, help=helptext,
                                **({"default": default} if many else {}))
            continue
        flags = [f"--{name.replace('_', '-')}"] + ([f"--{name}"] if "_" in name else []) + list(cli.get("flags", ()))
        kw: dict[str, Any] = dict(dest=name, default=default, help=helptext)
        inner = _strip_optional(hint)
        if inner is bool:
            kw.update(type=bool, nargs="?", const=True)
        elif cli.get("comma"):
            kw.update(type=_comma_list(_elem(hint), cli.get("auto", False)), metavar="A,B,…")
        elif cli.get("nargs") and cli.get("append"):
            kw.update(nargs=cli["nargs"], action="append", type=_plain(str), default=None)
        elif cli.get("nargs"):
            kw.update(nargs=cli["nargs"], type=_elem(hint))
        elif cli.get("append"):
            kw.update(action="append", type=_plain(_elem(hint)), default=None)
        elif cli.get("kind") == "duration":
            kw.update(type=_duration, metavar="SECONDS|15m|1h")
        else:
            kw.update(type=hint)  # jsonargparse checks the value against the type hint
        group.add_argument(*flags, **kw)
        if cli.get("negate"):
            group.add_argument(cli["negate"], dest=name, action="store_const", const=False, default=argparse.SUPPRESS,
                               help=f"set {name} to false")


def build_command_parser(command: str, prog: Optional[str] = None):
    """The jsonargparse parser of one ``msff`` command, generated from its typed configs."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(prog=prog or f"msff {command}", description=DESCRIPTION.get(command, HELP[command]),
                            exit_on_error=False)
    parser.add_argument("-c", "--config", action="append", default=None, metavar="FILE",
                        help="config file (JSON or YAML; keys are the option names) or a shipped name "
                             f"({', '.join(shipped_configs()) or 'none'}); repeatable, later files win; "
                             "options given here override it")
    parser.add_argument("--print_config", "--print-config", action="store_true",
                        help="print the resolved options as YAML (a valid --config file) and exit")
    for cls in COMMANDS[command]:
        _add_config_arguments(parser, cls, cls.__doc__.splitlines()[0].rstrip("."))
    return parser


def _one_line(command: str, err: Exception) -> str:
    """A jsonargparse error as one line naming the key."""
    text = str(err)
    m = re.match(r'Parser key "([\w.]+)":', text)
    if m:
        key = m.group(1)
        owners = {f.name: cls for cls in COMMANDS[command] for f in dataclasses.fields(cls)}
        got = re.findall(r"(?:Given|Got) value: (.*)", text)
        if key in owners:
            from msff.config import describe_type

            kind = describe_type(typing.get_type_hints(owners[key])[key])
            return f"option {key!r} (--{key.replace('_', '-')}) must be {kind}, got {got[-1] if got else '?'!r}"
    return " ".join(text.split())


def _split_config_args(argv: Sequence[str]) -> tuple[list[str], bool, list[str]]:
    """(config file names, --print_config given, the other arguments): the files are read here,
    strictly, not by argparse."""
    files, rest, show, it = [], [], False, iter(argv)
    for a in it:
        if a in ("--print_config", "--print-config"):
            show = True
        elif a in ("-c", "--config"):
            v = next(it, None)
            if v is None:
                raise UsageError(f"{a} needs a FILE")
            files.append(v)
        elif a.startswith("--config="):
            files.append(a.split("=", 1)[1])
        else:
            rest.append(a)
    return files, show, rest


def parse_command(command: str, argv: Sequence[str], prog: Optional[str] = None) -> Optional[dict[type, Any]]:
    """Parse ``argv`` of one command into its typed configs (None after ``--print_config``).

    Config files are read and type-checked strictly first (``{"crop": "64"}`` is refused); the
    command line overrides them; each config then validates itself.

    Raises:
        UsageError, ConfigError: one line naming the option or file.
    """
    from jsonargparse import ArgumentError

    parser = build_command_parser(command, prog)
    files, show, rest = _split_config_args(argv)
    for name in files:
        values, path = load_config_file(name)
        check_command_values(command, values, source=str(path))
        parser.set_defaults(**values)
    try:
        ns = parser.parse_args(rest)
    except (ArgumentError, argparse.ArgumentTypeError) as e:
        raise UsageError(_one_line(command, e)) from None
    values = {k: v for k, v in vars(ns).items() if k not in ("config", "print_config")}
    for cls in COMMANDS[command]:  # flags that append (--ignore-value) start from the file's / default list
        for f in dataclasses.fields(cls):
            if values.get(f.name) is None and f.default_factory is not dataclasses.MISSING:
                values[f.name] = f.default_factory()
    configs = build_configs(command, values)
    if show:
        import yaml

        print(yaml.safe_dump(values, sort_keys=False, allow_unicode=True), end="")
        return None
    return configs


# ---- data assembly ------------------------------------------------------------------------------
def _encoding(data: DataConfig):
    from msff.data import MaskEncoding

    return MaskEncoding(
        color=tuple(data.mask_color) if data.mask_color else None,
        threshold=data.mask_threshold,
        ignore_values=tuple(data.ignore_value),
    )


def _pairs(folders: Sequence[str], data: DataConfig):
    from msff.data import find_pairs

    pairs = []
    for f in folders:
        pairs += find_pairs(f, data.image_dir, data.mask_dir, data.pair)
    return pairs


def build_datasets(data: DataConfig, split: SplitConfig):
    """(train, val, test) :class:`~msff.data.SegmentationDataset` of a data and a split config."""
    from msff.data import DataError, SegmentationDataset, read_list, select_pairs, split_pairs

    if not data.data:
        raise UsageError("no training data: give DATA folder(s) (or 'data' in the config file)")
    pairs = _pairs(data.data, data)
    if split.train_list:
        train = select_pairs(pairs, read_list(split.train_list), split.train_list)
        val = select_pairs(pairs, read_list(split.val_list), split.val_list) if split.val_list else []
        test = select_pairs(pairs, read_list(split.test_list), split.test_list) if split.test_list else []
        overlap = {p.image for p in train} & {p.image for p in val + test}
        if overlap:
            raise DataError(f"split lists overlap: {sorted(str(p) for p in overlap)[:3]} are in train and val/test")
    elif split.val:
        train, val, test = pairs, _pairs(split.val, data), []
        if split.test_ratio:
            train, _, test = split_pairs(train, 0.0, split.test_ratio, split.split_seed)
    else:
        train, val, test = split_pairs(pairs, split.val_ratio, split.test_ratio, split.split_seed)
    if split.test:
        test = test + _pairs(split.test, data)
    kw = dict(encoding=_encoding(data), bands=data.bands, cache=data.cache, input_scale=data.input_scale,
              dem=data.dem, terrain=data.terrain, dates=data.dates, extra_rasters=data.extra_raster)
    train_ds = SegmentationDataset(train, **kw)
    val_ds = SegmentationDataset(val, **kw) if val else None
    test_ds = SegmentationDataset(test, **kw) if test else None
    return train_ds, val_ds, test_ds


def _fmt(v: float) -> str:
    return "nan" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def _print_metrics(title: str, m: dict) -> None:
    print(f"{title}: precision {_fmt(m['precision'])}  recall {_fmt(m['recall'])}  IoU {_fmt(m['iou'])}  "
          f"F1 {_fmt(m['f1'])}  Boundary IoU {_fmt(m.get('boundary_iou'))}  boundary F {_fmt(m.get('boundary_f'))}   "
          f"(per-image mean IoU {_fmt(m.get('image_iou'))}, F1 {_fmt(m.get('image_f1'))}; "
          f"{m.get('images', '?')} images)")


# ---- commands: config objects -> one library call -> print -------------------------------------
def train(data: DataConfig, split: SplitConfig, config: TrainConfig, run: RunConfig) -> int:
    """``msff train``: build the datasets, :func:`msff.engine.fit_runs`, print the results."""
    from msff.engine import fit_runs

    if not run.out:
        raise UsageError("give the run folder with --out RUN_DIR")
    shortcuts = {k: getattr(run, k) for k in ("kernel_size", "lkam_blocks") if getattr(run, k) is not None}
    if shortcuts:
        config = dataclasses.replace(config, model_kwargs={**config.model_kwargs, **shortcuts})
    out = Path(run.out)
    if out.exists() and any(out.iterdir()) and not (run.overwrite or run.resume):
        raise UsageError(f"run folder {out} exists and is not empty; use --overwrite to replace it or --resume to continue it")
    train_ds, val_ds, test_ds = build_datasets(data, split)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:
        print(f"msff train: {len(train_ds)} training, {len(val_ds) if val_ds else 0} validation, "
              f"{len(test_ds) if test_ds else 0} test images; {train_ds.in_channels} bands; run folder {out}")
    sources = {"data": data.data, "val": split.val, "test": split.test, "val_ratio": split.val_ratio,
               "test_ratio": split.test_ratio, "split_seed": split.split_seed}
    extra = {"data": {k: v for k, v in sources.items() if v is not None},
             "splits": {"train": [p.name for p in train_ds.pairs], "val": [p.name for p in val_ds.pairs] if val_ds else [],
                        "test": [p.name for p in test_ds.pairs] if test_ds else []}}
    res = fit_runs(config, train_ds, val_ds, out, runs=run.runs, overwrite=run.overwrite, resume=run.resume,
                   test_ds=test_ds, progress=run.progress, extra_metadata=extra)
    if not rank0:
        return 0
    for i, r in enumerate(res["runs"]):
        tag = f"run {i} (seed {res['seeds'][i]})" if run.runs > 1 else "best"
        if "best" in r:
            _print_metrics(f"{tag} validation @ epoch {r['best_epoch']}", r["best"])
        if "test" in r:
            _print_metrics(f"{tag} test", r["test"])
    if run.runs > 1:
        for k, v in res["summary"].items():
            print(f"  {k}: {_fmt(v['mean'])} ± {_fmt(v['std'])} (n={v['n']})")
        print(f"summary: {out / 'summary.json'}")
    else:
        r = res["runs"][0]
        print(f"stopped: {r['stopped']} after {r['epochs_run']} epochs, {r['seconds']:.0f} s")
        print(f"checkpoint: {out / 'best'}\nmetrics: {out / 'metrics.json'}\nlog: {out / 'log.csv'}\n"
              f"curves: {out / 'curves.png'}\noverlays: {out / 'overlays'}")
    return 0


def _evaluate_domain(ds, card, data: DataConfig, strict: bool) -> dict:
    """Input domain check of evaluation data against the checkpoint's training statistics
    (msff.data.domain): a warning naming bands and numbers, an error under --strict."""
    from msff.data.dataset import sample_pixels
    from msff.data.domain import DomainError, compare_domain

    samples, dtypes = sample_pixels(ds, 65536)
    if ds.input_scale.needs_fit:
        ds.input_scale = ds.input_scale.fit(samples, "evaluation data")
    report = compare_domain(card, samples, dtypes, ds.input_scale, None, " + ".join(data.data))
    if not report.ok:
        if strict:
            raise DomainError(report.message(strict_hint=False) + " (refused under --strict)")
        print(f"msff evaluate: warning: {report.message()}", file=sys.stderr)
    return report.to_dict()


def evaluate(ev: EvaluateConfig, data: DataConfig) -> int:
    """``msff evaluate``: metrics of a checkpoint on labelled data, written as JSON."""
    import torch

    from msff.data import DataError, SegmentationDataset, read_list, select_pairs
    from msff.engine import evaluate as evaluate_model
    from msff.engine import load_checkpoint, write_overlays
    from msff.engine.report import atomic_write_json
    from msff.engine.train import _resolve_device

    if not data.data:
        raise UsageError("give the DATA folder(s) to evaluate on after CHECKPOINT")
    ckpt = Path(ev.checkpoint)
    run_dir = ckpt.parent if ckpt.name == "best" else ckpt
    out = Path(ev.out) if ev.out else run_dir / f"evaluation_{'+'.join(Path(d).resolve().name for d in data.data)}.json"
    # Refuse to replace results before any work, as predict does.
    if out.exists() and not ev.overwrite:
        raise UsageError(f"{out} already exists; pass --overwrite to replace it (or --out another file)")
    if out.is_dir():
        raise UsageError(f"{out} is a folder, not a file name for the metrics JSON")
    if ev.overlays and Path(ev.overlays).is_dir() and any(Path(ev.overlays).iterdir()) and not ev.overwrite:
        raise UsageError(f"overlay folder {ev.overlays} exists and is not empty; pass --overwrite to replace its PNGs")
    model, _ = load_checkpoint(ckpt)
    card = model.card  # the typed ModelCard (msff.models.card); load_checkpoint always sets its model_name
    if (run_dir / "status.json").is_file():
        state = json.loads((run_dir / "status.json").read_text()).get("state")
        if state != "complete":
            print(f"msff evaluate: warning: run {run_dir} is {state}, not complete; its best/ is from a partial run",
                  file=sys.stderr)
    norm = card.normalization
    if norm is None:
        raise DataError(f"checkpoint {ckpt} has no normalisation statistics in its metadata")
    pairs = _pairs(data.data, data)
    if ev.eval_list:
        pairs = select_pairs(pairs, read_list(ev.eval_list), ev.eval_list)
    if data.mask_color is None and data.mask_threshold is None and not data.ignore_value and card.mask_encoding is not None:
        enc = card.mask_encoding.to_encoding()
    else:
        enc = _encoding(data)
    stack = card.stack or {}
    ds = SegmentationDataset(pairs, encoding=enc, bands=data.bands if data.bands is not None else card.bands,
                             normalization=norm.to_dict(), input_scale=data.input_scale or card.scale, dem=data.dem,
                             terrain=data.terrain or stack.get("terrain") or (), dates=stack.get("dates"),
                             extra_rasters=data.extra_raster)
    domain = _evaluate_domain(ds, card, data, ev.strict)
    expected = norm.bands
    if ds.in_channels != expected:
        raise DataError(f"checkpoint {ckpt} expects {expected} band(s) but {ds.pairs[0].image} has {ds.in_channels}; "
                        "select bands with --bands")
    device = _resolve_device(ev.device)
    threshold = ev.threshold if ev.threshold is not None else card.threshold
    t0 = time.time()
    from msff.inference.engine import make_engine

    model = make_engine(model.to(device), ev.engine, device, in_channels=ds.in_channels)
    with torch.no_grad():
        m = evaluate_model(model, ds, ev.batch_size, device, threshold, loss=None, progress=True)
    result = {"checkpoint": str(ckpt), "data": list(data.data), "threshold": threshold,
              "seconds": time.time() - t0, **m, "input_scale": ds.input_scale.to_dict(), "domain": domain}
    atomic_write_json(out, result)
    if ev.overlays:
        write_overlays(model, ds, ev.overlays, ev.overlay_count, device, threshold)
    print(json.dumps({k: m[k] for k in ("precision", "recall", "iou", "f1", "image_iou", "image_f1", "boundary_iou",
                                         "boundary_f", "image_boundary_iou", "image_boundary_f", "images")}, indent=2))
    print(f"metrics written to {out}")
    return 0


def demo(cfg: DemoConfig) -> int:
    """``msff demo``: synthetic scenes -> a tiny MSFFNet (:func:`msff.engine.fit`) -> a mapped scene."""
    from msff.data import SegmentationDataset, find_pairs, split_pairs, write_scene_dataset
    from msff.engine import fit
    from msff.fileio import make_temp_dir

    out = Path(cfg.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not cfg.overwrite:
        raise UsageError(f"output folder {out} exists and is not empty; pass --overwrite to replace it")
    t0 = time.time()
    staging = None
    if cfg.data:
        data_root = Path(cfg.data)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = make_temp_dir(out.parent / "msff-demo-scenes")  # the umask's folder mode
        print(f"msff demo: building {cfg.scenes} synthetic {cfg.size}×{cfg.size} landslide scenes …")
        data_root = write_scene_dataset(staging, cfg.scenes, cfg.size, seed=cfg.seed)
    try:
        train_pairs, val_pairs, _ = split_pairs(find_pairs(data_root), 0.2, 0.0, cfg.seed)
        train_ds, val_ds = SegmentationDataset(train_pairs), SegmentationDataset(val_pairs)
        # The shipped `demo` training config: a CPU-sized MSFFNet (all of its parts, narrow, 7×7 large
        # kernel) and lr 1e-3 (not the paper's 1e-4) because the demo has only a few hundred steps.
        recipe = {k: v for k, v in load_config_file("demo")[0].items() if k in TrainConfig.__dataclass_fields__}
        tc = TrainConfig.from_dict(dict(recipe, epochs=cfg.epochs, crop=None if cfg.data is None else 128,
                                        time_budget_s=cfg.time_budget, seed=cfg.seed))
        print(f"msff demo: training MSFFNet (preset {tc.preset}) on {len(train_ds)} scenes, validating on "
              f"{len(val_ds)}, budget {cfg.time_budget:.0f} s …")
        res = fit(tc, train_ds, val_ds, out, overwrite=cfg.overwrite, progress=cfg.progress,
                  extra_metadata={"data": {"demo": str(cfg.data or "synthetic scenes"), "seed": cfg.seed}})
        if staging is not None:
            shutil.move(str(staging), str(out / "scenes"))
            staging = None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    _print_metrics(f"validation (best epoch {res['best_epoch']} of {res['epochs_run']})", res["best"])
    from msff.inference.demo import map_demo_scene

    print("msff demo: mapping a synthetic georeferenced scene (GeoTIFF, EPSG:32654, nodata border) with best/ …")
    mp = map_demo_scene(out / "best", out / "map", seed=cfg.seed, chip=cfg.size if not cfg.data else 96,
                        progress=cfg.progress)
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
          + ("\n  scenes/         the synthetic scenes (images/, masks/)" if not cfg.data else "")
          + f"\n  map/            the mapped scene:\n"
          f"    {mp['scene']}  input GeoTIFF\n"
          f"    {mp['prob']}  probability COG (float32, NaN nodata)\n"
          f"    {mp['mask']}  mask COG (1 landslide, 0 background, 255 nodata)\n"
          f"    {mp['polygons']}  polygons with area_m2\n"
          f"    {mp['quicklook']}  quick-look PNG\n"
          f"    {mp['run']}  run sidecar (domain check, counts)")
    return 0


def experiment(cfg: ExperimentRunConfig) -> int:
    """``msff experiment``: :func:`msff.engine.experiment.run_experiment_config` on a validated
    :class:`~msff.config.ExperimentConfig`; prints the results table. Exit 1 if a run failed."""
    import logging

    from msff.engine.experiment import describe_plan, run_experiment_config

    spec = ExperimentConfig.from_file(cfg.experiment).to_dict()
    if cfg.dry_run:
        print(describe_plan(spec, cfg.models, cfg.seeds))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = run_experiment_config(spec, cfg.out, resume=cfg.resume, data_root=cfg.data_root, models=cfg.models,
                                seeds=cfg.seeds, progress=cfg.progress)
    print((Path(cfg.out) / "results.md").read_text())
    print(f"{len(out['runs'])} runs ({out['skipped']} already done); results in {cfg.out}")
    for f in out["failed"]:
        print(f"FAILED: {f['model']} seed {f['seed']}: {f['error']}")
    return 1 if out["failed"] else 0


def _predict(cfg: PredictConfig) -> int:
    from msff.inference.cli import run_predict

    return run_predict(cfg)


RUNNERS = {
    "train": lambda c: train(c[DataConfig], c[SplitConfig], c[TrainConfig], c[RunConfig]),
    "evaluate": lambda c: evaluate(c[EvaluateConfig], c[DataConfig]),
    "predict": lambda c: _predict(c[PredictConfig]),
    "experiment": lambda c: experiment(c[ExperimentRunConfig]),
    "demo": lambda c: demo(c[DemoConfig]),
}


# ---- the top-level parser (help, version, and the argparse-based `erf`) -------------------------
OPTIONAL_PACKAGES = ("onnxruntime", "onnx", "onnxscript", "pyogrio", "torchvision", "segmentation_models_pytorch",
                     "tensorboard", "scipy")
"""Third-party packages whose absence makes a command unavailable (any other import error is a bug)."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level ``msff`` parser: ``--version``, the list of commands, and ``erf``. The typed
    commands parse their own options (:func:`build_command_parser`)."""
    from msff import __version__ as version

    parser = argparse.ArgumentParser(prog="msff", description="MSFFNet landslide segmentation (Yi & Tan 2025): "
                                     "train, evaluate, predict, experiment, demo. `msff COMMAND --help` for options.")
    parser.add_argument("--version", action="version", version=f"msff {version}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        p = sub.add_parser(name, help=HELP[name], add_help=False, prefix_chars="\0")
        p.add_argument("argv", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda args, _n=name: run_command(_n, args.argv))
    _add_optional(sub, "erf", "msff.analysis.erf", "add_erf_parser", "run_erf",
                  "effective receptive field of each encoder stage")
    return parser


def _add_optional(sub, name: str, module: str, add_fn: str, run_fn: str, what: str) -> None:
    """Register an argparse-based command from ``module``; it is listed as unavailable only when
    an optional third-party package (:data:`OPTIONAL_PACKAGES`) is missing. Any other error while
    importing msff's own module is a bug and propagates."""
    import importlib

    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        missing = (exc.name or "").split(".")[0]
        if missing not in OPTIONAL_PACKAGES:
            raise
        reason = f"needs the optional package {missing} ({exc})"
        p = sub.add_parser(name, help=f"{what} (unavailable: {reason})", add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=lambda args, _r=reason: _unavailable(name, module, _r))
        return
    getattr(mod, add_fn)(sub)
    sub.choices[name].set_defaults(func=getattr(mod, run_fn))


def _unavailable(name: str, module: str, reason: str) -> int:
    print(f"msff {name}: not available in this installation ({module}: {reason})", file=sys.stderr)
    return 2


def run_command(command: str, argv: Sequence[str]) -> int:
    """Parse ``argv`` of a typed command and run it (errors propagate to :func:`main`)."""
    configs = parse_command(command, argv)
    return 0 if configs is None else int(RUNNERS[command](configs) or 0)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``msff`` console script. Returns the exit status.

    Errors in the input (a mistyped option or config key, missing or unpaired files, unknown mask
    encodings, size or band mismatches, NaNs, empty datasets, run-folder conflicts) end with one
    ``msff: error: …`` line and status 2.
    """
    from msff.data import DataError
    from msff.engine import RunError
    from msff.fileio import DiskFullError
    from msff.models import CheckpointError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in COMMANDS:
            return run_command(argv[0], argv[1:])
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except (DataError, RunError, CheckpointError, UsageError, ConfigError, FileNotFoundError, DiskFullError,
            ValueError) as e:
        print(f"msff: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("msff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
