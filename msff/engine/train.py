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
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import numbers
import os
import random
import shutil
import socket
import tempfile
import time
import typing
from dataclasses import asdict, dataclass, field
from glob import escape as glob_escape
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from msff.data.dataset import EpochSampler, SegmentationDataset, collate, compute_normalization
from msff.data.transforms import Augment
from msff.engine.losses import LOSSES, segmentation_loss
from msff.engine.metrics import BinaryMetrics
from msff.engine.report import (
    atomic_write_bytes,
    atomic_write_json,
    plot_curves,
    save_overlay,
    write_csv,
)
from msff.fileio import FolderLockedError, RunLock, clean_stale_temporaries, disk_full_guard

__all__ = ["TrainConfig", "RunError", "build_model", "load_checkpoint", "fit", "fit_runs", "evaluate", "predict_logits"]

log = logging.getLogger("msff.train")

STATE_NAME = "last.pt"


class RunError(RuntimeError):
    """A run folder cannot be used (exists without overwrite/resume, or cannot be resumed)."""


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
        lr, weight_decay: Adam settings (paper: 1e-4, 1e-6).
        loss: ``bce`` (paper), ``dice`` or ``bce+dice``.
        plateau_factor, plateau_patience: ReduceLROnPlateau on validation IoU (paper factor 0.1).
        early_stopping: stop after this many epochs without a better validation IoU (0: never).
        crop: random crop size for training (None: whole images, padded to the batch's largest).
        augment: the paper's augmentations (random rotation, flips, translation).
        samples_per_epoch: random crops per epoch (None: one per training image).
        amp: ``none``, ``bf16`` or ``fp16`` autocast (fp16 uses a gradient scaler on CUDA).
        channels_last: channels-last memory format for model and inputs.
        seed: seed of weights, shuffling and augmentation (a CPU run repeats exactly).
        time_budget_s: stop after the epoch that would overrun this wall time (None: no budget).
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
    backend: str = "auto"
    epochs: int = 150
    batch_size: int = 32
    accumulate: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-6
    loss: str = "bce"
    plateau_factor: float = 0.1
    plateau_patience: int = 5
    early_stopping: int = 15
    crop: Optional[int] = None
    augment: bool = True
    samples_per_epoch: Optional[int] = None
    amp: str = "none"
    channels_last: bool = False
    seed: int = 0
    time_budget_s: Optional[float] = None
    device: str = "auto"
    workers: int = 0
    threshold: float = 0.5
    eval_batch_size: int = 4
    overlays: int = 4

    def __post_init__(self):
        self._check_types()
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"amp must be 'none', 'bf16' or 'fp16', got {self.amp!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.accumulate < 1:
            raise ValueError("epochs, batch_size and accumulate must be >= 1")
        if self.batch_size % self.accumulate:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of accumulate ({self.accumulate})")
        if self.crop is not None and self.crop < 1:
            raise ValueError(f"crop must be >= 1 or None, got {self.crop}")
        if not self.lr > 0 or self.weight_decay < 0:
            raise ValueError(f"lr must be > 0 and weight_decay >= 0, got lr={self.lr}, weight_decay={self.weight_decay}")
        if not 0 < self.plateau_factor < 1:
            raise ValueError(f"plateau_factor must be in (0, 1), got {self.plateau_factor}")
        for name in ("plateau_patience", "early_stopping", "workers", "overlays", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.eval_batch_size < 1:
            raise ValueError(f"eval_batch_size must be >= 1, got {self.eval_batch_size}")
        if self.samples_per_epoch is not None and self.samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1 or None, got {self.samples_per_epoch}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0 or None, got {self.time_budget_s}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.backend not in ("auto", "reference", "triton", "cuda"):
            raise ValueError(f"backend must be 'auto', 'reference', 'triton' or 'cuda', got {self.backend!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}") from None

    def _check_types(self) -> None:
        # One line naming the key for a wrong type (a config file's {"epochs": 1.7} or {"lr": "fast"}).
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            optional = typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)
            if optional:
                if value is None:
                    continue
                hint = next(a for a in typing.get_args(hint) if a is not type(None))
            base = typing.get_origin(hint) or hint
            if base is bool:
                ok, kind = isinstance(value, bool), "true or false"
            elif base is int:
                ok, kind = isinstance(value, numbers.Integral) and not isinstance(value, bool), "an integer"
            elif base is float:
                ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
                kind = "a finite number"
            else:
                ok, kind = isinstance(value, base), {str: "a string", dict: "an object ({...})"}.get(base, base.__name__)
            if not ok:
                raise ValueError(f"training option {f.name!r} must be {kind}{' or null' if optional else ''}, "
                                 f"got {value!r} ({type(value).__name__})")

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """Build from a dict, rejecting unknown keys (with their names)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(names)}")
        return cls(**d)


# ---- models -------------------------------------------------------------------------------------
def _zoo():
    try:
        from msff.models import zoo
    except ImportError:
        return None
    return zoo


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
    from msff.models import PRESETS, MSFFNet

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
    zoo = _zoo()
    try:
        if zoo is not None:
            return zoo.create_model(name, in_channels, classes, **kwargs)
        if name != "msffnet":
            raise ValueError(f"model {name!r} needs msff.models.zoo, which is not available; use 'msffnet'")
        return MSFFNet(in_channels=in_channels, classes=classes, **kwargs)
    except TypeError as e:  # an unknown or misspelt model_kwargs key
        raise ValueError(f"model {name!r} does not accept these options: {e}") from None


def _save_model(model: nn.Module, directory: Path, metadata: dict) -> None:
    zoo = _zoo()
    if zoo is not None:
        zoo.save_model(model, directory, metadata)
    else:
        model.save_pretrained(directory, metadata=metadata)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Load a trained model: a checkpoint folder (``config.json`` + ``model.pt``) or a run folder
    (its ``best/`` is used).

    Returns:
        ``(model, metadata)`` with the model in eval mode.

    Example:
        >>> model, meta = load_checkpoint("runs/bijie")  # doctest: +SKIP
        >>> meta["normalization"]["mean"]                 # doctest: +SKIP
    """
    from msff.models import MSFFNet

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} not found")
    if path.is_dir() and not (path / "config.json").exists() and (path / "best" / "config.json").exists():
        path = path / "best"
    if not path.is_dir() or not (path / "config.json").exists():
        raise FileNotFoundError(
            f"checkpoint {path} not found: give a checkpoint folder (config.json + model.pt) or a run folder with best/"
        )
    zoo = _zoo()
    if zoo is not None:
        return zoo.load_model(path, map_location=map_location)
    model = MSFFNet.from_pretrained(path, map_location=map_location)
    return model, dict(model.metadata)


# ---- helpers ------------------------------------------------------------------------------------
def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return dev


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _dist():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist, dist.get_rank(), dist.get_world_size()
    return None, 0, 1


def init_distributed() -> tuple[int, int]:
    """Initialise the process group under ``torchrun`` (``WORLD_SIZE`` > 1): NCCL on GPUs, gloo on
    CPU. Returns ``(rank, world_size)``; ``(0, 1)`` when not launched by torchrun."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return 0, 1
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def _to_device(batch: dict, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    x = batch["image"].to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, batch["target"].to(device, non_blocking=True)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---- evaluation ---------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: SegmentationDataset,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    threshold: float = 0.5,
    amp: str = "none",
    loss: Optional[str] = "bce",
    channels_last: bool = False,
    progress: bool = False,
    soil_bands: Optional[dict] = None,
) -> dict:
    """Precision, recall, IoU and F1 of ``model`` on ``dataset`` (whole images), Boundary IoU and
    boundary F-score, and with ``soil_bands`` (keyword arguments of
    :func:`msff.analysis.confusable.soil_like_mask`, e.g. ``{}`` for RGB in bands 1-3) the
    false-positive rate on soil-like background (``soil_fp_rate``).

    Under DDP each rank evaluates its share of the images and the counts are summed.

    Args:
        model: network giving (N, 1, H, W) logits.
        dataset: evaluation dataset (normalised like the training data; no crop/augment).
        batch_size: images per forward pass (padded to a common size; padding is ignored).
        device: where to run.
        threshold: probability threshold for a landslide pixel.
        amp: ``none``, ``bf16`` or ``fp16``.
        loss: also report this loss as ``loss`` (None: skip).

    Returns:
        :meth:`BinaryMetrics.compute` (micro ``precision``/``recall``/``iou``/``f1``, per-image
        ``image_*`` means, counts) plus ``loss``.

    Example:
        >>> evaluate(model, val_ds)["iou"]  # doctest: +SKIP
        0.61
    """
    device = torch.device(device) if not isinstance(device, torch.device) else device
    _, rank, world = _dist()
    was_training = model.training
    model.eval()
    metrics = BinaryMetrics(threshold=threshold)
    idx = list(range(rank, len(dataset), world))
    loss_sum = torch.zeros(2, dtype=torch.float64)
    it = range(0, len(idx), batch_size)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="eval", leave=False, unit="batch")
    for s in it:
        batch = collate([dataset[i] for i in idx[s : s + batch_size]])
        x, y = _to_device(batch, device, channels_last)
        with _autocast(device, amp):
            logits = model(x)
        logits = logits.float()
        if not torch.isfinite(logits).all():
            raise FloatingPointError(f"model produced NaN/inf logits on {batch['name']}")
        soil = None
        if soil_bands is not None:
            from msff.analysis.confusable import dataset_soil_masks

            soil = dataset_soil_masks(dataset, idx[s : s + batch_size], y.shape, soil_bands)
        metrics.update(logits, y, soil=soil)
        if loss is not None:
            loss_sum += torch.tensor([float(segmentation_loss(logits, y, loss)) * x.shape[0], x.shape[0]], dtype=torch.float64)
    dist, _, _ = _dist()
    if dist is not None:
        metrics.all_reduce()
        dist.all_reduce(loss_sum)
    out = metrics.compute()
    if loss is not None:
        out["loss"] = float(loss_sum[0] / loss_sum[1]) if loss_sum[1] > 0 else float("nan")
    model.train(was_training)
    return out


@torch.no_grad()
def predict_logits(model: nn.Module, image: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """Logits (H, W) of one normalised (C, H, W) image."""
    model.eval()
    return model(image[None].to(device))[0, 0].float().cpu()


# ---- training -----------------------------------------------------------------------------------
class _RunFolder:
    """The run folder's life: checked before anything is built, locked while written, an existing
    run replaced only once the new one has produced a checkpoint (moved aside until then and put
    back if the new run fails first)."""

    #: Files and folders of a run; their temporaries (from a killed process) are removed on entry.
    ARTEFACTS = ("status.json", "train_config.json", "log.csv", "metrics.json", "curves.png", "best",
                 "summary.json", STATE_NAME)

    def __init__(self, out_dir: Path, resume: bool, overwrite: bool, state_required: bool = True):
        # state_required=False: a folder of several runs, resumed run by run.
        self.dir, self.resume, self.overwrite, self.state_required = out_dir, resume, overwrite, state_required
        self.lock = RunLock(out_dir)
        self.aside: Optional[Path] = None
        self.created = False

    def check(self) -> None:
        """Every refusal that needs no work: changes nothing on disk."""
        try:
            self.lock.check()
        except FolderLockedError as e:
            raise RunError(str(e)) from None
        if self.dir.exists() and not self.dir.is_dir():
            raise RunError(f"run folder {self.dir} exists and is not a folder")
        if self.resume:
            if self.state_required and not (self.dir / "checkpoints" / STATE_NAME).is_file() and not self._asides():
                raise RunError(f"cannot resume: {self.dir / 'checkpoints' / STATE_NAME} not found")
        elif self.dir.exists() and any(self.dir.iterdir()) and not self.overwrite and not self._asides():
            # (with a run moved aside by a killed replacement, open() first puts it back, then refuses)
            raise RunError(
                f"output folder {self.dir} exists and is not empty; pass overwrite (--overwrite) to replace it "
                "or resume (--resume) to continue it"
            )

    def _asides(self) -> list[Path]:
        if not self.dir.parent.is_dir():
            return []
        return sorted(self.dir.parent.glob(f".{glob_escape(self.dir.name)}.msff-*.previous"))

    def open(self) -> None:
        """Lock the folder, settle what a killed predecessor left, then make the folder ready."""
        try:
            self.lock.acquire()
        except FolderLockedError as e:
            raise RunError(str(e)) from None
        try:
            self._settle()
            if self.resume:
                if self.state_required and not (self.dir / "checkpoints" / STATE_NAME).is_file():
                    raise RunError(f"cannot resume: {self.dir / 'checkpoints' / STATE_NAME} not found")
            elif self.dir.exists() and any(self.dir.iterdir()):
                if not self.overwrite:
                    raise RunError(f"output folder {self.dir} exists and is not empty; pass overwrite (--overwrite)")
                aside = Path(tempfile.mkdtemp(prefix=f".{self.dir.name}.msff-", suffix=".previous", dir=self.dir.parent))
                os.rmdir(aside)
                self.dir.rename(aside)
                self.aside = aside
            if not self.dir.exists():
                self.created = True
            self.dir.mkdir(parents=True, exist_ok=True)
        except BaseException:
            self.lock.release()
            raise

    def _settle(self) -> None:
        # We hold the lock: whoever left these is gone.
        for aside in self._asides():
            if self._produced():
                shutil.rmtree(aside, ignore_errors=True)  # its replacement had produced a checkpoint
            else:
                if self.dir.exists():
                    shutil.rmtree(self.dir)
                aside.rename(self.dir)
                log.warning("restored %s: a replacement run was killed before it produced a checkpoint", self.dir)
        for folder, names in ((self.dir, self.ARTEFACTS), (self.dir / "checkpoints", (STATE_NAME,))):
            for name in names:
                clean_stale_temporaries(folder / name, legacy_age_s=0.0)
            if folder.is_dir():  # earlier save_pretrained moved the old best/ here while replacing it
                shutil.rmtree(folder / ".best.old", ignore_errors=True)

    def _produced(self) -> bool:
        d = self.dir
        return (d / "checkpoints" / STATE_NAME).is_file() or (d / "best").is_dir() or any(d.glob("run_*/best"))

    def produced(self) -> None:
        """The new run holds a checkpoint: the run it replaces can go."""
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None

    def failed(self) -> bool:
        """The new run failed; put a replaced run back if the new one produced nothing. Returns
        whether the folder was restored (then it holds the old run, untouched)."""
        if self.aside is None:
            return False
        shutil.rmtree(self.dir, ignore_errors=True)
        self.aside.rename(self.dir)
        self.aside = None
        return True

    def close(self) -> None:
        self.lock.release()


def _state_bytes(state: dict) -> bytes:
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _comparable(cfg: dict) -> dict:
    # Options that may change between an interrupted run and its resumption.
    return {k: v for k, v in cfg.items() if k not in ("epochs", "time_budget_s", "workers", "device", "overlays")}


def fit(
    config: TrainConfig,
    train_ds: SegmentationDataset,
    val_ds: Optional[SegmentationDataset],
    out_dir: str | os.PathLike,
    resume: bool = False,
    overwrite: bool = False,
    test_ds: Optional[SegmentationDataset] = None,
    progress: bool = True,
    extra_metadata: Optional[dict] = None,
) -> dict:
    """Train a model and write a run folder (see the module docstring).

    Normalisation statistics are computed on ``train_ds`` (unless it already has them) and given to
    ``val_ds``/``test_ds``; they are stored in the checkpoint metadata. Under ``torchrun`` (DDP) each
    process trains on its share of every epoch's draws and only rank 0 writes files.

    Args:
        config: :class:`TrainConfig`.
        train_ds: training dataset; its crop/augment/seed are set from ``config``.
        val_ds: validation dataset (whole images); None: the best model is the last one.
        out_dir: run folder (must be absent or empty unless ``overwrite``/``resume``).
        resume: continue the interrupted run in ``out_dir`` exactly where its last epoch ended.
        overwrite: replace an existing ``out_dir``.
        test_ds: evaluated once with the best model at the end (``test_*`` metrics).
        progress: show tqdm progress bars.
        extra_metadata: merged into the checkpoint metadata (e.g. data description).

    Returns:
        Summary dict: ``best_epoch``, ``epochs_run``, ``stopped`` (reason), ``best`` (validation
        metrics of the best epoch), ``test`` (when ``test_ds``), ``history``, ``run_dir``,
        ``checkpoint``, ``seconds``.

    Raises:
        RunError: folder conflicts or an unresumable state.

    Example:
        >>> from msff.data import find_pairs, split_pairs, SegmentationDataset
        >>> tr, va, _ = split_pairs(find_pairs("data/bijie"), 0.2)            # doctest: +SKIP
        >>> cfg = TrainConfig(preset="cpu", epochs=20, batch_size=8, crop=256)  # doctest: +SKIP
        >>> res = fit(cfg, SegmentationDataset(tr), SegmentationDataset(va), "runs/bijie")  # doctest: +SKIP
        >>> res["best"]["iou"]                                                   # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    rank, world = init_distributed()
    dist, _, _ = _dist()
    main = rank == 0
    folder = _RunFolder(out_dir, resume, overwrite)
    if main:
        folder.check()
    device = _resolve_device(config.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    t_start = time.time()
    cfg_dict = asdict(config)
    # Everything the options can break is built before the run folder is touched.
    built = _build(config, cfg_dict, train_ds, val_ds, test_ds, device, extra_metadata)
    if main:
        folder.open()
    if dist is not None:
        dist.barrier()
    status_path = out_dir / "status.json"

    def status(state: str, quiet: bool = False, **kw):
        if not main:
            return
        try:
            atomic_write_json(status_path, {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **kw})
        except OSError:
            if not quiet:
                raise  # a failure record that cannot be written must not hide the failure itself

    try:
        status("running", pid=os.getpid(), host=socket.gethostname())
        result = _fit(config, cfg_dict, built, train_ds, val_ds, test_ds, out_dir, resume, progress,
                      device, rank, world, t_start, on_checkpoint=folder.produced if main else None)
    except BaseException as e:
        if not (main and folder.failed()):
            if isinstance(e, KeyboardInterrupt):
                status("interrupted", quiet=True, note="not a result; continue with resume (--resume)")
            else:
                status("failed", quiet=True, error=f"{type(e).__name__}: {e}", note="not a result")
        raise
    finally:
        if main:
            folder.close()
    status("complete", seconds=result["seconds"])
    return result


def _build(config, cfg_dict, train_ds, val_ds, test_ds, device, extra_metadata):
    """Normalisation, datasets' settings, model, optimiser, scheduler, scaler and metadata: all
    that the options and data can make fail, with nothing written."""
    if train_ds.normalization is None:
        train_ds.normalization = compute_normalization(train_ds)
    norm = train_ds.normalization
    for ds in (val_ds, test_ds):
        if ds is not None:
            if ds.in_channels != train_ds.in_channels:
                raise ValueError(
                    f"validation/test images have {ds.in_channels} bands, training images {train_ds.in_channels} "
                    f"(e.g. {ds.pairs[0].image})"
                )
            ds.normalization = norm
            ds.input_scale = train_ds.input_scale  # the one scale, fitted on the training split
            ds.crop, ds.augment = None, None
    train_ds.crop = config.crop
    train_ds.augment = Augment() if config.augment else None
    train_ds.seed = config.seed

    _seed_all(config.seed)
    model = build_model(config, train_ds.in_channels).to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="max", factor=config.plateau_factor, patience=config.plateau_patience
    )
    scaler = torch.amp.GradScaler(device.type, enabled=(config.amp == "fp16" and device.type == "cuda"))
    metadata = {
        "normalization": norm,
        "bands": train_ds.bands,
        "threshold": config.threshold,
        "model_name": config.model,
        "in_channels": train_ds.in_channels,
        "mask_encoding": asdict(train_ds.encoding),
        "train": cfg_dict,
        **train_ds.model_card(),  # input_scale, training domain statistics (msff.data.domain)
    }
    metadata.update(extra_metadata or {})
    return model, opt, sched, scaler, metadata, norm


def _fit(config, cfg_dict, built, train_ds, val_ds, test_ds, out_dir, resume, progress, device, rank, world,
         t_start, on_checkpoint=None):
    from tqdm.auto import tqdm

    dist, _, _ = _dist()
    main = rank == 0
    model, opt, sched, scaler, metadata, norm = built
    history: list[dict] = []
    best_iou, best_epoch, bad_epochs, start_epoch = -math.inf, 0, 0, 1
    state_path = out_dir / "checkpoints" / STATE_NAME
    if resume:
        st = torch.load(state_path, map_location="cpu", weights_only=True)
        if _comparable(st["config"]) != _comparable(cfg_dict):
            diff = sorted(k for k in _comparable(cfg_dict) if st["config"].get(k) != cfg_dict.get(k))
            raise RunError(f"cannot resume {out_dir}: the training options differ from the interrupted run's: {diff}")
        _unwrap(model).load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        sched.load_state_dict(st["scheduler"])
        scaler.load_state_dict(st["scaler"])
        torch.set_rng_state(st["torch_rng"])
        history = st["history"]
        best_iou, best_epoch, bad_epochs = st["best_iou"], st["best_epoch"], st["bad_epochs"]
        start_epoch = st["epoch"] + 1
        metadata["normalization"] = norm = st["normalization"]
        train_ds.normalization = norm
        for ds in (val_ds, test_ds):
            if ds is not None:
                ds.normalization = norm
    if main:
        atomic_write_json(out_dir / "train_config.json", cfg_dict)

    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = EpochSampler(len(train_ds), config.samples_per_epoch, config.seed, rank, world)
    micro = config.batch_size // config.accumulate
    per_rank = max(1, micro // world)
    loader = DataLoader(train_ds, batch_size=per_rank, sampler=sampler, collate_fn=collate,
                        num_workers=config.workers, pin_memory=device.type == "cuda")
    tb = None
    if main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            tb = SummaryWriter(str(out_dir / "tb"))
        except Exception:  # TensorBoard not installed: the CSV log is the record
            tb = None

    stopped = "epochs"
    epoch_times: list[float] = []
    epoch = start_epoch - 1
    ebar = tqdm(range(start_epoch, config.epochs + 1), desc="epochs", unit="ep", disable=not (progress and main),
                initial=start_epoch - 1, total=config.epochs)
    if start_epoch > config.epochs:
        stopped = "epochs"
    elif bad_epochs >= config.early_stopping > 0:
        stopped = "early stopping"
        ebar = []
    for epoch in ebar:
        t0 = time.time()
        model.train()
        train_ds.set_epoch(epoch)
        sampler.set_epoch(epoch)
        loss_sum, n_batches, pending = 0.0, 0, 0
        opt.zero_grad(set_to_none=True)
        bbar = tqdm(loader, desc=f"epoch {epoch}", leave=False, unit="batch", disable=not (progress and main))
        for batch in bbar:
            x, y = _to_device(batch, device, config.channels_last)
            with _autocast(device, config.amp):
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
        if dist is not None:
            dist.all_reduce(tl)
        row: dict[str, Any] = {"epoch": epoch, "lr": opt.param_groups[0]["lr"],
                               "train_loss": float(tl[0] / max(tl[1], 1))}
        if val_ds is not None:
            vm = evaluate(model, val_ds, config.eval_batch_size, device, config.threshold, config.amp,
                          config.loss, config.channels_last)
            row.update({f"val_{k}": vm[k] for k in ("loss", "precision", "recall", "iou", "f1",
                                                     "image_iou", "image_f1", "boundary_iou", "boundary_f")})
            score = vm["iou"]
        else:
            score = -row["train_loss"]
        row["seconds"] = time.time() - t0
        history.append(row)
        sched.step(score)
        improved = score > best_iou
        if improved:
            best_iou, best_epoch, bad_epochs = score, epoch, 0
        else:
            bad_epochs += 1
        if main:
            if improved:
                meta = dict(metadata, best_epoch=epoch, val_metrics={k: v for k, v in row.items() if k.startswith("val_")})
                net = _unwrap(model)
                need = sum(t.numel() * t.element_size() for t in net.state_dict().values())
                with disk_full_guard(out_dir / "best", need):
                    _save_model(net, out_dir / "best", meta)
            state = {
                "epoch": epoch, "config": cfg_dict, "model": _unwrap(model).state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": scaler.state_dict(),
                "torch_rng": torch.get_rng_state(), "history": history, "best_iou": best_iou,
                "best_epoch": best_epoch, "bad_epochs": bad_epochs, "normalization": norm,
            }
            data = _state_bytes(state)
            with disk_full_guard(state_path, len(data)):
                atomic_write_bytes(state_path, data)
            write_csv(out_dir / "log.csv", history)
            if on_checkpoint is not None and (out_dir / "best").is_dir():
                on_checkpoint()
            if tb is not None:
                for k, v in row.items():
                    if k != "epoch" and isinstance(v, float) and math.isfinite(v):
                        tb.add_scalar(k, v, epoch)
        if hasattr(ebar, "set_postfix"):
            ebar.set_postfix(loss=f"{row['train_loss']:.4f}", val_iou=f"{row.get('val_iou', float('nan')):.3f}",
                             best=f"{best_iou:.3f}@{best_epoch}")
        epoch_times.append(time.time() - t0)
        if config.early_stopping > 0 and bad_epochs >= config.early_stopping:
            stopped = "early stopping"
            break
        if config.time_budget_s is not None and epoch < config.epochs:
            elapsed = time.time() - t_start
            if elapsed + max(epoch_times) > config.time_budget_s:
                stopped = "time budget"
                break
    if hasattr(ebar, "close"):
        ebar.close()
    if tb is not None:
        tb.close()
    if dist is not None:
        dist.barrier()

    result: dict[str, Any] = {
        "run_dir": str(out_dir), "checkpoint": str(out_dir / "best"), "best_epoch": best_epoch,
        "epochs_run": len(history), "stopped": stopped, "history": history,
    }
    best_model, _ = load_checkpoint(out_dir / "best", map_location=device)
    best_model = best_model.to(device)
    if config.channels_last:
        best_model = best_model.to(memory_format=torch.channels_last)
    if val_ds is not None:
        result["best"] = evaluate(best_model, val_ds, config.eval_batch_size, device, config.threshold,
                                  config.amp, config.loss, config.channels_last)
    if test_ds is not None:
        result["test"] = evaluate(best_model, test_ds, config.eval_batch_size, device, config.threshold,
                                  config.amp, config.loss, config.channels_last)
    result["seconds"] = time.time() - t_start
    if main:
        if history:
            plot_curves(history, out_dir / "curves.png")
        if val_ds is not None and config.overlays > 0:
            write_overlays(best_model, val_ds, out_dir / "overlays", config.overlays, device, config.threshold)
        atomic_write_json(out_dir / "metrics.json", {k: v for k, v in result.items() if k != "history"})
    if dist is not None:
        dist.barrier()
    return result


@torch.no_grad()
def write_overlays(model: nn.Module, dataset: SegmentationDataset, folder: str | os.PathLike, count: int = 4,
                   device: str | torch.device = "cpu", threshold: float = 0.5) -> list[Path]:
    """Overlay PNGs (image | ground truth | prediction) for the first ``count`` images of ``dataset``.

    Returns:
        The written PNG paths.
    """
    folder = Path(folder)
    paths = []
    model.eval()
    for i in range(min(count, len(dataset))):
        item = dataset[i]
        logits = predict_logits(model, item["image"], device)
        pred = torch.sigmoid(logits).numpy() >= threshold
        raw, tgt = dataset.raw(i)
        m = BinaryMetrics(threshold)
        m.update(logits[None], torch.from_numpy(tgt)[None])
        r = m.compute()
        p = folder / f"{item['name']}.png"
        save_overlay(raw, tgt, pred, p, title=f"{item['name']}: IoU {r['iou']:.3f}  F1 {r['f1']:.3f}")
        paths.append(p)
    return paths


def _mean_std(values: list[float]) -> dict:
    a = np.array([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if a.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "n": int(a.size)}


def fit_runs(
    config: TrainConfig,
    train_ds: SegmentationDataset,
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

    Returns:
        ``{"runs": [fit results without history], "summary": {"val_iou": {"mean", "std", "n"}, …}}``,
        also written to ``out_dir/summary.json``. With ``runs=1`` the run folder is ``out_dir`` itself.

    Example:
        >>> s = fit_runs(cfg, tr, va, "runs/r", runs=3)  # doctest: +SKIP
        >>> s["summary"]["val_iou"]                     # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    if runs == 1:
        r = fit(config, train_ds, val_ds, out_dir, resume, overwrite, test_ds, progress, extra_metadata)
        results = [r]
    else:
        folder = _RunFolder(out_dir, resume, overwrite, state_required=False)
        folder.check()
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
                train_ds.normalization = None
                results.append(fit(cfg, train_ds, val_ds, run_dir,
                                   resume and (run_dir / "checkpoints" / STATE_NAME).is_file(),
                                   False, test_ds, progress, extra_metadata))
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
    _, rank, _ = _dist()
    if rank == 0 and runs > 1:
        atomic_write_json(out_dir / "summary.json", out)
    return out

