"""Tiled prediction against one pass with a TRAINED checkpoint: what the overlap buys (issue 14).

``MSFF_SEAM_CKPT=path/to/checkpoint flock /tmp/msff-heavy.lock .venv/bin/python -m pytest
benchmarks/test_bench_seams_trained.py --benchmark-only -s``

Random-init weights give a near-constant output, so they cannot tell how much overlap a model
needs. This benchmark takes a trained 3-band checkpoint (``MSFF_SEAM_CKPT``; skipped without one)
and the 18 Sichuan scenes of ``../shared/data/sichuan_landslide`` (1024² RGB uint8 whole scenes
with masks; skipped where absent), predicts each in one pass (tile 1024) and tiled (tile 512 at
overlap 128 / 64 / 32 / 0, and tile 256 at overlap 64), and reports per setting: mean |Δp| and the
99th percentile against the one pass, the fraction of pixels whose mask differs from the one pass,
and IoU against the ground-truth mask (mean over scenes; the one pass's IoU beside it).
``MSFF_SEAM_SPLIT=path/split.json`` (an experiment's split file) marks which scenes were held out.
Results: ``benchmarks/results/seams_trained.json``. Reported, not asserted.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sichuan_landslide"
SETTINGS = {"512/128": (512, 128), "512/64": (512, 64), "512/32": (512, 32), "512/0": (512, 0), "256/64": (256, 64)}


def _scenes():
    names = sorted(p.name for p in (DATA / "images").glob("Landslide*.png"))
    held = set()
    split = os.environ.get("MSFF_SEAM_SPLIT")
    if split:
        held = set(json.loads(Path(split).read_text()).get("sichuan", {}).get("test", []))
    return [(n, "test" if n in held else "train" if held else "?") for n in names]


@pytest.mark.skipif(not os.environ.get("MSFF_SEAM_CKPT"), reason="set MSFF_SEAM_CKPT to a trained 3-band checkpoint")
@pytest.mark.skipif(not (DATA / "images").is_dir(), reason=f"{DATA} not present")
def test_bench_seams_trained(benchmark):
    from PIL import Image

    from msff.inference import load_predictor, predict_array

    ckpt = os.environ["MSFF_SEAM_CKPT"]
    pred = load_predictor(ckpt)
    rows = []

    def run():
        for name, part in _scenes():
            img = np.asarray(Image.open(DATA / "images" / name).convert("RGB")).transpose(2, 0, 1).astype(np.float32)
            gt = np.asarray(Image.open(DATA / "masks" / name.replace("Landslide", "LandslideLabel")).convert("RGB"))[..., 0] > 127
            one = predict_array(pred, img, tile=max(img.shape[1:]), overlap=0)

            def iou(p, gt=gt):
                m = p >= pred.threshold
                return float((m & gt).sum() / max((m | gt).sum(), 1))

            r = dict(name=name, part=part, one_pass_iou=iou(one))
            for key, (tile, ov) in SETTINGS.items():
                p = predict_array(pred, img, tile=tile, overlap=ov, batch_size=4)
                d = np.abs(p - one)
                r[key] = dict(mean_abs=float(d.mean()), p99_abs=float(np.quantile(d, 0.99)), max_abs=float(d.max()),
                              mask_disagree=float(((p >= pred.threshold) != (one >= pred.threshold)).mean()), iou=iou(p))
            rows.append(r)

    benchmark.pedantic(run, rounds=1, iterations=1)
    summary = {}
    for part in ("all", "test"):
        rr = [r for r in rows if part == "all" or r["part"] == "test"]
        if not rr:
            continue
        summary[part] = {"n": len(rr), "one_pass_iou": float(np.mean([r["one_pass_iou"] for r in rr]))}
        for key in SETTINGS:
            summary[part][key] = {m: float(np.mean([r[key][m] for r in rr])) for m in ("mean_abs", "p99_abs", "mask_disagree", "iou")}
    doc = dict(checkpoint=str(ckpt), model=pred.name, data=str(DATA), settings={k: dict(tile=t, overlap=o) for k, (t, o) in SETTINGS.items()},
               summary=summary, scenes=rows, written=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "seams_trained.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, out)
    print(json.dumps(summary, indent=1))
