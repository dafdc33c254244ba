"""Benchmark-session set-up shared by every benchmark file.

* Adds torch / CUDA / cuDNN / Triton versions, the GPU name and the TF32 flags to
  pytest-benchmark's machine_info, so `--benchmark-json` output states what was measured where.
* With ``MSFF_BENCH_RESULTS=path.json`` (``make bench`` sets it) writes a compact summary: one row
  per benchmark with median/IQR/rounds and its ``extra_info`` (provider, mode, dtype, layout,
  peak memory), plus the environment.
"""
from __future__ import annotations

import json
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "0")


def environment() -> dict:
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_threads": torch.get_num_threads(),
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # noqa: BLE001 - report only
        info["triton"] = None
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["msff_env"] = environment()


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("MSFF_BENCH_RESULTS")
    bs = getattr(session.config, "_benchmarksession", None)
    if not path or bs is None or not getattr(bs, "benchmarks", None):
        return
    rows = []
    for b in bs.benchmarks:
        st = b.stats
        if st is None:
            continue
        rows.append(
            {
                "name": b.name,
                "group": b.group,
                "median_s": st.median,
                "iqr_s": st.iqr,
                "min_s": st.min,
                "rounds": st.rounds,
                **{f"extra.{k}": v for k, v in b.extra_info.items()},
            }
        )
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"environment": environment(), "groups": summarize(rows), "benchmarks": rows},
                  f, indent=2, default=str)
    os.replace(tmp, path)


def summarize(rows: list[dict]) -> list[dict]:
    """One entry per (benchmark group, shape, mode, dtype): each provider's median, TFLOP/s, % of
    the bf16 peak and its ratio to eager (``reference``) and to each torch.compile provider (>1 =
    faster than that baseline), with its memory."""
    peak = 989e12
    groups: dict = {}
    for r in rows:
        key = (r.get("group"), r.get("extra.shape"), r.get("extra.mode"), r.get("extra.dtype"))
        groups.setdefault(key, []).append(r)
    out = []
    for (group, shape, mode, dtype), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
        base = {r.get("extra.provider"): r["median_s"] for r in rs}
        provs = []
        for r in rs:
            p = {"provider": r.get("extra.provider"), "median_s": r["median_s"],
                 "peak_mib": r.get("extra.peak_mib"),
                 "activation_mib": r.get("extra.activation_mib")}
            flops = r.get("extra.flops")
            if flops:
                p["tflops"] = flops / r["median_s"] / 1e12
                p["pct_bf16_peak"] = 100 * flops / r["median_s"] / peak
            for b in ("reference", "reference+compile", "reference+max-autotune",
                      "reference+freezing"):
                if base.get(b):
                    p[f"ratio_vs_{b}"] = base[b] / r["median_s"]
            provs.append(p)
        out.append({"group": group, "shape": shape, "mode": mode, "dtype": dtype,
                    "providers": provs})
    return out
