"""Peak memory of ``msff predict`` against scene size (issue 14: memory must stay bounded).

``flock /tmp/msff-heavy.lock .venv/bin/python -m pytest benchmarks/test_bench_predict_memory.py --benchmark-only -s``

Each scene is a synthetic square uint16 3-band GeoTIFF (tiled, deflate; written in row blocks so the
generator itself stays small) predicted by ``msff predict`` in a child process with a width-×0.125
MSFFNet checkpoint (random weights: memory does not depend on them), the default engine, tile,
overlap and batch size. Measured per size:

* ``peak_rss_mb``: the child's peak resident set (``os.wait4`` ``ru_maxrss``), the number a user's
  machine must hold;
* ``rss_trace``: resident set sampled from ``/proc/PID/status`` every 0.25 s; ``sweep_rss_growth_mb``
  is the RSS at 90 % of the run minus the RSS at 25 % (the sweep phase): a buffer that grows with the
  scene shows up here and in the slope of the peak over sizes;
* wall seconds and MP/s.

The ONNX export of the checkpoint is made once before the sizes (its own peak is reported as
``export_run``), so the sizes measure prediction, not the exporter.

Sizes: ``MSFF_BENCH_MEM_SIZES`` (pixels per side, default ``2000,4000``: 4 and 16 MP; the README's
100 MP number is ``MSFF_BENCH_MEM_SIZES=10000``, ~6 min on 2 cores). Results are merged by size into
``benchmarks/results/predict_memory.json``. Reported, not asserted beyond a loose bound (a shared
machine's noise); the slope is the regression signal.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from _util import cpu_model

RESULTS = Path(__file__).parent / "results"
OUT_JSON = RESULTS / "predict_memory.json"
NORM = {"mean": [2000.0] * 3, "std": [1000.0] * 3}


def make_checkpoint(folder: Path) -> Path:
    """A width-×0.125 MSFFNet (3 bands, default kernel and blocks) with normalisation metadata."""
    import torch

    from msff import MSFFNet

    torch.manual_seed(0)
    m = MSFFNet(in_channels=3, width_multiplier=0.125)
    return m.save_pretrained(folder, metadata={"normalization": NORM, "bands": ["B4", "B3", "B2"],
                                               "threshold": 0.5, "model_name": "msffnet-w0.125"})


def make_scene(path: Path, side: int, block: int = 512) -> Path:
    """A ``side``² uint16 3-band GeoTIFF (UTM, 10 m, tiled 256², deflate), written in row blocks."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rng = np.random.default_rng(side)
    with rasterio.open(path, "w", driver="GTiff", width=side, height=side, count=3, dtype="uint16",
                       crs="EPSG:32654", transform=from_origin(500000, 4700000, 10, 10), nodata=0, tiled=True,
                       blockxsize=256, blockysize=256, compress="deflate", zlevel=1, bigtiff="if_safer") as ds:
        for y in range(0, side, block):
            h = min(block, side - y)
            # smooth-ish terrain plus noise: compresses like imagery, not like white noise
            base = (np.linspace(0, 3, side, dtype=np.float32)[None, :] + (y + np.arange(h))[:, None] / side)
            for b in range(3):
                x = 1500 + 800 * np.sin(base * (b + 1)) + rng.normal(0, 150, (h, side))
                ds.write(np.clip(x, 1, 65535).astype(np.uint16), b + 1, window=Window(0, y, side, h))
    return path


def _rss_mb(pid: int) -> float | None:
    try:
        for ln in Path(f"/proc/{pid}/status").read_text().splitlines():
            if ln.startswith("VmRSS:"):
                return int(ln.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_predict(ckpt: Path, scene: Path, out: Path, extra: tuple = (), env: dict | None = None) -> dict:
    """Run ``msff predict`` in a child process; its peak RSS (wait4), an RSS trace, and wall time."""
    cmd = [sys.executable, "-m", "msff.cli", "predict", str(ckpt), str(scene), "--out", str(out), "--quiet",
           "--overwrite", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    trace: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            r = _rss_mb(proc.pid)
            if r is not None:
                trace.append((time.perf_counter() - t0, r))
            stop.wait(0.25)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    output = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"msff predict failed ({proc.returncode}):\n{output[-3000:]}")

    def at(frac: float) -> float:
        ts = [r for t, r in trace if t <= frac * wall]
        return ts[-1] if ts else float("nan")

    return dict(peak_rss_mb=usage.ru_maxrss / 1024, seconds=wall, rss_at_25pct_mb=at(0.25), rss_at_50pct_mb=at(0.5),
                rss_at_90pct_mb=at(0.9), sweep_rss_growth_mb=at(0.9) - at(0.25),
                rss_trace=[(round(t, 2), round(r, 1)) for t, r in trace[:: max(1, len(trace) // 200)]],
                stdout_tail=output[-600:])


def measure(sizes, work: Path) -> dict:
    """Peak RSS of ``msff predict`` for each square scene side in ``sizes`` (export done first)."""
    env = dict(os.environ)
    env.setdefault("MSFF_CACHE_DIR", str(work / "cache"))
    ckpt = make_checkpoint(work / "ckpt")
    warm = make_scene(work / "warm.tif", 512)
    rows = {"export_run": dict(run_predict(ckpt, warm, work / "warm_out", env=env), side=512)}
    for side in sizes:
        scene = make_scene(work / f"scene{side}.tif", side)
        r = run_predict(ckpt, scene, work / f"out{side}", env=env)
        r.update(side=side, megapixels=side * side / 1e6, mp_per_s=side * side / 1e6 / r["seconds"],
                 input_mb=scene.stat().st_size / 2**20)
        for p in work.glob(f"out{side}*"):
            p.unlink()
        scene.unlink()
        rows[str(side)] = r
        print(f"{side}²: peak {r['peak_rss_mb']:.0f} MB, sweep growth {r['sweep_rss_growth_mb']:+.0f} MB, "
              f"{r['seconds']:.1f} s ({r['mp_per_s']:.2f} MP/s)", flush=True)
    return rows


def _merge(rows: dict) -> dict:
    import onnxruntime
    import torch

    doc = json.loads(OUT_JSON.read_text()) if OUT_JSON.is_file() else {}
    doc.setdefault("runs", {})
    for k, v in rows.items():
        v = dict(v, cpu=cpu_model(), torch_threads=torch.get_num_threads(),
                 written=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        doc["runs"][k] = v
    doc.update(
        what="peak RSS of `msff predict` (child process, os.wait4 ru_maxrss) vs square uint16 3-band scene size",
        model="MSFFNet width x0.125, 3 bands, random weights; default engine (auto), tile 512, overlap 128, batch 4",
        versions=dict(torch=torch.__version__, onnxruntime=onnxruntime.__version__, python=platform.python_version()),
        note="shared 2-core machine, run under flock /tmp/msff-heavy.lock",
    )
    RESULTS.mkdir(exist_ok=True)
    tmp = OUT_JSON.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, OUT_JSON)
    return doc


def test_bench_predict_memory(benchmark, tmp_path):
    sizes = [int(s) for s in os.environ.get("MSFF_BENCH_MEM_SIZES", "2000,4000").split(",") if s.strip()]
    rows = {}
    benchmark.pedantic(lambda: rows.update(measure(sizes, tmp_path)), rounds=1, iterations=1)
    _merge(rows)
    peaks = {k: v["peak_rss_mb"] for k, v in rows.items()}
    benchmark.extra_info.update({f"peak_rss_mb_{k}": v for k, v in peaks.items()})
    print(json.dumps(peaks, indent=1))
    if len(sizes) >= 2:
        small, large = str(min(sizes)), str(max(sizes))
        # bounded: growing the scene by (large/small)² must not grow the peak by more than the output
        # writer's strips and allocator noise (a full-scene buffer of float32 would add 4 B/pixel).
        extra_px = max(sizes) ** 2 - min(sizes) ** 2
        assert peaks[large] - peaks[small] < 0.5 * 4 * extra_px / 2**20 + 300, peaks


if __name__ == "__main__":  # one size by hand: python benchmarks/test_bench_predict_memory.py 10000
    sys.path.insert(0, str(Path(__file__).parent))
    with tempfile.TemporaryDirectory(prefix="msff-mem-") as d:
        rows = measure([int(a) for a in sys.argv[1:]] or [2000, 4000], Path(d))
    _merge(rows)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "rss_trace"} for k, v in rows.items()}, indent=1))
