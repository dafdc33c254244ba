"""Comparison experiments: many networks, one protocol, many seeds, one results table.

An experiment config (JSON or YAML, validated by :class:`msff.config.ExperimentConfig`; shipped:
``paper``, ``cpu`` and ``cpu-long`` in ``msff/configs/experiment_*.json``) lists the datasets, a fixed train/val/test split, the models (zoo names, see
:mod:`msff.models.zoo`), the seeds, and one set of training options (:class:`TrainConfig`
fields) that every run shares: the same split, crops, augmentation, loss, optimiser and budget
(epochs or wall time). Only the network and the seed change between runs.

Each (model, seed) run trains with :func:`msff.engine.train.fit` into
``OUT/runs/<model>/seed_<seed>/`` and is then evaluated on the test split of every dataset
(whole images) into ``OUT/runs/<model>/seed_<seed>.json``. The experiment is resumable: runs with
a result file are skipped, interrupted runs continue from their last epoch (with the wall
budget they had left), finished-but-unevaluated runs are evaluated.

Outputs in ``OUT``: ``experiment_config.json`` (resolved config), ``split.json`` (the image names
of every split), ``results.json`` (every run, and per model mean ± sample std), ``results.csv``,
``results.md`` (the table), ``results.png`` (bar chart with error bars = std over seeds).

Config keys::

    {
      "name": "cpu", "description": "...",
      "data_root": "../shared/data",           # relative to the working directory
      "datasets": {"bijie": "bijie_landslide", ...},   # label -> folder under data_root
      "split": {"val_ratio": 0.0, "test_ratio": 0.2, "seed": 0},   # per dataset
      "models": ["msffnet", {"name": "unet", "kwargs": {...}}, ...],
      "reference": "msffnet",                  # the row others are compared with
      "seeds": [0, 1, 2],
      "select": "last",                         # evaluate the last or the best (val IoU) weights
      "soil_proxy": {"red": 1, "green": 2, "blue": 3, "nir": null},   # 1-based input bands of the
                                               # soil-like proxy (msff.analysis.confusable); default
                                               # RGB = bands 1-3 for 3-band data, else off; null: off
      "train": {TrainConfig fields shared by every run}
    }

Metrics per run (test split, whole images): region (precision, recall, IoU, F1), boundary
(Boundary IoU at 0.02 × diagonal, boundary F at 2 px; :mod:`msff.engine.metrics`), and the
false-positive rate on soil-like background (``soil_fp_rate``) beside the overall background
false-positive rate. All are micro over the test pixels of all datasets, from summed counts.

**Paired design.** Every model runs with the same seeds, and a seed fixes the weight
initialisation *and* the training data (the crops, augmentation draws and their order depend
only on the seed, never on the model; each run records a digest of them, ``data_order``). So
the comparison with the reference is paired by seed: :func:`msff.engine.stats.paired_test` (paired t-test on the
per-seed differences, 95 % confidence interval, effect size d_z) and :func:`msff.engine.stats.seeds_for_power`
(how many seeds would detect a given difference at the observed spread of the differences).

Example:
    >>> from msff.engine.experiment import run_experiment_config
    >>> res = run_experiment_config("cpu", "runs/experiment_cpu")        # doctest: +SKIP
    >>> res["summary"]["unet"]["iou"]                                     # doctest: +SKIP
    {'mean': 0.41, 'std': 0.03, 'n': 3}
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from msff.config import ExperimentConfig, shipped_configs
from msff.data import (
    MaskEncoding,
    SegmentationDataModule,
    SegmentationDataset,
    find_pairs,
    split_pairs,
)
from msff.data.discover import Pair
from msff.engine.experiment_report import (
    BOUNDARY_METRICS,
    CONFUSABLE_METRICS,
    METRICS,
    PAIRED_METRICS,
    paired_comparisons,
    summarize,
    write_reports,
)
from msff.engine.metrics import micro_metrics
from msff.engine.report import atomic_write_json
from msff.engine.stats import (
    minimum_detectable_difference,
    paired_test,
    seeds_for_power,
    t_quantile,
    welch_test,
)
from msff.engine.train import STATE_NAME, TrainConfig, build_model, evaluate, fit, load_checkpoint

__all__ = [
    "describe_plan",
    "load_experiment_config",
    "run_experiment_config",
    "run_dir",
    "data_order_digest",
    "SHIPPED_CONFIGS",
    # aggregation, reports and statistics live in experiment_report / stats; re-exported here
    "summarize",
    "paired_comparisons",
    "write_reports",
    "paired_test",
    "welch_test",
    "t_quantile",
    "seeds_for_power",
    "minimum_detectable_difference",
    "PAIRED_METRICS",
]

log = logging.getLogger("msff.experiment")

SHIPPED_CONFIGS = tuple(shipped_configs("experiment_"))
_COUNT_KEYS = ("tp", "fp", "fn", "tn", "biou_inter", "biou_union", "bf_pred_matched", "bf_pred", "bf_gt_matched",
               "bf_gt", "soil_fp", "soil_bg", "soil_landslide", "landslide")


# ---- config -------------------------------------------------------------------------------------
def load_experiment_config(config: str | os.PathLike | dict) -> dict:
    """Read and validate an experiment config (:class:`msff.config.ExperimentConfig`, the one schema).

    Args:
        config: a dict, a JSON/YAML file path, or a shipped name (``"paper"``, ``"cpu"``).

    Returns:
        The config with defaults filled in and ``models`` normalised to
        ``[{"name": ..., "kwargs": {...}, "label": ...}]``.

    Raises:
        msff.config.ConfigError (a ValueError): one line naming the key (unknown keys, models or
        training options, wrong types), or a file that is neither found nor shipped.

    Example:
        >>> cfg = load_experiment_config("cpu")
        >>> cfg["train"]["crop"], len(cfg["seeds"]) >= 3
        (256, True)
    """
    if isinstance(config, dict):
        return ExperimentConfig.from_dict(copy.deepcopy(config)).to_dict()
    return ExperimentConfig.from_file(config).to_dict()


def run_dir(out_dir: str | os.PathLike, label: str, seed: int) -> Path:
    """Folder of one (model, seed) training run: ``out_dir/runs/<label>/seed_<seed>``."""
    return Path(out_dir) / "runs" / label / f"seed_{seed}"


def _result_path(out_dir: Path, label: str, seed: int) -> Path:
    return Path(out_dir) / "runs" / label / f"seed_{seed}.json"


# ---- data ---------------------------------------------------------------------------------------
def _encoding(cfg: dict) -> MaskEncoding:
    me = cfg.get("mask_encoding") or {}
    return MaskEncoding(tuple(me["color"]) if me.get("color") else None, me.get("threshold"),
                        tuple(me.get("ignore_values") or ()))


def _make_split(cfg: dict, data_root: Path) -> dict[str, dict[str, list[Pair]]]:
    s = cfg["split"]
    split: dict[str, dict[str, list[Pair]]] = {}
    for label, folder in cfg["datasets"].items():
        root = Path(folder) if Path(folder).is_absolute() else data_root / folder
        pairs = find_pairs(root)
        tr, va, te = split_pairs(pairs, s["val_ratio"], s["test_ratio"], s["seed"])
        split[label] = {"train": tr, "val": va, "test": te}
    return split


def _split_names(split: dict) -> dict:
    return {d: {k: sorted(p.image.name for p in v) for k, v in parts.items()} for d, parts in split.items()}


# ---- one run ------------------------------------------------------------------------------------
def _train_config(cfg: dict, model: dict, seed: int) -> TrainConfig:
    t = dict(cfg["train"])
    t["model"] = model["name"]
    t["seed"] = int(seed)
    kw = dict(t.get("model_kwargs") or {})
    kw.update(model["kwargs"])
    if "width_multiplier" in kw:
        t["width_multiplier"] = kw.pop("width_multiplier")
    t["model_kwargs"] = kw
    return TrainConfig.from_dict(t)


def _spent_seconds(folder: Path) -> float:
    log_csv = folder / "log.csv"
    if not log_csv.is_file():
        return 0.0
    rows = list(csv.DictReader(io.StringIO(log_csv.read_text())))
    return float(sum(float(r.get("seconds") or 0) for r in rows))


def _status(folder: Path) -> str:
    p = folder / "status.json"
    try:
        return json.loads(p.read_text()).get("state", "") if p.is_file() else ""
    except json.JSONDecodeError:
        return ""


def _load_weights(folder: Path, select: str, tc: TrainConfig, in_channels: int) -> torch.nn.Module:
    if select == "best":
        model, _ = load_checkpoint(folder / "best")
        return model
    state = torch.load(folder / "checkpoints" / STATE_NAME, map_location="cpu", weights_only=True)
    torch.manual_seed(tc.seed)
    model = build_model(tc, in_channels)
    model.load_state_dict(state["model"])
    return model.eval()


@torch.no_grad()
def _inference_ms(model: torch.nn.Module, in_channels: int, size: int, device: torch.device, reps: int = 3) -> float:
    x = torch.randn(1, in_channels, size, size, device=device)
    model.eval()
    model(x)  # warm-up
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1000.0 * float(np.median(times))


def _erf(net: torch.nn.Module, in_channels: int, size: int, device: torch.device, seed: int) -> Optional[list]:
    """Effective receptive field of the trained network's encoder stages (4 noise inputs)."""
    from msff.analysis.erf import effective_receptive_field, encoder_stages

    try:
        encoder_stages(net)
    except ValueError:  # a library network without a known stage list: no ERF column
        return None
    r = effective_receptive_field(net, size=size, n_inputs=4, in_channels=in_channels, seed=seed, device=device,
                                  keep_maps=False)
    return [{k: st[k] for k in ("name", "stride", "r50", "r90")} for st in r["stages"]]


def _soil_bands(cfg: dict, in_channels: int) -> Optional[dict]:
    """Keyword arguments of soil_like_mask (0-based bands) from the config, or None (proxy off)."""
    if "soil_proxy" not in cfg:
        if in_channels != 3:
            log.info("soil-like proxy off: %d input bands (set soil_proxy to name the RGB/NIR bands)", in_channels)
            return None
        return {}
    sp = cfg["soil_proxy"]
    if sp is None:
        return None
    out = {k: v for k, v in sp.items() if k not in ("red", "green", "blue", "nir")}
    for k, default in (("red", 1), ("green", 2), ("blue", 3), ("nir", None)):
        b = sp.get(k, default)
        if b is not None and b > in_channels:
            raise ValueError(f"soil_proxy.{k} = {b} but the input has {in_channels} band(s)")
        out[k] = None if b is None else b - 1
    return out


def data_order_digest(tc: TrainConfig, train_names: Sequence[str]) -> str:
    """Digest of the training data a run sees: training image names, crop, augmentation, and every
    (image, draw) key of every epoch. Equal digests ⇒ identical training data in identical order."""
    import hashlib

    from msff.data.dataset import EpochSampler

    names = list(train_names)
    sampler = EpochSampler(len(names), tc.samples_per_epoch, tc.seed)
    keys = []
    for epoch in range(1, tc.epochs + 1):
        sampler.set_epoch(epoch)
        keys.append([list(k[:2]) for k in sampler])  # (image, draw): the digest's form since it was introduced
    blob = json.dumps({"names": names, "seed": tc.seed, "crop": tc.crop, "augment": tc.augment, "keys": keys},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _run_one(cfg: dict, model: dict, seed: int, out_dir: Path, data: dict, progress: bool) -> dict:
    label = model["label"]
    folder = run_dir(out_dir, label, seed)
    tc = _train_config(cfg, model, seed)
    module, tests = data["module"], data["test"]
    train_ds = module.train_dataset
    status = _status(folder)
    if status != "complete":
        resume = (folder / "checkpoints" / STATE_NAME).is_file()
        if resume and tc.time_budget_s is not None:
            # A resumed run gets only the wall time its first part did not use.
            tc = dataclasses.replace(tc, time_budget_s=max(1.0, tc.time_budget_s - _spent_seconds(folder)))
        log.info("training %s seed %d (%s)", label, seed, "resume" if resume else "new")
        fit(tc, module, None, folder, resume=resume, overwrite=not resume, test_ds=None,
            progress=progress, extra_metadata={"experiment": cfg["name"], "model_label": label})
    metrics_json = json.loads((folder / "metrics.json").read_text())
    device = torch.device("cuda" if (tc.device in ("auto", "cuda") and torch.cuda.is_available()) else "cpu")
    net = _load_weights(folder, cfg["select"], tc, train_ds.in_channels).to(device)
    from msff.models.zoo import count_parameters

    per_dataset: dict[str, dict] = {}
    counts: dict[str, int] = {}
    pixels = 0
    soil = _soil_bands(cfg, train_ds.in_channels)
    t0 = time.perf_counter()
    for dname, ds in tests.items():  # already normalised like the training split (module.eval_view)
        r = evaluate(net, ds, batch_size=1, device=device, threshold=tc.threshold, amp=tc.amp, loss=None,
                     soil_bands=soil)
        keep = METRICS + BOUNDARY_METRICS + CONFUSABLE_METRICS + ("image_iou", "image_boundary_iou", "image_boundary_f")
        per_dataset[dname] = {k: r[k] for k in keep if k in r} | {k: r[k] for k in _COUNT_KEYS if k in r} | \
            {"images": r["images"]}
        for k in _COUNT_KEYS:
            if k in r:
                counts[k] = counts.get(k, 0) + int(r[k])
        pixels += r["tp"] + r["fp"] + r["fn"] + r["tn"]
    eval_s = time.perf_counter() - t0
    overall = micro_metrics(counts)
    history_rows = metrics_json.get("epochs_run", 0)
    train_s = _spent_seconds(folder)
    steps = history_rows * math.ceil((tc.samples_per_epoch or len(train_ds)) / tc.batch_size)
    result = {
        "model": label,
        "model_name": model["name"],
        "seed": seed,
        "params": count_parameters(net),
        "epochs_run": history_rows,
        "steps": steps,
        "stopped": metrics_json.get("stopped"),
        "train_s": train_s,
        "eval_s": eval_s,
        "test_megapixels": pixels / 1e6,
        "infer_s_per_mpx": eval_s / max(pixels / 1e6, 1e-9),
        "infer_ms_crop": _inference_ms(net, train_ds.in_channels, tc.crop or 256, device),
        "erf": _erf(net, train_ds.in_channels, tc.crop or 256, device, seed),
        "select": cfg["select"],
        "data_order": data_order_digest(tc, [p.name for p in train_ds.pairs]),
        **overall,
        "iou_dataset_mean": float(np.mean([v["iou"] for v in per_dataset.values()])),
        "per_dataset": per_dataset,
        "train_config": dataclasses.asdict(tc),
    }
    atomic_write_json(_result_path(out_dir, label, seed), result)
    return result


def describe_plan(config: str | os.PathLike | dict, models: Optional[Sequence[str]] = None,
                  seeds: Optional[Sequence[int]] = None) -> str:
    """The plan of an experiment (what ``msff experiment --dry-run`` prints): models × seeds and the
    shared training options, after validating the config. Nothing is read but the config.

    Example:
        >>> print(describe_plan("cpu", models=["unet", "msffnet"]).splitlines()[0])
        experiment cpu: 2 models × 3 seeds
    """
    cfg = load_experiment_config(config)
    labels = list(models) if models else [m["label"] for m in cfg["models"]]
    unknown = sorted(set(labels) - {m["label"] for m in cfg["models"]})
    if unknown:
        raise ValueError(f"model(s) {unknown} are not in the config ({[m['label'] for m in cfg['models']]})")
    run_seeds = list(seeds) if seeds else cfg["seeds"]
    return (f"experiment {cfg['name']}: {len(labels)} models × {len(run_seeds)} seeds\n"
            f"models: {', '.join(labels)}\nseeds: {run_seeds}\ntrain: {json.dumps(cfg['train'])}")


# ---- the experiment -----------------------------------------------------------------------------
def _prepare_data(cfg: dict, data_root: Path, out_dir: Path) -> dict:
    split = _make_split(cfg, data_root)
    names = _split_names(split)
    split_file = out_dir / "split.json"
    if split_file.is_file():
        old = json.loads(split_file.read_text())
        if old != names:
            raise ValueError(
                f"{split_file} holds a different split than this config and data give; an experiment "
                "must keep one split (use a new output folder)"
            )
    else:
        atomic_write_json(split_file, names)
    enc = _encoding(cfg)
    bands = cfg.get("bands")
    train_pairs = [p for parts in split.values() for p in parts["train"]]
    val_pairs = [p for parts in split.values() for p in parts["val"]]
    train_ds = SegmentationDataset(train_pairs, enc, bands)
    val_ds = SegmentationDataset(val_pairs, enc, bands) if val_pairs else None
    tests = {d: SegmentationDataset(parts["test"], enc, bands) for d, parts in split.items() if parts["test"]}
    if not tests:
        raise ValueError("the split has no test images (split.test_ratio must be > 0)")
    norm_file = out_dir / "normalization.json"
    norm = json.loads(norm_file.read_text()) if norm_file.is_file() else None
    # One module for every run: one normalisation (kept in normalization.json across invocations);
    # each run takes it with its own crop/augmentation/seed (fit -> module.for_run).
    module = SegmentationDataModule(train_ds, val_ds, normalization=norm)
    if norm is None:
        atomic_write_json(norm_file, module.normalization.to_dict())
    return {"module": module, "test": {d: module.eval_view(ds) for d, ds in tests.items()},
            "normalization": module.normalization.to_dict(), "split": names}


def run_experiment_config(
    config: str | os.PathLike | dict,
    out_dir: str | os.PathLike,
    resume: bool = True,
    data_root: Optional[str | os.PathLike] = None,
    models: Optional[Sequence[str]] = None,
    seeds: Optional[Sequence[int]] = None,
    progress: bool = False,
) -> dict:
    """Run (or continue) an experiment and write its tables and chart.

    Args:
        config: config dict, JSON path, or shipped name (``"paper"``, ``"cpu"``).
        out_dir: output folder (created).
        resume: skip runs that have results and continue interrupted ones (False: start every run
            anew, replacing earlier results in ``out_dir``).
        data_root: overrides the config's ``data_root``.
        models: only these model labels (default: all of the config's).
        seeds: only these seeds (default: the config's).
        progress: tqdm progress bars during training.

    Returns:
        ``{"runs": [one result per run], "summary": {label: {metric: {"mean", "std", "n"}}},
        "config": resolved config, "skipped": number of runs that were already done,
        "failed": [{"model", "seed", "error"}] of runs that raised (retried on resume)}``.

    Example:
        >>> res = run_experiment_config("cpu", "runs/exp", models=["unet"], seeds=[0])  # doctest: +SKIP
    """
    cfg = load_experiment_config(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    root = Path(data_root) if data_root is not None else Path(cfg["data_root"])
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    cfg_file = out_dir / "experiment_config.json"
    if resume and cfg_file.is_file():
        old = json.loads(cfg_file.read_text())
        keys = ("datasets", "split", "train", "select", "mask_encoding", "bands")
        diff = [k for k in keys if old.get(k) != json.loads(json.dumps(cfg.get(k)))]
        if diff:
            raise ValueError(f"cannot resume {out_dir}: the config's {diff} differ from the earlier runs'")
    atomic_write_json(cfg_file, cfg)
    chosen = [m for m in cfg["models"] if models is None or m["label"] in models]
    if models is not None and len(chosen) != len(set(models)):
        missing = sorted(set(models) - {m["label"] for m in chosen})
        raise ValueError(f"model(s) {missing} are not in the config ({[m['label'] for m in cfg['models']]})")
    run_seeds = list(seeds) if seeds is not None else cfg["seeds"]
    data = _prepare_data(cfg, root, out_dir)
    results, skipped, failed = [], 0, []
    total = len(chosen) * len(run_seeds)
    t0 = time.time()
    for seed in run_seeds:  # seed-major order: an interrupted experiment has every model at equal seeds
        for m in chosen:
            rp = _result_path(out_dir, m["label"], seed)
            if resume and rp.is_file():
                results.append(json.loads(rp.read_text()))
                skipped += 1
                continue
            if not resume:
                shutil.rmtree(run_dir(out_dir, m["label"], seed), ignore_errors=True)
                rp.unlink(missing_ok=True)
            try:
                r = _run_one(cfg, m, seed, out_dir, data, progress)
            except Exception as e:  # one broken run must not cost the others; resume retries it
                failed.append({"model": m["label"], "seed": seed, "error": f"{type(e).__name__}: {e}"})
                log.error("%s seed %d failed: %s: %s", m["label"], seed, type(e).__name__, e)
                continue
            results.append(r)
            log.info("[%d/%d] %s seed %d: IoU %.4f F1 %.4f (%d steps, %.0f s; %.0f s elapsed)", len(results), total,
                     m["label"], seed, r["iou"], r["f1"], r["steps"], r["train_s"], time.time() - t0)
            print(f"[{len(results)}/{total}] {m['label']} seed {seed}: IoU {r['iou']:.4f} F1 {r['f1']:.4f} "
                  f"({r['steps']} steps, {r['train_s']:.0f} s train; {time.time() - t0:.0f} s elapsed)", flush=True)
    # Every finished run in the folder counts, also those of other invocations (--models/--seeds,
    # e.g. seeds added later to the same protocol).
    all_results = []
    for m in cfg["models"]:
        files = sorted((out_dir / "runs" / m["label"]).glob("seed_*.json"), key=lambda p: int(p.stem[5:]))
        all_results += [json.loads(p.read_text()) for p in files]
    summary = summarize(all_results, [m["label"] for m in cfg["models"]], list(cfg["datasets"]))
    paired = paired_comparisons(all_results, cfg["reference"], list(summary))
    out = {"config": cfg, "split": data["split"], "runs": all_results, "summary": summary, "paired": paired,
           "skipped": skipped, "failed": failed}
    write_reports(out, out_dir)
    return out
