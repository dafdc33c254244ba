"""Aggregation and report files of a comparison experiment (:mod:`msff.engine.experiment`):
per-model mean ± sample std over seeds (:func:`summarize`), every model against the reference
paired by seed (:func:`paired_comparisons`, statistics from :mod:`msff.engine.stats`), and the
result files ``results.json``, ``results.csv``, ``results.md`` and ``results.png``
(:func:`write_reports`). Every file is written atomically.

Example:
    >>> runs = [{"model": "a", "model_name": "unet", "seed": s, "iou": v, "per_dataset": {}}
    ...         for s, v in enumerate([0.25, 0.5, 0.75])]
    >>> summarize(runs, ["a"], [])["a"]["iou"]
    {'mean': 0.5, 'std': 0.25, 'n': 3}
"""
from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from msff.engine.report import _plt, atomic_write_bytes, atomic_write_json
from msff.engine.stats import mean_std as _mean_std
from msff.engine.stats import (
    minimum_detectable_difference,
    paired_test,
    seeds_for_power,
    welch_test,
)

__all__ = ["METRICS", "BOUNDARY_METRICS", "CONFUSABLE_METRICS", "PAIRED_METRICS", "summarize",
           "paired_comparisons", "write_reports", "write_results_json", "write_results_csv",
           "write_results_markdown", "plot_results"]

METRICS = ("precision", "recall", "iou", "f1")
BOUNDARY_METRICS = ("boundary_iou", "boundary_f")
CONFUSABLE_METRICS = ("soil_fp_rate", "background_fp_rate")
PAIRED_METRICS = ("iou", "boundary_iou", "boundary_f", "soil_fp_rate")

_SUMMARY_KEYS = METRICS + BOUNDARY_METRICS + CONFUSABLE_METRICS + ("iou_dataset_mean", "params", "steps", "epochs_run", "train_s", "infer_s_per_mpx",
                           "infer_ms_crop")


def summarize(results: Sequence[dict], labels: Sequence[str], datasets: Sequence[str]) -> dict:
    """Per model: mean, sample std (ddof 1) and count over seeds of every metric.

    Returns:
        ``{label: {"precision": {"mean", "std", "n"}, …, "iou/<dataset>": {...}, "seeds": [...]}}``
        for the labels that have at least one run.
    """
    out: dict[str, dict] = {}
    for label in labels:
        rs = [r for r in results if r["model"] == label]
        if not rs:
            continue
        s: dict[str, Any] = {k: _mean_std([r.get(k) for r in rs]) for k in _SUMMARY_KEYS}
        for d in datasets:
            for k in ("iou", "f1", "boundary_iou"):
                s[f"{k}/{d}"] = _mean_std([r["per_dataset"][d].get(k) for r in rs if d in r["per_dataset"]])
        s["seeds"] = sorted(r["seed"] for r in rs)
        erfs = [r["erf"] for r in rs if r.get("erf")]
        if erfs and all(len(e) == len(erfs[0]) for e in erfs):
            s["erf"] = [{"name": st["name"], "stride": st["stride"],
                         "r50": _mean_std([e[i]["r50"] for e in erfs]), "r90": _mean_std([e[i]["r90"] for e in erfs])}
                        for i, st in enumerate(erfs[0])]
        s["model_name"] = rs[0]["model_name"]
        out[label] = s
    return out


def paired_comparisons(results: Sequence[dict], reference: str, labels: Sequence[str],
                       metrics: Sequence[str] = PAIRED_METRICS, delta: float = 0.02) -> dict:
    """Every model against ``reference``, paired by seed, for each metric.

    Runs pair only when their ``data_order`` digests agree (the same training data in the same
    order); a seed whose runs differ is left out and listed under ``unpaired_seeds``.

    Returns:
        ``{label: {metric: paired_test(...) + {"seeds_for_power", "mdd"}}, "unpaired_seeds": [...]}``
        where ``seeds_for_power`` is :func:`seeds_for_power` at ``delta`` and ``mdd`` the minimum
        detectable difference at the seeds run (α = 0.05, power 0.8).
    """
    by = {lab: {r["seed"]: r for r in results if r["model"] == lab} for lab in labels}
    ref = by.get(reference, {})
    out: dict[str, Any] = {}
    for lab in labels:
        if lab == reference or not by[lab]:
            continue
        seeds = [s for s in by[lab] if s in ref and by[lab][s].get("data_order") == ref[s].get("data_order")]
        entry: dict[str, Any] = {"unpaired_seeds": sorted(s for s in by[lab] if s in ref and s not in seeds)}
        for m in metrics:
            pt = paired_test({s: by[lab][s].get(m) for s in seeds}, {s: ref[s].get(m) for s in seeds})
            pt["seeds_for_power"] = seeds_for_power(pt["sd"], delta) if pt["n"] >= 2 else None
            pt["mdd"] = minimum_detectable_difference(pt["sd"], pt["n"])
            entry[m] = pt
        out[lab] = entry
    return out


def _pm(s: dict, digits: int = 3) -> str:
    if not s or s["n"] == 0 or not math.isfinite(s["mean"]):
        return "–"
    return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def _datasets(out: dict) -> list:
    return list(out["config"]["datasets"])


def write_results_json(out: dict, path: str | os.PathLike) -> Path:
    """``results.json``: the whole experiment result (config, split, runs, summary, paired) but the
    count of skipped runs (which depends on the invocation, not on the results)."""
    atomic_write_json(path, {k: v for k, v in out.items() if k != "skipped"})
    return Path(path)


def write_results_csv(out: dict, path: str | os.PathLike) -> Path:
    """``results.csv``: one row per model (``model``, ``model_name``, ``runs``), a ``<metric>_mean``
    and ``<metric>_std`` column per summarised metric (``iou/<dataset>`` per dataset)."""
    summary, datasets = out["summary"], _datasets(out)
    cols = list(METRICS) + list(BOUNDARY_METRICS) + list(CONFUSABLE_METRICS) + ["iou_dataset_mean"] + \
        [f"iou/{d}" for d in datasets] + ["params", "steps", "train_s", "infer_s_per_mpx", "infer_ms_crop"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["model", "model_name", "runs"] + [f"{c}_{s}" for c in cols for s in ("mean", "std")])
    for label, s in summary.items():
        w.writerow([label, s["model_name"], s["iou"]["n"]] +
                   [f"{s[c][k]:.6g}" for c in cols for k in ("mean", "std")])
    atomic_write_bytes(path, buf.getvalue().encode())
    return Path(path)


def results_markdown(out: dict) -> str:
    """The ``results.md`` text: protocol, the table of mean ± std per model, and (with a reference and
    more than one model) the paired differences to the reference and Welch's unpaired view."""
    cfg, summary, datasets = out["config"], out["summary"], _datasets(out)
    t = cfg["train"]
    lines = [f"# Experiment `{cfg['name']}`", ""]
    if cfg.get("description"):
        lines += [cfg["description"], ""]
    epochs = t.get("epochs", 150)
    budget = f"{epochs} epochs"
    if t.get("samples_per_epoch"):
        budget += f" of {t['samples_per_epoch']} crops (≤ {epochs * math.ceil(t['samples_per_epoch'] / t.get('batch_size', 32))} steps)"
    if t.get("time_budget_s"):
        budget += f", capped at {t['time_budget_s']:.0f} s of wall time"

    lines += [
        f"Protocol (identical for every model): datasets {', '.join(datasets)}; split "
        f"val {cfg['split']['val_ratio']}, test {cfg['split']['test_ratio']} per dataset (seed "
        f"{cfg['split']['seed']}, names in `split.json`); crops {t.get('crop')}², batch {t.get('batch_size', 32)}, "
        f"Adam lr {t.get('lr', 1e-4)}, loss {t.get('loss', 'bce')}, augmentation {t.get('augment', True)}, "
        f"budget {budget} per run, width multiplier {t.get('width_multiplier') or 1}; "
        f"evaluated weights: {cfg['select']}; seeds {cfg['seeds']}.",
        "",
        "Test metrics on whole images, mean ± sample std over seeds. Precision/recall/IoU/F1 are "
        "micro-averaged over all test pixels of all datasets (the largest images dominate); "
        "\"IoU mean/ds\" averages the per-dataset IoUs (each dataset counts once). "
        "B-IoU: Boundary IoU (Cheng et al. 2021; band 0.02 × image diagonal); B-F: boundary F-score "
        "(2 px tolerance); Soil FP: share of soil-like ground-truth background (low greenness, bright; "
        "`msff.analysis.confusable`) predicted landslide; BG FP: share of all background predicted landslide. "
        "ERF r50: radius (input pixels) holding half the effective receptive field (Luo et al. 2016) of each "
        "encoder stage of the trained network, shallow to deep (`msff erf`; stage names in results.json).",
        "",
    ]
    head = ["Model", "Runs", "Params", "Steps", "Precision", "Recall", "IoU", "F1", "B-IoU", "B-F", "Soil FP",
            "BG FP", "IoU mean/ds"] + [f"IoU {d}" for d in datasets] + ["Train s", "Infer s/Mpx", "ERF r50 px per stage"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "|".join(["---"] * len(head)) + "|")
    for label, s in summary.items():
        row = [f"`{label}`", str(s["iou"]["n"]), f"{s['params']['mean'] / 1e6:.2f} M", f"{s['steps']['mean']:.0f}"]
        row += [_pm(s[m]) for m in METRICS + BOUNDARY_METRICS + CONFUSABLE_METRICS] + [_pm(s["iou_dataset_mean"])]
        row += [_pm(s[f"iou/{d}"]) for d in datasets]
        row += [f"{s['train_s']['mean']:.0f}", f"{s['infer_s_per_mpx']['mean']:.2f}"]
        row += ["/".join(f"{st['r50']['mean']:.0f}" for st in s["erf"]) if s.get("erf") else "–"]
        lines.append("| " + " | ".join(row) + " |")
    ref = cfg.get("reference")
    if ref in summary and len(summary) > 1:
        paired = out.get("paired") or paired_comparisons(out["runs"], ref, list(summary))
        lines += ["", f"Paired differences to `{ref}` (Δ = other − {ref}, per seed: a seed fixes the weight "
                  "initialisation and the training crops and their order, the same for every model): mean Δ, its "
                  "95 % confidence interval, effect size d_z = mean Δ / sd(Δ), paired t-test (two-sided p). "
                  "\"Seeds for 0.02\": how many seeds a paired test would need to detect |Δ| = 0.02 with 80 % power "
                  "at α = 0.05 given the observed sd(Δ); \"MDD\": the smallest difference the seeds run would "
                  "detect so. No correction for the several comparisons is applied.", ""]
        names = {"iou": "IoU", "boundary_iou": "Boundary IoU", "boundary_f": "Boundary F", "soil_fp_rate": "Soil FP rate"}
        lines += ["| Model | Metric | Pairs | Δ | 95 % CI | d_z | t | p | Seeds for 0.02 | MDD |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for label, entry in paired.items():
            for m in PAIRED_METRICS:
                pt = entry.get(m)
                if not pt or pt["n"] == 0:
                    continue
                ci = f"[{pt['ci_low']:+.3f}, {pt['ci_high']:+.3f}]" if math.isfinite(pt["ci_low"]) else "–"
                sp = "–" if pt["seeds_for_power"] is None else str(pt["seeds_for_power"])
                lines.append(f"| `{label}` | {names[m]} | {pt['n']} | {pt['diff']:+.3f} | {ci} | {pt['dz']:+.2f} | "
                             f"{pt['t']:+.2f} | {pt['p']:.3f} | {sp} | {pt['mdd']:.3f} |")
            if entry.get("unpaired_seeds"):
                lines.append(f"| `{label}` | (seeds {entry['unpaired_seeds']} left out: different training data "
                             "than the reference's run) | | | | | | | | |")
        lines += ["", "Unpaired view (Welch's t-test over seeds, as if the runs were independent):", "",
                  "| Model | Δ IoU | t | p | Δ IoU mean/ds | t | p |", "|---|---|---|---|---|---|---|"]
        for label, s in summary.items():
            if label == ref:
                continue
            w1 = welch_test(s["iou"], summary[ref]["iou"])
            w2 = welch_test(s["iou_dataset_mean"], summary[ref]["iou_dataset_mean"])
            lines.append(f"| `{label}` | {w1['diff']:+.3f} | {w1['t']:+.2f} | {w1['p']:.3f} | "
                         f"{w2['diff']:+.3f} | {w2['t']:+.2f} | {w2['p']:.3f} |")
    return "\n".join(lines) + "\n"


def write_results_markdown(out: dict, path: str | os.PathLike) -> Path:
    """Write :func:`results_markdown` to ``path`` (atomically)."""
    atomic_write_bytes(path, results_markdown(out).encode())
    return Path(path)


def write_reports(out: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write ``results.json``, ``results.csv``, ``results.md`` and ``results.png`` into ``out_dir``.

    Args:
        out: the experiment result (:func:`msff.engine.experiment.run_experiment_config`): ``config``,
            ``runs``, ``summary`` and optionally ``paired``.
        out_dir: an existing folder.

    Returns:
        The written paths by kind (``json``, ``csv``, ``md``, ``png``; ``png`` only when there are results).
    """
    out_dir = Path(out_dir)
    paths = {"json": write_results_json(out, out_dir / "results.json"),
             "csv": write_results_csv(out, out_dir / "results.csv"),
             "md": write_results_markdown(out, out_dir / "results.md")}
    if out["summary"]:
        paths["png"] = plot_results(out, out_dir / "results.png")
    return paths


def plot_results(out: dict, path: str | os.PathLike) -> Path:
    """``results.png``: bars of the overall metrics and of IoU per dataset, one bar per model, error
    bars = sample std over seeds."""
    summary, datasets, title = out["summary"], _datasets(out), out["config"]["name"]
    plt = _plt()
    labels = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), dpi=90)
    groups = [("overall", list(METRICS + BOUNDARY_METRICS)), ("IoU per dataset", [f"iou/{d}" for d in datasets] + ["iou_dataset_mean"])]
    for ax, (name, keys) in zip(axes, groups, strict=True):
        n = len(labels)
        width = 0.8 / n
        x = np.arange(len(keys))
        for i, label in enumerate(labels):
            means = [summary[label][k]["mean"] for k in keys]
            stds = [summary[label][k]["std"] for k in keys]
            ax.bar(x + (i - (n - 1) / 2) * width, means, width, yerr=stds, capsize=2, label=label)
        ax.set_xticks(x)
        ax.set_xticklabels([k.replace("iou/", "").replace("iou_dataset_mean", "mean/ds") for k in keys],
                           fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"{title}: {name} (mean ± std over seeds)", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
