"""Training and evaluation: the paper's recipe as defaults, checkpoints, resume, DDP.

The recipe of Yi & Tan (2025): BCE on logits, Adam (lr 1e-4, weight decay 1e-6),
ReduceLROnPlateau (factor 0.1), early stopping, 150 epochs, batch 32. Everything else is an option
of :class:`TrainConfig`.

A run folder holds:

* ``status.json``: ``running`` / ``complete`` / ``failed`` / ``interrupted`` (only ``complete``
  runs are results; ``metrics.json`` is written last, only when the run completes);
* ``train_config.json``; ``log.csv`` (one row per epoch; TensorBoard events in ``tb/`` when
  TensorBoard is installed); ``curves.png``; ``overlays/*.png``;
* ``best/``: the best model by validation IoU (``save_pretrained`` format + normalisation
  metadata), ready for ``msff evaluate`` / ``msff predict``;
* ``checkpoints/last.pt``: full training state, written atomically every epoch, read by
  ``resume=True``.

This module is the training loop. The data comes from a
:class:`~msff.data.module.SegmentationDataModule` (normalisation, input scale, crops,
augmentation; the datasets a caller passes are never changed), the run folder's life and records
from :mod:`msff.engine.run_folder`, evaluation from :mod:`msff.engine.evaluation`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from msff.config import TrainConfig  # the typed config lives in msff.config; re-exported here
from msff.data.dataset import EpochSampler, SegmentationDataset, collate
from msff.data.module import SegmentationDataModule
from msff.engine.device import (
    autocast,
    dist_info,
    init_distributed,
    resolve_device,
    seed_all,
    to_device,
    unwrap,
)
from msff.engine.evaluation import evaluate, predict_logits, write_overlays
from msff.engine.losses import segmentation_loss
from msff.engine.report import atomic_write_json, plot_curves, write_csv
from msff.engine.run_folder import (
    STATE_NAME,
    RunError,
    RunFolder,
    RunStatus,
    load_state,
    save_state,
)
from msff.engine.stats import mean_std as _mean_std
from msff.fileio import disk_full_guard
from msff.models.card import ModelCard

__all__ = ["TrainConfig", "RunError", "build_model", "load_checkpoint", "fit", "fit_runs", "evaluate",
           "predict_logits", "write_overlays", "init_distributed"]

log = logging.getLogger("msff.train")

# Older names, kept for callers (the CLI, tests) that import them from here.
_RunFolder = RunFolder
_resolve_device = resolve_device
_dist = dist_info


# ---- models -------------------------------------------------------------------------------------
def build_model(config: TrainConfig, in_channels: int, classes: int = 1) -> nn.Module:
    """The network a config asks for, with random weights (seed it first for reproducibility).

    MSFFNet variants (names starting with ``msffnet``) take the preset, then ``width_multiplier``,
    ``model_kwargs`` and ``backend``; other zoo networks take ``model_kwargs`` (and
    ``width_multiplier`` when given).

    Example:
        >>> m = build_model(TrainConfig(preset="tiny"), in_channels=3)
        >>> m.config["width_multiplier"]
        0.125
    """
    from msff.models import PRESETS, zoo

    name = config.model.lower()
    kwargs: dict[str, Any] = {}
    if name.startswith("msffnet"):
        if config.preset not in PRESETS:
            raise ValueError(f"unknown preset {config.preset!r}; choose from {sorted(PRESETS)}")
        kwargs.update(PRESETS[config.preset])
        kwargs["backend"] = config.backend
    if config.width_multiplier is not None:
        kwargs["width_multiplier"] = config.width_multiplier
    fixed = sorted({"in_channels", "classes"} & set(config.model_kwargs))
    if fixed:
        raise ValueError(f"model_kwargs {fixed}: not options (the data's band count and the task set them)")
    kwargs.update(config.model_kwargs)
    try:
        return zoo.create_model(name, in_channels, classes, **kwargs)
    except TypeError as e:  # an unknown or misspelt model_kwargs key
        raise ValueError(f"model {name!r} does not accept these options: {e}") from None


def _save_model(model: nn.Module, directory: Path, card: ModelCard) -> None:
    from msff.models import zoo

    zoo.save_model(model, directory, card)  # = model.save_pretrained(directory, card) with the zoo name


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load a trained model: a checkpoint folder (``config.json`` + ``model.pt``) or a run folder
    (its ``best/`` is used).

    Returns:
        ``(model, metadata)`` with the model in eval mode.

    Example:
        >>> model, meta = load_checkpoint("runs/bijie")  # doctest: +SKIP
        >>> meta["normalization"]["mean"]                 # doctest: +SKIP
    """
    from msff.models import zoo

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.is_dir() and not (path / "config.json").exists() and (path / "best" / "config.json").exists():
        path = path / "best"
    if not path.is_dir() or not (path / "config.json").exists():
        raise FileNotFoundError(
            f"checkpoint {path} not found: give a checkpoint folder (config.json + model.pt) or a run folder with best/"
        )
    return zoo.load_model(path, map_location=map_location)


# ---- training -----------------------------------------------------------------------------------
def _as_module(config: TrainConfig, train: "SegmentationDataset | SegmentationDataModule",
               val: Optional[SegmentationDataset], test: Optional[SegmentationDataset]) -> SegmentationDataModule:
    """The run's data module with the config's crop, augmentation and seed. Datasets given directly
    are wrapped (their own normalisation, when set, is used; nothing of theirs is changed)."""
    if isinstance(train, SegmentationDataModule):
        if val is not None or test is not None:
            raise ValueError("give val/test datasets through the data module, not beside it")
        return train.for_run(config)
    return SegmentationDataModule(train, val, test, crop=config.crop, augment=config.augment, seed=config.seed,
                                  normalization=train.normalizer)


@dataclass
class _Run:
    """Everything one training run works with: built before the run folder is touched, then read
    (and the loop state advanced) by the loop."""

    config: TrainConfig
    cfg_dict: dict
    data: SegmentationDataModule
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: Any
    scaler: Any
    card: ModelCard
    device: torch.device
    out_dir: Path
    rank: int = 0
    world: int = 1
    t_start: float = field(default_factory=time.time)
    progress: bool = True
    on_checkpoint: Optional[Callable[[], None]] = None
    # loop state (saved in last.pt, restored on resume)
    history: list = field(default_factory=list)
    best_score: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    start_epoch: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _build(config: TrainConfig, data: SegmentationDataModule, device: torch.device, out_dir: Path,
           extra_metadata: Optional[dict]) -> _Run:
    """Model, optimiser, scheduler, scaler and metadata: all that the options and data can make fail,
    with nothing written."""
    seed_all(config.seed)
    model = build_model(config, data.in_channels).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="max", factor=config.plateau_factor, patience=config.plateau_patience
    )
    scaler = torch.amp.GradScaler(device.type, enabled=(config.amp == "fp16" and device.type == "cuda"))
    cfg_dict = asdict(config)
    card = data.model_card()  # normalization, bands, in_channels, mask_encoding, input_scale, domain, stack
    metadata = {"normalization": card.pop("normalization"), "bands": card.pop("bands"), "threshold": config.threshold,
                "model_name": config.model, "in_channels": card.pop("in_channels"),
                "mask_encoding": card.pop("mask_encoding"), "train": cfg_dict, **card}
    metadata.update(extra_metadata or {})
    # typed and validated here, before anything is written (a bad extra_metadata entry fails now)
    model_card = ModelCard.from_dict(metadata, f"model card of {out_dir}")
    return _Run(config, cfg_dict, data, model, opt, sched, scaler, model_card, device, out_dir)


def _resume(run: _Run) -> None:
    """Restore the interrupted run's weights, optimiser, scheduler, scaler, RNG and loop state; the
    run keeps the normalisation it was trained with."""
    st = load_state(run.out_dir, run.cfg_dict)
    unwrap(run.model).load_state_dict(st["model"])
    run.opt.load_state_dict(st["optimizer"])
    run.sched.load_state_dict(st["scheduler"])
    run.scaler.load_state_dict(st["scaler"])
    torch.set_rng_state(st["torch_rng"])
    run.history = st["history"]
    run.best_score, run.best_epoch, run.bad_epochs = st["best_iou"], st["best_epoch"], st["bad_epochs"]
    run.start_epoch = st["epoch"] + 1
    if run.data.normalization != st["normalization"]:
        run.data = run.data.replace(normalization=st["normalization"])
    run.card = run.card.replace(normalization=run.data.normalization.to_dict())


def _train_epoch(run: _Run, model: nn.Module, loader: DataLoader, epoch: int) -> float:
    """One epoch of optimiser steps (with gradient accumulation); the mean training loss over
    every process's batches."""
    from tqdm.auto import tqdm

    config, opt, scaler = run.config, run.opt, run.scaler
    model.train()
    loader.sampler.set_epoch(epoch)
    loss_sum, n_batches, pending = 0.0, 0, 0
    opt.zero_grad(set_to_none=True)
    bbar = tqdm(loader, desc=f"epoch {epoch}", leave=False, unit="batch", disable=not (run.progress and run.main))
    for batch in bbar:
        x, y = to_device(batch, run.device, config.channels_last)
        with autocast(run.device, config.amp):
            logits = model(x)
        loss = segmentation_loss(logits, y, config.loss)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {loss.item()} at epoch {epoch} (batch of {batch['name'][:4]}); "
                "check the input for extreme values or lower the learning rate"
            )
        scaler.scale(loss / config.accumulate).backward()
        pending += 1
        if pending == config.accumulate:
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            pending = 0
        loss_sum += float(loss.detach())
        n_batches += 1
        bbar.set_postfix(loss=f"{loss_sum / n_batches:.4f}")
    if pending:
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    tl = torch.tensor([loss_sum, n_batches], dtype=torch.float64)
    dist, _, _ = dist_info()
    if dist is not None:
        dist.all_reduce(tl)
    return float(tl[0] / max(tl[1], 1))


def _eval_kwargs(config: TrainConfig) -> dict:
    return dict(batch_size=config.eval_batch_size, threshold=config.threshold, amp=config.amp,
                channels_last=config.channels_last)


def _record_epoch(run: _Run, model: nn.Module, row: dict, improved: bool, tb) -> None:
    """Main process: best/ when improved, the full state, log.csv, TensorBoard scalars."""
    out_dir, epoch = run.out_dir, row["epoch"]
    if improved:
        meta = run.card.replace(best_epoch=epoch, val_metrics={k: v for k, v in row.items() if k.startswith("val_")})
        net = unwrap(model)
        need = sum(t.numel() * t.element_size() for t in net.state_dict().values())
        with disk_full_guard(out_dir / "best", need):
            _save_model(net, out_dir / "best", meta)
    save_state(out_dir, {
        "epoch": epoch, "config": run.cfg_dict, "model": unwrap(model).state_dict(),
        "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(), "scaler": run.scaler.state_dict(),
        "torch_rng": torch.get_rng_state(), "history": run.history, "best_iou": run.best_score,
        "best_epoch": run.best_epoch, "bad_epochs": run.bad_epochs, "normalization": run.data.normalization.to_dict(),
    })
    write_csv(out_dir / "log.csv", run.history)
    if run.on_checkpoint is not None and (out_dir / "best").is_dir():
        run.on_checkpoint()
    if tb is not None:
        for k, v in row.items():
            if k != "epoch" and isinstance(v, float) and math.isfinite(v):
                tb.add_scalar(k, v, epoch)


def _tensorboard(run: _Run):
    if not run.main:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # TensorBoard not installed: the CSV log is the record
        return None
    return SummaryWriter(str(run.out_dir / "tb"))


def _loop(run: _Run) -> str:
    """The epochs: train, validate, keep the best, stop early / on the budget. Returns why it stopped."""
    from tqdm.auto import tqdm

    config, data = run.config, run.data
    dist, _, _ = dist_info()
    model = run.model
    if run.world > 1:
        dev = run.device
        model = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    sampler = EpochSampler(len(data.train_dataset), config.samples_per_epoch, config.seed, run.rank, run.world)
    per_rank = max(1, config.batch_size // config.accumulate // run.world)
    loader = DataLoader(data.train_dataset, batch_size=per_rank, sampler=sampler, collate_fn=collate,
                        num_workers=config.workers, pin_memory=run.device.type == "cuda")
    tb = _tensorboard(run)
    stopped = "epochs"
    epoch_times: list[float] = []
    epochs = range(run.start_epoch, config.epochs + 1)
    if run.start_epoch <= config.epochs and run.bad_epochs >= config.early_stopping > 0:
        stopped, epochs = "early stopping", range(0)
    ebar = tqdm(epochs, desc="epochs", unit="ep", disable=not (run.progress and run.main),
                initial=run.start_epoch - 1, total=config.epochs)
    try:
        for epoch in ebar:
            t0 = time.time()
            row: dict[str, Any] = {"epoch": epoch, "lr": run.opt.param_groups[0]["lr"],
                                   "train_loss": _train_epoch(run, model, loader, epoch)}
            if data.val_dataset is not None:
                vm = evaluate(model, data.val_dataset, device=run.device, loss=config.loss, **_eval_kwargs(config))
                row.update({f"val_{k}": vm[k] for k in ("loss", "precision", "recall", "iou", "f1", "image_iou",
                                                         "image_f1", "boundary_iou", "boundary_f")})
                score = vm["iou"]
            else:
                score = -row["train_loss"]
            row["seconds"] = time.time() - t0
            run.history.append(row)
            run.sched.step(score)
            improved = score > run.best_score
            if improved:
                run.best_score, run.best_epoch, run.bad_epochs = score, epoch, 0
            else:
                run.bad_epochs += 1
            if run.main:
                _record_epoch(run, model, row, improved, tb)
            ebar.set_postfix(loss=f"{row['train_loss']:.4f}", val_iou=f"{row.get('val_iou', float('nan')):.3f}",
                             best=f"{run.best_score:.3f}@{run.best_epoch}")
            epoch_times.append(time.time() - t0)
            if config.early_stopping > 0 and run.bad_epochs >= config.early_stopping:
                stopped = "early stopping"
                break
            if config.time_budget_s is not None and epoch < config.epochs:
                if time.time() - run.t_start + max(epoch_times) > config.time_budget_s:
                    stopped = "time budget"
                    break
    finally:
        ebar.close()
        if tb is not None:
            tb.close()
    if dist is not None:
        dist.barrier()
    return stopped


def _finish(run: _Run, stopped: str) -> dict:
    """Evaluate the best model on validation and test data; curves, overlays and metrics.json."""
    config, data, out_dir, device = run.config, run.data, run.out_dir, run.device
    dist, _, _ = dist_info()
    result: dict[str, Any] = {
        "run_dir": str(out_dir), "checkpoint": str(out_dir / "best"), "best_epoch": run.best_epoch,
        "epochs_run": len(run.history), "stopped": stopped, "history": run.history,
    }
    best_model, _ = load_checkpoint(out_dir / "best", map_location=device)
    best_model = best_model.to(device)
    if config.channels_last:
        best_model = best_model.to(memory_format=torch.channels_last)
    for key, ds in (("best", data.val_dataset), ("test", data.test_dataset)):
        if ds is not None:
            result[key] = evaluate(best_model, ds, device=device, loss=config.loss, **_eval_kwargs(config))
    result["seconds"] = time.time() - run.t_start
    if run.main:
        if run.history:
            plot_curves(run.history, out_dir / "curves.png")
        if data.val_dataset is not None and config.overlays > 0:
            write_overlays(best_model, data.val_dataset, out_dir / "overlays", config.overlays, device, config.threshold)
        atomic_write_json(out_dir / "metrics.json", {k: v for k, v in result.items() if k != "history"})
    if dist is not None:
        dist.barrier()
    return result


def fit(
    config: TrainConfig,
    train_ds: "SegmentationDataset | SegmentationDataModule",
    val_ds: Optional[SegmentationDataset],
    out_dir: str | os.PathLike,
    resume: bool = False,
    overwrite: bool = False,
    test_ds: Optional[SegmentationDataset] = None,
    progress: bool = True,
    extra_metadata: Optional[dict] = None,
) -> dict:
    """Train a model and write a run folder (see the module docstring).

    The data is a :class:`~msff.data.module.SegmentationDataModule` (given, or built here from
    ``train_ds``/``val_ds``/``test_ds``): normalisation statistics and the input scale are fitted on
    the training split (unless the training dataset or module already has them) and used for every
    split; crop, augmentation and seed come from ``config``. The datasets passed in are not changed.
    The statistics are stored in the checkpoint metadata. Under ``torchrun`` (DDP) each process
    trains on its share of every epoch's draws and only rank 0 writes files.

    Args:
        config: :class:`TrainConfig`.
        train_ds: a data module, or the training dataset (as built from files).
        val_ds: validation dataset (whole images); None: the best model is the last one. None when
            ``train_ds`` is a data module (its validation split is used).
        out_dir: run folder (must be absent or empty unless ``overwrite``/``resume``).
        resume: continue the interrupted run in ``out_dir`` exactly where its last epoch ended.
        overwrite: replace an existing ``out_dir``.
        test_ds: evaluated once with the best model at the end (``test_*`` metrics).
        progress: show tqdm progress bars.
        extra_metadata: merged into the checkpoint metadata (e.g. data description).

    Returns:
        Summary dict: ``best_epoch``, ``epochs_run``, ``stopped`` (reason), ``best`` (validation
        metrics of the best epoch), ``test`` (when a test split), ``history``, ``run_dir``,
        ``checkpoint``, ``seconds``.

    Raises:
        RunError: folder conflicts or an unresumable state.

    Example:
        >>> from msff.data import SegmentationDataModule, find_pairs
        >>> dm = SegmentationDataModule.from_pairs(find_pairs("data/bijie"), val_ratio=0.2)  # doctest: +SKIP
        >>> cfg = TrainConfig(preset="cpu", epochs=20, batch_size=8, crop=256)             # doctest: +SKIP
        >>> res = fit(cfg, dm, None, "runs/bijie")                                          # doctest: +SKIP
        >>> res["best"]["iou"]                                                              # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    rank, world = init_distributed()
    dist, _, _ = dist_info()
    main = rank == 0
    folder = RunFolder(out_dir, resume, overwrite)
    if main:
        folder.check()
    device = resolve_device(config.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    t_start = time.time()
    # Everything the options and data can break is built before the run folder is touched.
    run = _build(config, _as_module(config, train_ds, val_ds, test_ds), device, out_dir, extra_metadata)
    run.rank, run.world, run.t_start, run.progress = rank, world, t_start, progress
    run.on_checkpoint = folder.produced if main else None
    if main:
        folder.open()
    if dist is not None:
        dist.barrier()
    status = RunStatus(out_dir, main)
    try:
        status.running()
        if resume:
            _resume(run)
        if main:
            atomic_write_json(out_dir / "train_config.json", run.cfg_dict)
        result = _finish(run, _loop(run))
    except BaseException as e:
        if not (main and folder.failed()):
            status.ended_by(e)
        raise
    finally:
        if main:
            folder.close()
    status.set("complete", seconds=result["seconds"])
    return result


def fit_runs(
    config: TrainConfig,
    train_ds: "SegmentationDataset | SegmentationDataModule",
    val_ds: Optional[SegmentationDataset],
    out_dir: str | os.PathLike,
    runs: int = 1,
    overwrite: bool = False,
    resume: bool = False,
    test_ds: Optional[SegmentationDataset] = None,
    progress: bool = True,
    extra_metadata: Optional[dict] = None,
) -> dict:
    """Repeat :func:`fit` with seeds ``seed, seed + 1, …`` into ``out_dir/run_<i>`` and report the
    mean ± sample std of the best validation (and test) metrics, as the paper averages 10 runs.
    Every run uses the same data module (one normalisation, fitted once); only the seed changes.

    Returns:
        ``{"runs": [fit results without history], "summary": {"val_iou": {"mean", "std", "n"}, …}}``,
        also written to ``out_dir/summary.json``. With ``runs=1`` the run folder is ``out_dir`` itself.

    Example:
        >>> s = fit_runs(cfg, tr, va, "runs/r", runs=3)  # doctest: +SKIP
        >>> s["summary"]["val_iou"]                     # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    if runs == 1:
        results = [fit(config, train_ds, val_ds, out_dir, resume, overwrite, test_ds, progress, extra_metadata)]
    else:
        folder = RunFolder(out_dir, resume, overwrite, state_required=False)
        folder.check()
        data = _as_module(config, train_ds, val_ds, test_ds)  # built (and checked) before the folder is opened
        folder.open()
        results = []
        try:
            for i in range(runs):
                cfg = dataclasses.replace(config, seed=config.seed + i)
                run_dir = out_dir / f"run_{i}"
                done = (run_dir / "status.json").is_file() and '"complete"' in (run_dir / "status.json").read_text()
                if resume and done:
                    results.append(json.loads((run_dir / "metrics.json").read_text()))
                    continue
                results.append(fit(cfg, data, None, run_dir,
                                   resume and (run_dir / "checkpoints" / STATE_NAME).is_file(),
                                   False, None, progress, extra_metadata))
                folder.produced()
        except BaseException:
            if not results:
                folder.failed()
            raise
        finally:
            folder.close()
    summary: dict[str, Any] = {}
    for split in ("best", "test"):
        if split in results[0]:
            name = "val" if split == "best" else "test"
            for k in ("precision", "recall", "iou", "f1", "image_iou", "image_f1"):
                summary[f"{name}_{k}"] = _mean_std([r[split][k] for r in results])
    out = {"runs": [{k: v for k, v in r.items() if k != "history"} for r in results], "summary": summary,
           "seeds": [config.seed + i for i in range(runs)]}
    _, rank, _ = dist_info()
    if rank == 0 and runs > 1:
        atomic_write_json(out_dir / "summary.json", out)
    return out
