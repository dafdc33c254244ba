"""Timing/memory helpers of the op- and block-level benchmarks (test_bench_lkam.py,
test_bench_lk_conv.py).

Every GPU measurement synchronizes (``torch.cuda.synchronize()`` inside the timed function),
warm-up rounds run first, and pytest-benchmark reports the median. Results are also written as
JSON under ``benchmarks/results/`` (only when a GPU is present: CPU numbers of the Triton
interpreter mean nothing, and the reference's CPU numbers are in pytest-benchmark's own output).
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import pytest
import torch

GPU = torch.cuda.is_available()
RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: reference = eager PyTorch (cuDNN, cudnn.benchmark on); +compile = torch.compile default;
#: +max-autotune = torch.compile(mode="max-autotune"); +freezing = max-autotune with inductor
#: freezing (conv-BN folded; inference only)
PROVIDERS = ["reference", "reference+compile", "reference+max-autotune", "reference+freezing",
             "triton", "cuda"]
PEAK_BF16 = 989e12  # H100/H200 SXM dense bf16 tensor-core FLOP/s


def synthetic_scene(path: Path, h: int, w: int) -> Path:
    """A random uint16 3-band GeoTIFF (UTM 54N, 10 m, nodata 0, 256² deflate tiles) for the scene
    benchmarks; seeded, so every run reads the same pixels."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin

    rng = np.random.default_rng(0)
    x = rng.integers(300, 4000, size=(3, h, w), dtype=np.uint16)
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=3, dtype="uint16", crs="EPSG:32654",
                       transform=from_origin(500000, 4700000, 10, 10), nodata=0, tiled=True,
                       blockxsize=256, blockysize=256, compress="deflate") as ds:
        ds.write(x)
    return path


def cpu_model() -> str:
    """CPU model name and its widest vector ISA (the machine under a VM can change between runs)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    name = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), "?")
    isa = "avx512" if "avx512f" in text else "avx2" if "avx2" in text else "other"
    return f"{name} ({isa})"


def compiled(fn, provider: str):
    """``fn`` as the provider runs it: eager, or torch.compile in the provider's mode."""
    if provider == "reference+compile":
        return torch.compile(fn)
    if provider == "reference+max-autotune":
        return torch.compile(fn, mode="max-autotune")
    if provider == "reference+freezing":
        import torch._inductor.config as icfg

        icfg.freezing = True  # read when the graph compiles (first call, inside the warm-up)
        return torch.compile(fn, mode="max-autotune")
    return fn


def uncompile(provider: str) -> None:
    if provider == "reference+freezing":
        import torch._inductor.config as icfg

        icfg.freezing = False


def sync():
    if GPU:
        torch.cuda.synchronize()


def backend_of(provider: str) -> str:
    return "reference" if provider.startswith("reference") else provider


def skip_unless_runs(provider: str, x: torch.Tensor) -> None:
    """Skip (with the reason) a provider that cannot run on ``x`` here."""
    from msff.backend import resolve_backend

    try:
        resolve_backend(backend_of(provider), x)
    except Exception as e:  # noqa: BLE001 - the reason is the skip message
        pytest.skip(f"{provider}: {e}")


def environment() -> dict:
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if GPU else None,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001
        info["triton"] = None
    return info


def measure_memory(step, setup=None) -> dict:
    """Peak memory (MiB) of one ``step()`` above what was allocated before it, and the memory
    still held after it (e.g. saved activations when ``step`` is a training forward)."""
    if not GPU:
        return {}
    if setup is not None:
        setup()
    sync()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    keep = step()
    sync()
    out = {
        "peak_mib": (torch.cuda.max_memory_allocated() - before) / 2**20,
        "held_after_mib": (torch.cuda.memory_allocated() - before) / 2**20,
    }
    del keep
    return out


class ResultLog:
    """Collects one row per benchmark; ``write(name)`` dumps them with the environment."""

    def __init__(self):
        self.rows: list[dict] = []

    def add(self, benchmark, **info):
        benchmark.extra_info.update(info)
        st = benchmark.stats.stats if benchmark.stats is not None else None
        row = dict(info)
        if st is not None:
            row.update(median_s=st.median, iqr_s=st.iqr, min_s=st.min, rounds=st.rounds)
        self.rows.append(row)

    def write(self, name: str) -> Path | None:
        if not GPU or not self.rows:
            return None
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        gpu = torch.cuda.get_device_name(0).replace(" ", "_")
        path = RESULTS_DIR / f"{name}_{gpu}.json"
        tmp = path.with_suffix(".tmp")
        doc = {"environment": environment(), "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "benchmarks": self.rows}
        tmp.write_text(json.dumps(doc, indent=2, default=str))
        os.replace(tmp, path)
        return path
