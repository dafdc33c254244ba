"""The run folder's life and records: checked before anything is built, locked while written, an
existing run replaced only once the new run produced a checkpoint; ``status.json``; the full
training state ``checkpoints/last.pt`` written atomically every epoch and read back on resume.

The training loop (:mod:`msff.engine.train`) decides what to train; this module decides what is on
disk, and when.
"""
from __future__ import annotations

import io
import logging
import os
import shutil
import socket
import tempfile
import time
from glob import escape as glob_escape
from pathlib import Path
from typing import Optional

import torch

from msff.engine.report import atomic_write_bytes, atomic_write_json
from msff.fileio import FolderLockedError, RunLock, clean_stale_temporaries, disk_full_guard

__all__ = ["RunError", "RunFolder", "RunStatus", "STATE_NAME", "save_state", "load_state", "comparable_options"]

log = logging.getLogger("msff.train")

STATE_NAME = "last.pt"

#: Training options that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = ("epochs", "time_budget_s", "workers", "device", "overlays")


class RunError(RuntimeError):
    """A run folder cannot be used (exists without overwrite/resume, or cannot be resumed)."""


class RunFolder:
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


class RunStatus:
    """Writes ``status.json`` (``running`` / ``complete`` / ``failed`` / ``interrupted``) on the main
    process; a no-op elsewhere.

    Example:
        >>> RunStatus(Path("runs/r"), main=True).set("running", pid=1)  # doctest: +SKIP
    """

    def __init__(self, out_dir: Path, main: bool = True):
        self.path, self.main = Path(out_dir) / "status.json", main

    def set(self, state: str, quiet: bool = False, **fields) -> None:
        """Record ``state`` with a timestamp and ``fields``; with ``quiet`` a write error is swallowed
        (a failure record that cannot be written must not hide the failure itself)."""
        if not self.main:
            return
        try:
            atomic_write_json(self.path, {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **fields})
        except OSError:
            if not quiet:
                raise

    def running(self) -> None:
        self.set("running", pid=os.getpid(), host=socket.gethostname())

    def ended_by(self, error: BaseException) -> None:
        """Record why a run stopped early (interrupted: resumable; anything else: failed)."""
        if isinstance(error, KeyboardInterrupt):
            self.set("interrupted", quiet=True, note="not a result; continue with resume (--resume)")
        else:
            self.set("failed", quiet=True, error=f"{type(error).__name__}: {error}", note="not a result")


def comparable_options(cfg: dict) -> dict:
    """The training options an interrupted run and its resumption must share."""
    return {k: v for k, v in cfg.items() if k not in RESUMABLE_CHANGES}


def save_state(out_dir: Path, state: dict) -> None:
    """Write the full training state to ``out_dir/checkpoints/last.pt`` atomically (a full disk is
    one error naming the file, with the previous state kept)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path = Path(out_dir) / "checkpoints" / STATE_NAME
    with disk_full_guard(path, len(data)):
        atomic_write_bytes(path, data)


def load_state(out_dir: Path, cfg: dict) -> dict:
    """The saved training state of an interrupted run in ``out_dir``, refused (:class:`RunError`
    naming the options) when its training options differ from ``cfg`` beyond
    :data:`RESUMABLE_CHANGES`."""
    st = torch.load(Path(out_dir) / "checkpoints" / STATE_NAME, map_location="cpu", weights_only=True)
    if comparable_options(st["config"]) != comparable_options(cfg):
        diff = sorted(k for k in comparable_options(cfg) if st["config"].get(k) != cfg.get(k))
        raise RunError(f"cannot resume {out_dir}: the training options differ from the interrupted run's: {diff}")
    return st
