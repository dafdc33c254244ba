"""Report writers of an experiment (results.json/.csv/.md/.png) on a hand-made result: every file
says what the numbers say, files are complete (atomic), and a one-model experiment has no paired
section."""
import csv
import json
import math

import pytest

from msff.engine.experiment_report import (
    paired_comparisons,
    plot_results,
    results_markdown,
    summarize,
    write_reports,
    write_results_csv,
    write_results_json,
)

DATASETS = ["alpha", "beta"]


def _run(model, seed, iou, name="unet"):
    per = {d: {"iou": iou + k * 0.01, "f1": 0.5, "boundary_iou": 0.3} for k, d in enumerate(DATASETS)}
    return {"model": model, "model_name": name, "seed": seed, "precision": 0.6, "recall": 0.7, "iou": iou,
            "f1": 0.55, "boundary_iou": 0.3, "boundary_f": 0.4, "soil_fp_rate": 0.05, "background_fp_rate": 0.02,
            "iou_dataset_mean": iou + 0.005, "params": 2_000_000, "steps": 10, "epochs_run": 1, "train_s": 12.0,
            "infer_s_per_mpx": 0.5, "infer_ms_crop": 3.0, "per_dataset": per, "data_order": f"order{seed}",
            "erf": [{"name": "E1", "stride": 2, "r50": 4.0 + seed, "r90": 9.0}]}


def _out(labels=("ref", "other")):
    ious = {"ref": [0.50, 0.62, 0.41], "other": [0.52, 0.65, 0.42]}
    runs = [_run(lab, s, ious[lab][s], name="msffnet" if lab == "ref" else "unet") for lab in labels for s in range(3)]
    cfg = {"name": "tiny", "description": "a test", "datasets": {d: d for d in DATASETS},
           "split": {"val_ratio": 0.0, "test_ratio": 0.4, "seed": 0}, "select": "last", "seeds": [0, 1, 2],
           "reference": "ref", "train": {"crop": 32, "batch_size": 2, "samples_per_epoch": 4, "epochs": 1}}
    summary = summarize(runs, list(labels), DATASETS)
    paired = paired_comparisons(runs, "ref", list(summary))
    return {"config": cfg, "split": {}, "runs": runs, "summary": summary, "paired": paired, "skipped": 2, "failed": []}


def test_json_holds_everything_but_the_skip_count(tmp_path):
    out = _out()
    write_results_json(out, tmp_path / "r.json")
    back = json.loads((tmp_path / "r.json").read_text())
    assert set(back) == {"config", "split", "runs", "summary", "paired", "failed"}
    assert back["summary"]["other"]["iou"]["mean"] == pytest.approx(sum([0.52, 0.65, 0.42]) / 3)
    assert back["paired"]["other"]["iou"]["n"] == 3


def test_csv_one_row_per_model_with_mean_and_std(tmp_path):
    write_results_csv(_out(), tmp_path / "r.csv")
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [r["model"] for r in rows] == ["ref", "other"] and [r["model_name"] for r in rows] == ["msffnet", "unet"]
    assert all(r["runs"] == "3" for r in rows)
    ref = rows[0]
    assert float(ref["iou_mean"]) == pytest.approx(0.51, rel=1e-5)
    assert float(ref["iou_std"]) == pytest.approx(0.105357, rel=1e-5)  # sample std of 0.50, 0.62, 0.41
    assert float(ref["iou/beta_mean"]) == pytest.approx(0.52, rel=1e-5) and "soil_fp_rate_std" in ref


def test_markdown_table_and_paired_section():
    md = results_markdown(_out())
    assert md.startswith("# Experiment `tiny`\n") and "a test" in md
    table = [line for line in md.splitlines() if line.startswith("| `ref` |")]
    assert table and "0.510 ± 0.105" in table[0] and "2.00 M" in table[0]
    # Paired: differences 0.02, 0.03, 0.01 -> mean 0.02, sd 0.01, t = 2√3 = 3.46 on 2 df, p = 0.0742
    row = next(line for line in md.splitlines() if line.startswith("| `other` | IoU | 3 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "+0.020" and cells[6] == "+3.46" and cells[7] == "0.074"
    half = 4.30265272974946 * 0.01 / math.sqrt(3)  # t_{0.975, 2} (mpmath) · sd / √n
    assert cells[4] == f"[{0.02 - half:+.3f}, {0.02 + half:+.3f}]"
    assert "Welch" in md and "Boundary IoU" in md


def test_a_single_model_has_no_comparison():
    md = results_markdown(_out(labels=("ref",)))
    assert "| `ref` |" in md and "Paired differences" not in md and "Welch" not in md


def test_write_reports_writes_all_four_files(tmp_path):
    paths = write_reports(_out(), tmp_path)
    assert set(paths) == {"json", "csv", "md", "png"}
    for p in paths.values():
        assert p.parent == tmp_path and p.stat().st_size > 0
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.json", "results.md", "results.png"]


def test_no_results_no_chart(tmp_path):
    out = _out()
    out.update(runs=[], summary={}, paired={})
    paths = write_reports(out, tmp_path)
    assert "png" not in paths and not (tmp_path / "results.png").exists()
    assert "| Model |" in (tmp_path / "results.md").read_text()


def test_plot_results_replaces_atomically(tmp_path):
    p = tmp_path / "chart.png"
    p.write_bytes(b"old")
    plot_results(_out(), p)
    assert p.read_bytes()[:4] == b"\x89PNG" and [q.name for q in tmp_path.iterdir()] == ["chart.png"]
