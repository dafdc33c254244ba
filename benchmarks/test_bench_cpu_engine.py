"""CPU inference engines against the machine's limit, in one run (issue 14).

``flock /tmp/msff-heavy.lock pytest benchmarks/test_bench_cpu_engine.py --benchmark-only -s``

Reports, measured side by side in one process (alternating A/B/C rounds, medians, because a shared
machine's speed swings 3-5x between minutes):

* the machine's fp32 GEMM rate through torch (best of several sizes, best of 3 each);
* the MSFFNet ``cpu`` preset's GFLOP per 512² tile (``torch.utils.flop_counter``, 2 FLOP per MAC);
* per engine (``nchw`` = today's eager NCHW path, ``torch`` = channels_last eager,
  ``torch_compile`` = channels_last + ``torch.compile`` with frozen weights (inductor ``freezing``:
  oneDNN weight prepacking and fusions), ``onnx`` = onnxruntime on one tile, ``onnx_b4`` = on a batch
  of 4 tiles as ``predict`` runs it): seconds per tile, achieved GFLOP/s, fraction of the best GEMM
  rate of the run, the median of per-round fractions (the GEMM rate is measured again in each round,
  so a round's ratio is taken under one load), ratio to ``nchw``;
* where onnxruntime's time goes (its profiler, by op kind, convolution GFLOP/s per layer) and the
  ceiling that puts on the fraction of the GEMM rate: with every convolution at the GEMM rate the
  other nodes still take their time, so the fraction is at most ``F / (F + G·t_other)``;
* one convolution (3×3 and 1×15, Conv+ReLU) at equal FLOPs and 16…128 channels: how the layer width
  sets onnxruntime's convolution efficiency (MSFFNet's full-resolution layers have 16 channels);
* on a synthetic uint16 scene: the whole pipeline (:func:`predict_scene`: reads, domain check,
  normalisation, blending, COG writing) against the bare engine over the same windows at the same
  tile and overlap (MP/s both), and against the bare NCHW model over today's default grid
  (tile 512, overlap 128): the end-to-end speed-up;
* the seam error of a smaller overlap: tiled prediction at overlap 128 and 64 against one pass over
  a 1024² image (random-init weights: a trained model's effective receptive field can differ).

Sizes: ``MSFF_BENCH_SCENE=HxW`` (default 1856x1856: 25 windows at today's grid, 16 at overlap 64,
a window ratio of 1.56 like a 4000² scene's 1.49), ``MSFF_BENCH_ROUNDS`` (default 3),
``MSFF_BENCH_OVERLAP`` (default 64), ``MSFF_BENCH_COMPILE=0`` skips torch.compile (a cold compile
is ~40 s). Results: ``benchmarks/results/cpu_engine_<isa>_overlap<N>.json`` (the first two runs,
``cpu_engine_overlap64.json`` on AVX2 and ``cpu_engine_overlap128.json`` on AVX-512, predate the
ISA in the name).
Targets of issue 14 are printed beside the numbers; they are reported, not asserted (a shared
machine's noise would make such asserts flaky).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _util import cpu_model, synthetic_scene

from msff import build_model
from msff.inference import TileGrid, predict_array, predict_scene
from msff.inference.engine import make_engine, onnx_available

RESULTS = Path(__file__).parent / "results"
NORM = {"mean": [2000.0] * 3, "std": [1000.0] * 3}
TILE = 512


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def gemm_rate(sizes=(1024, 2048, 3072), reps: int = 3) -> dict:
    """Best fp32 GEMM GFLOP/s through torch over ``sizes`` (best of ``reps`` each)."""
    out = {}
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best = min(_timed(lambda a=a, b=b: a @ b) for _ in range(reps))
        out[n] = 2 * n**3 / best / 1e9
    return {"per_size_gflops": out, "best_gflops": max(out.values())}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def model_gflop(model, shape) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model(torch.randn(*shape))
    return fc.get_total_flops() / 1e9



def _profiling_options(threads: int, prefix: str):
    """onnxruntime session options of the profiled runs: the engine's settings (full graph
    optimisation, intra-op threads) with the profiler on, writing to ``prefix``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = prefix
    return so


def ort_profile(path, x: np.ndarray, threads: int, runs: int = 4) -> dict:
    """Per-node onnxruntime timing (its own profiler; the first run dropped) grouped by op kind,
    with the FLOPs of every convolution from its weight and output shapes (2 FLOP per MAC)."""
    import collections

    import onnxruntime as ort

    so = _profiling_options(threads, str(Path(path).with_suffix("")) + "-profile")
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        sess.run(None, {"x": x})
    prof = Path(sess.end_profiling())
    events = json.loads(prof.read_text())
    prof.unlink()
    durs, args = collections.defaultdict(list), {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            durs[e["name"]].append(e["dur"] / 1e6)
            args[e["name"]] = e.get("args", {})
    kinds: dict = collections.defaultdict(lambda: dict(s=0.0, gflop=0.0, nodes=0))
    layers = []
    for name, d in durs.items():
        a = args[name]
        op = a.get("op_name", "?")
        shapes = [next(iter(v.values())) for v in a.get("input_type_shape", [])]
        out = [next(iter(v.values())) for v in a.get("output_type_shape", [])]
        t = float(np.median(d[1:] if len(d) > 1 else d))
        gf, kind = 0.0, op
        if op in ("Conv", "FusedConv") and len(shapes) >= 2 and out:
            w = shapes[1]
            gf = 2.0 * float(np.prod(out[0])) * float(np.prod(w[1:])) / 1e9
            kind = f"Conv {w[2]}x{w[3]}"
            layers.append(dict(kind=kind, c_in=shapes[0][1], c_out=out[0][1], hw=out[0][2:], s=t, gflop=gf,
                               gflops=gf / t if t else 0.0))
        k = kinds[kind]
        k["s"] += t
        k["gflop"] += gf
        k["nodes"] += 1
    total = sum(k["s"] for k in kinds.values())
    for k in kinds.values():
        k["share"] = k["s"] / total
        k["gflops"] = k["gflop"] / k["s"] if k["s"] else 0.0
    conv_s = sum(k["s"] for n, k in kinds.items() if n.startswith("Conv "))
    return dict(batch=int(x.shape[0]), node_seconds=total, conv_seconds=conv_s, other_seconds=total - conv_s,
                kinds=dict(sorted(kinds.items(), key=lambda kv: -kv[1]["s"])),
                layers=sorted(layers, key=lambda r: -r["s"]))


def conv_sweep(threads=2, gflop_target=2.0, reps=6, channels=(16, 32, 64, 128), kernels=((3, 3), (1, 15))):
    """GFLOP/s of one Conv+ReLU node (onnxruntime's own profiler, NCHWc reorders excluded) at equal
    FLOPs and channel counts 16..128: how the width of the layer sets the efficiency."""
    import tempfile

    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rows = []
    for kh, kw in kernels:
        for c in channels:
            hw = max(16, int(round((gflop_target * 1e9 / (2 * c * c * kh * kw)) ** 0.5 / 16) * 16))
            w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(c, c, kh, kw)).astype(np.float32) * 0.05, "w")
            nodes = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[kh // 2, kw // 2, kh // 2, kw // 2]),
                     helper.make_node("Relu", ["y"], ["z"])]
            g = helper.make_graph(nodes, "c", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
                                  [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, c, hw, hw])], [w])
            m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
            so = _profiling_options(threads, os.path.join(tempfile.gettempdir(), f"msff-convsweep-{os.getpid()}"))
            s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
            x = np.random.default_rng(1).normal(size=(1, c, hw, hw)).astype(np.float32)
            for _ in range(reps + 1):
                s.run(None, {"x": x})
            prof = s.end_profiling()
            with open(prof) as f:
                ev = json.load(f)
            os.unlink(prof)
            d = [e["dur"] / 1e6 for e in ev if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
                 and e["args"].get("op_name") in ("Conv", "FusedConv")][1:]
            gf = 2 * c * c * kh * kw * hw * hw / 1e9
            t = float(np.median(d))
            rows.append(dict(kernel=f"{kh}x{kw}", channels=c, hw=hw, gflop=gf, s=t, gflops=gf / t))
    return rows


def _bare(engine, windows: int, batch: int, shape) -> float:
    xb = torch.randn(batch, *shape)
    t0 = time.perf_counter()
    with torch.inference_mode():
        left = windows
        while left > 0:
            engine(xb[: min(batch, left)])
            left -= batch
    return time.perf_counter() - t0


@pytest.mark.skipif(onnx_available() is not None, reason=f"onnx engine: {onnx_available()}")
def test_bench_cpu_engine(benchmark, tmp_path):
    torch.manual_seed(0)
    rounds = _env_int("MSFF_BENCH_ROUNDS", 3)
    overlap = _env_int("MSFF_BENCH_OVERLAP", 64)
    h, w = map(int, os.environ.get("MSFF_BENCH_SCENE", "1856x1856").lower().split("x"))
    model = build_model("cpu", in_channels=3).eval()
    batch = 4  # predict's default: windows per forward pass
    engines = {"nchw": make_engine(model, "nchw"), "torch": make_engine(model, "torch"), "onnx": make_engine(model, "onnx")}
    runs = {k: (e, 1) for k, e in engines.items()}
    runs["onnx_b4"] = (engines["onnx"], batch)
    compile_s = None
    if os.environ.get("MSFF_BENCH_COMPILE", "1") == "1":  # torch's best CPU path: inductor with frozen weights
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        compiled = torch.compile(engines["torch"].model)
        t0 = time.perf_counter()
        with torch.inference_mode():
            compiled(torch.randn(1, 3, TILE, TILE).contiguous(memory_format=torch.channels_last))
        compile_s = time.perf_counter() - t0
        runs["torch_compile"] = (lambda x: compiled(x.contiguous(memory_format=torch.channels_last)), 1)

    gemm_sizes = tuple(int(v) for v in os.environ.get("MSFF_BENCH_GEMM", "1024,2048,3072").split(","))
    gemm = gemm_rate(gemm_sizes)
    gflop = model_gflop(model, (1, 3, TILE, TILE))

    # --- engines on one tile (and onnx on a batch of 4), alternating; the GEMM rate is measured
    # again in every round, so each round gives a ratio taken under the same load ---
    xs = {1: torch.randn(1, 3, TILE, TILE), batch: torch.randn(batch, 3, TILE, TILE)}
    times = {k: [] for k in runs}
    ratios = {k: [] for k in runs}
    gemm_rounds = []
    with torch.inference_mode():
        for f, b in runs.values():
            f(xs[b])
        for r in range(rounds + 2):
            g = gemm_rate(gemm_sizes[-2:], reps=2)["best_gflops"]
            gemm_rounds.append(g)
            order = list(runs) if r % 2 == 0 else list(reversed(runs))
            for k in order:
                f, b = runs[k]
                t = _timed(lambda f=f, b=b: f(xs[b])) / b
                times[k].append(t)
                ratios[k].append(gflop / t / g)
    best_gemm = max([gemm["best_gflops"], *gemm_rounds])
    tile_s = {k: float(np.median(v)) for k, v in times.items()}
    eng_rows = {
        k: dict(batch=runs[k][1], s_per_tile=s, gflops=gflop / s, of_gemm=gflop / s / best_gemm,
                of_gemm_same_round_median=float(np.median(ratios[k])), vs_nchw=tile_s["nchw"] / s)
        for k, s in tile_s.items()
    }
    # where the onnx engine's time goes (onnxruntime's profiler, same graph, batch 4)
    g_prof = gemm_rate(gemm_sizes[-2:], reps=2)["best_gflops"]  # the load of the profiling minute
    profile = ort_profile(engines["onnx"].path, xs[batch].numpy(), engines["onnx"].threads)
    # Even with every convolution at the GEMM rate, the other nodes' time stays: the ceiling of the
    # engine's fraction of the GEMM rate is F / (F + G * t_other) per tile.
    t_other = profile["other_seconds"] / batch
    ceiling = gflop / (gflop + g_prof * t_other)
    g_sweep = gemm_rate(gemm_sizes[-2:], reps=2)["best_gflops"]
    sweep = [dict(r, of_gemm=r["gflops"] / g_sweep) for r in conv_sweep(engines["onnx"].threads)]
    profile.update(gemm_gflops_at_profile=g_prof,
                   conv_gflops=sum(k["gflop"] for n, k in profile["kinds"].items() if n.startswith("Conv "))
                   / max(profile["conv_seconds"], 1e-9))

    # --- pipeline vs bare engine (same tile, overlap, windows, batch); vs today's NCHW grid ---
    src = synthetic_scene(tmp_path / "scene.tif", h, w)
    grid = TileGrid(h, w, TILE, overlap)
    today = TileGrid(h, w, TILE, 128)
    counter = iter(range(10**6))

    def pipeline():
        i = next(counter)
        return predict_scene(model, src, tmp_path / f"p{i}.tif", tmp_path / f"m{i}.tif", normalization=NORM, tile=TILE,
                             overlap=overlap, batch_size=batch, progress=False, engine="onnx")

    pipe_t, bare_t, nchw_today_t = [], [], []
    for r in range(rounds):
        steps = [("pipe", pipeline), ("bare", lambda: _bare(engines["onnx"], len(grid), batch, (3, grid.tile_h, grid.tile_w))),
                 ("nchw", lambda: _bare(engines["nchw"], len(today), batch, (3, today.tile_h, today.tile_w)))]
        if r % 2:
            steps.reverse()
        for name, fn in steps:
            if name == "pipe":
                t = _timed(fn)
                pipe_t.append(t)
            elif name == "bare":
                bare_t.append(fn())
            else:
                nchw_today_t.append(fn())
    # pytest-benchmark's own row: the pipeline (one more round)
    res = benchmark.pedantic(pipeline, rounds=1, iterations=1)
    pipe_t.append(benchmark.stats.stats.median)
    mp = h * w / 1e6
    pipe, bare, nchw_today = (float(np.median(v)) for v in (pipe_t, bare_t, nchw_today_t))

    # --- seam error of a smaller overlap (one pass over 1024² as the reference) ---
    rng = np.random.default_rng(1)
    img = (rng.normal(size=(3, 1024, 1024)) * 1000 + 2000).astype(np.float32)
    one = predict_array(model, img, normalization=NORM, tile=1024, overlap=0, engine="onnx")
    seams = {}
    for ov in (128, 64, 32):
        p = predict_array(model, img, normalization=NORM, tile=TILE, overlap=ov, batch_size=batch, engine="onnx")
        seams[ov] = dict(max_abs_prob_diff=float(np.abs(p - one).max()), mean_abs_prob_diff=float(np.abs(p - one).mean()),
                         mask_disagreement=float(((p >= 0.5) != (one >= 0.5)).mean()))

    doc = dict(
        machine=dict(cpu=cpu_model(), cores=os.cpu_count(),
                     torch_threads=torch.get_num_threads(), torch=torch.__version__,
                     onnxruntime=__import__("onnxruntime").__version__,
                     note="shared machine; run under flock /tmp/msff-heavy.lock; alternating rounds, medians"),
        gemm=dict(gemm, per_round_gflops=gemm_rounds, best_in_run=best_gemm),
        model="MSFFNet cpu preset (width x0.25), 3 bands, eval, fp32", tile=TILE,
        gflop_per_tile=gflop, engines=eng_rows, rounds=rounds, torch_compile_cold_s=compile_s,
        conv_width_sweep=dict(gemm_gflops=g_sweep, rows=sweep,
                              what="one Conv+ReLU node, equal FLOPs, onnxruntime profiler time (reorders excluded)"),
        onnx_profile=dict(profile, of_gemm_ceiling_if_convs_ran_at_gemm_rate=ceiling,
                          layers=profile["layers"][:20]),
        scene=dict(size=f"{h}x{w}x3 uint16", megapixels=mp, overlap=overlap, windows=len(grid), batch=batch,
                   today_windows=len(today), pipeline_s=pipe, pipeline_mp_s=mp / pipe, bare_onnx_s=bare,
                   bare_onnx_mp_s=mp / bare, pipeline_of_bare=bare / pipe, bare_nchw_today_grid_s=nchw_today,
                   end_to_end_speedup_vs_nchw_today=nchw_today / pipe, valid_pixels=res.valid_pixels),
        grid_4000=dict(today_windows=len(TileGrid(4000, 4000, TILE, 128)), windows=len(TileGrid(4000, 4000, TILE, overlap))),
        seams_vs_one_pass_1024=seams,
        targets=dict(engine_of_gemm=">= 0.90", pipeline_of_bare=">= 0.85", end_to_end_speedup=">= 2.0"),
        written=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    benchmark.extra_info.update(gflop_per_tile=gflop, gemm_best_gflops=gemm["best_gflops"],
                                **{f"{k}_gflops": v["gflops"] for k, v in eng_rows.items()},
                                pipeline_of_bare=bare / pipe, end_to_end_speedup=nchw_today / pipe,
                                onnx_of_gemm_ceiling=ceiling)
    RESULTS.mkdir(exist_ok=True)
    isa = doc["machine"]["cpu"].rsplit("(", 1)[-1].rstrip(")")
    out = RESULTS / f"cpu_engine_{isa}_overlap{overlap}.json"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, out)
    print(json.dumps(doc, indent=2))
    assert res.valid_pixels == h * w
