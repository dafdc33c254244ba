"""benchmarks/gpu_check_device.sh (`make gpu-check-device`): the one prepared call for the lent GPU
machine, where nothing can be installed. Here (no GPU) it can still be run with this venv's python
and ``--plan``: it records the versions, sees that msff._C is built, runs the check's planner and
copies its log into $OUT; its default budget must leave room for what `auto` needs (parity of every
unit, block timings and the sanitizer of the fastest passing CUDA variant)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check_device.sh"


def _kernels_built() -> bool:
    import msff.ops._cuda as c

    return c.kernels_built()


@pytest.mark.skipif(not _kernels_built(), reason="msff._C has no CUDA kernels: the script would build")
def test_device_script_plans_within_its_default_budget(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("GPU_BUDGET", "MSFF_CUDA_CONV")}
    env.update(GPU_PY=sys.executable, OUT=str(tmp_path / "out"))
    r = subprocess.run(["bash", str(SCRIPT), "--plan"], env=env, capture_output=True, text=True,
                       timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    log = (tmp_path / "out" / "gpu-check.log").read_text()
    assert f"python: {sys.executable}; budget 360s" in log
    import torch

    assert f"torch {torch.__version__}" in log  # the validation trail starts with the versions
    assert "msff._C with CUDA kernels is importable: no build" in log
    assert "gpu_check exit status 0" in log
    plan = [ln for ln in log.splitlines() if ln.startswith("  ")]
    units = [ln for ln in plan if ln.split()[0] == "parity"]
    assert {"cuda:generic", "cuda:tc", "cuda:tc-cpasync", "cuda:sm80", "triton"} <= {
        ln.split()[-1] for ln in units}
    needed = units + [ln for ln in plan if "fastest passing CUDA variant" in ln
                      or ln.split()[0] == "bench" and "block: reference" in ln]
    assert len(needed) == len(units) + 2, plan
    over = [ln for ln in needed if "past the budget" in ln]
    assert not over, over


def test_device_script_is_valid_bash_and_wired_into_make():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    mk = (ROOT / "Makefile").read_text()
    assert "gpu-check-device:" in mk and "benchmarks/gpu_check_device.sh" in mk
