"""Whole-scene prediction throughput (megapixels per second), pipeline vs bare model.

``pytest benchmarks/test_bench_predict.py --benchmark-only`` (add ``-m gpu`` for the GPU variant).
Each case predicts a synthetic 3-band uint16 GeoTIFF end to end with :func:`predict_scene` (windowed
reads, normalisation, blending, COG writing) and, beside it, runs the bare model over the same
windows: the ratio is the pipeline's overhead. Results (median seconds, MP/s, device, versions)
are also written as JSON to ``benchmarks/results/predict_<device>.json``.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _util import synthetic_scene

from msff import build_model
from msff.inference import TileGrid, predict_scene

RESULTS = Path(__file__).parent / "results"
NORM = {"mean": [2000.0] * 3, "std": [1000.0] * 3}

CASES = {
    # name: (device, scene H, W, tile, overlap, batch, amp)
    "cpu": ("cpu", 768, 1024, 512, 64, 2, False),
    "gpu": ("cuda", 4096, 4096, 512, 64, 8, True),
}



def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _record(name: str, entry: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    f = RESULTS / f"predict_{name}.json"
    entry.update(
        device=torch.cuda.get_device_name() if name == "gpu" else platform.processor() or platform.machine(),
        torch=torch.__version__, cpu_threads=torch.get_num_threads(),
        tf32=bool(torch.backends.cuda.matmul.allow_tf32), dtype="bf16 autocast" if entry.get("amp") else "float32",
        layout="NCHW",
    )
    f.write_text(json.dumps(entry, indent=2))


@pytest.mark.parametrize(
    "name",
    [
        "cpu",
        pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
    ],
)
def test_bench_predict_scene(benchmark, tmp_path_factory, name):
    device, h, w, tile, overlap, batch, amp = CASES[name]
    torch.manual_seed(0)
    model = build_model("cpu", in_channels=3).eval().to(device)  # width_multiplier 0.25
    if device == "cuda":
        torch.backends.cudnn.benchmark = True
    d = tmp_path_factory.mktemp(f"bench_{name}")
    src = synthetic_scene(d / "scene.tif", h, w)
    counter = iter(range(10**6))

    def run():
        i = next(counter)
        r = predict_scene(model, src, d / f"p{i}.tif", d / f"m{i}.tif", normalization=NORM, tile=tile,
                          overlap=overlap, batch_size=batch, device=device, amp=amp, progress=False)
        _sync(device)
        return r

    r = benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    med = benchmark.stats.stats.median
    mp = h * w / 1e6

    # the bare model over the same number of windows (random data already on the device)
    grid = TileGrid(h, w, tile, overlap)
    xb = torch.randn(batch, 3, grid.tile_h, grid.tile_w, device=device)
    nb = -(-len(grid) // batch)
    ctx = torch.autocast(device, dtype=torch.bfloat16) if amp else torch.autocast(device, enabled=False)
    times = []
    with torch.inference_mode(), ctx:
        model(xb)
        for _ in range(3):
            _sync(device)
            t0 = time.perf_counter()
            for _ in range(nb):
                model(xb)
            _sync(device)
            times.append(time.perf_counter() - t0)
    bare = float(np.median(times))
    entry = dict(
        case=name, scene=f"{h}x{w}x3 uint16", megapixels=mp, tile=tile, overlap=overlap, batch=batch, amp=amp,
        windows=len(grid), median_s=med, megapixels_per_s=mp / med, model_only_s=bare,
        model_only_megapixels_per_s=mp / bare, pipeline_overhead_ratio=med / bare,
    )
    benchmark.extra_info.update(entry)
    _record(name, entry)
    assert r.valid_pixels == h * w
    print(json.dumps(entry, indent=2))
