"""Helpers of the reliability suite (issue 16): run ``msff`` as a user would and check what it left."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

#: Options of a training run that takes a few seconds on one CPU core.
FAST = ["--preset", "tiny", "--kernel-size", "3", "--epochs", "1", "--batch-size", "4", "--crop", "32",
        "--device", "cpu", "--no-progress", "--overlays", "1"]


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def truncate(path: Path, keep: int) -> None:
    """Keep only the first ``keep`` bytes of ``path`` (a download cut short)."""
    data = path.read_bytes()
    assert len(data) > keep, f"{path} has only {len(data)} bytes"
    path.write_bytes(data[:keep])


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path → bytes), to prove nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def msff_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "msff.cli", *args]


def run_msff(*args: str, timeout: float = 600, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """Run ``python -m msff.cli ARGS`` in a fresh process (what a user's shell does)."""
    e = dict(os.environ, PYTHONWARNINGS="ignore", **(env or {}))
    return subprocess.run(msff_cmd(*args), capture_output=True, text=True, timeout=timeout, env=e, cwd=cwd)


def one_error_line(stderr: str) -> str:
    """The single non-empty stderr line of a failed command (fails the test if there are more)."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, "expected one error line, got:\n" + stderr
    return lines[0]
