"""The experiment runner end to end on tiny synthetic datasets (2 models × 2 seeds), with resume."""
import csv
import json

import pytest
import torch

from msff.data import write_scene_dataset
from msff.engine.experiment import (
    load_experiment_config,
    run_dir,
    run_experiment_config,
    summarize,
)
from msff.engine.train import TrainConfig, fit


def _config(root):
    return {
        "name": "tiny",
        "data_root": str(root),
        "datasets": {"alpha": "alpha", "beta": "beta"},
        "split": {"val_ratio": 0.0, "test_ratio": 0.4, "seed": 0},
        "models": [
            {"name": "unet", "kwargs": {"width_multiplier": 0.0625}},
            {"name": "msffnet-baseline", "kwargs": {"width_multiplier": 0.0625}},
        ],
        "reference": "msffnet-baseline",
        "seeds": [0, 1],
        "select": "last",
        "train": {"crop": 32, "batch_size": 2, "samples_per_epoch": 2, "epochs": 1, "lr": 1e-3,
                  "device": "cpu", "overlays": 0, "early_stopping": 0},
    }


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("exp_data")
    write_scene_dataset(root / "alpha", n=5, size=48, seed=1)
    write_scene_dataset(root / "beta", n=5, size=40, seed=2)
    return root


def test_runner_end_to_end_and_resume(tmp_path, data_root):
    out = tmp_path / "exp"
    cfg = _config(data_root)
    res = run_experiment_config(cfg, out)
    assert res["skipped"] == 0
    assert len(res["runs"]) == 4
    assert {(r["model"], r["seed"]) for r in res["runs"]} == {
        (m, s) for m in ("unet", "msffnet-baseline") for s in (0, 1)
    }
    for r in res["runs"]:
        assert set(r["per_dataset"]) == {"alpha", "beta"}
        assert 0.0 <= r["iou"] <= 1.0 and r["params"] > 0 and r["steps"] == 1
        # The overall metrics are micro-averaged: they follow from the summed per-dataset counts.
        tp = sum(d["tp"] for d in r["per_dataset"].values())
        fp = sum(d["fp"] for d in r["per_dataset"].values())
        fn = sum(d["fn"] for d in r["per_dataset"].values())
        assert r["iou"] == pytest.approx(tp / max(tp + fp + fn, 1))
        # Boundary and soil metrics are micro too: from the summed per-dataset counts.
        bi = sum(d["biou_inter"] for d in r["per_dataset"].values())
        bu = sum(d["biou_union"] for d in r["per_dataset"].values())
        assert r["boundary_iou"] == pytest.approx(bi / bu if bu else 0.0)
        sfp = sum(d["soil_fp"] for d in r["per_dataset"].values())
        sbg = sum(d["soil_bg"] for d in r["per_dataset"].values())
        assert sbg > 0 and r["soil_fp_rate"] == pytest.approx(sfp / sbg)
        assert 0.0 <= r["boundary_f"] <= 1.0 and 0.0 <= r["background_fp_rate"] <= 1.0
    # Paired design: one seed gives every model the same training data in the same order.
    order = {(r["model"], r["seed"]): r["data_order"] for r in res["runs"]}
    assert order[("unet", 0)] == order[("msffnet-baseline", 0)] != order[("unet", 1)] == order[("msffnet-baseline", 1)]
    pt = res["paired"]["unet"]["iou"]
    assert pt["n"] == 2 and pt["seeds"] == [0, 1] and res["paired"]["unet"]["unpaired_seeds"] == []
    # Same protocol for all: one split file, the same test images for every run.
    split = json.loads((out / "split.json").read_text())
    assert set(split) == {"alpha", "beta"}
    assert all(len(v["test"]) == 2 and len(v["train"]) == 3 for v in split.values())
    # Different seeds give different networks.
    w0 = torch.load(run_dir(out, "unet", 0) / "checkpoints" / "last.pt", weights_only=True)["model"]
    w1 = torch.load(run_dir(out, "unet", 1) / "checkpoints" / "last.pt", weights_only=True)["model"]
    k = next(k for k in w0 if k.endswith("weight") and w0[k].dim() == 4)
    assert not torch.equal(w0[k], w1[k])
    # Reports.
    for name in ("results.json", "results.csv", "results.md", "results.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["model"] for r in rows] == ["unet", "msffnet-baseline"]
    assert all(r["runs"] == "2" for r in rows)
    md = (out / "results.md").read_text()
    assert "| `unet` |" in md and "IoU alpha" in md and "±" in md and "Welch" in md
    assert "B-IoU" in md and "Soil FP" in md and "Paired differences" in md and "| `unet` | Boundary IoU | 2 |" in md
    assert "boundary_iou_mean" in rows[0] and "soil_fp_rate_mean" in rows[0]
    # ERF of every trained run, per encoder stage, averaged per model.
    assert [st["name"] for st in res["runs"][0]["erf"]] == ["E1", "E2", "E3", "E4", "E5"]
    assert len(res["summary"]["unet"]["erf"]) == 5 and "ERF r50" in md
    assert res["summary"]["unet"]["erf"][0]["r50"]["n"] == 2
    # Resume: nothing is retrained.
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("seed_*.json")}
    again = run_experiment_config(cfg, out)
    assert again["skipped"] == 4
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("seed_*.json")} == stamps
    assert again["summary"]["unet"]["iou"]["mean"] == pytest.approx(res["summary"]["unet"]["iou"]["mean"])
    # A lost result file is re-evaluated from the finished run, without training it again.
    (out / "runs" / "unet" / "seed_1.json").unlink()
    log_before = (run_dir(out, "unet", 1) / "log.csv").read_text()
    third = run_experiment_config(cfg, out)
    assert third["skipped"] == 3
    assert (run_dir(out, "unet", 1) / "log.csv").read_text() == log_before
    # A changed protocol cannot be mixed into the same folder.
    changed = _config(data_root)
    changed["train"]["crop"] = 40
    with pytest.raises(ValueError, match="differ"):
        run_experiment_config(changed, out)


def test_interrupted_run_continues_where_it_stopped(tmp_path, data_root):
    out = tmp_path / "exp"
    cfg = _config(data_root)
    cfg["models"] = cfg["models"][:1]
    cfg["reference"] = "unet"
    cfg["seeds"] = [0]
    cfg["train"]["epochs"] = 2
    # Set up the experiment folder, then fake an interruption after epoch 1 of the only run.
    run_experiment_config(cfg, out, models=["unet"], seeds=[0])
    folder = run_dir(out, "unet", 0)
    (out / "runs" / "unet" / "seed_0.json").unlink()
    import shutil

    shutil.rmtree(folder)
    from msff.engine.experiment import _prepare_data, _train_config

    data = _prepare_data(load_experiment_config(cfg), data_root, out)
    tc = _train_config(load_experiment_config(cfg), load_experiment_config(cfg)["models"][0], 0)
    tc1 = TrainConfig.from_dict({**tc.__dict__, "epochs": 1})
    fit(tc1, data["module"], None, folder, progress=False)
    (folder / "status.json").write_text(json.dumps({"state": "interrupted"}))
    res = run_experiment_config(cfg, out)
    assert res["skipped"] == 0
    (r,) = res["runs"]
    assert r["epochs_run"] == 2  # epoch 1 kept, epoch 2 trained on top
    assert len((folder / "log.csv").read_text().strip().splitlines()) == 3  # header + 2 epochs


def test_config_validation(data_root):
    cfg = _config(data_root)
    assert load_experiment_config(cfg)["models"][0]["label"] == "unet"
    for key, value, match in [
        ("models", ["no-such-net"], "unknown model"),
        ("bogus", 1, "unknown experiment option"),
        ("select", "best", "validation split"),
        ("reference", "segnet", "reference"),
    ]:
        bad = _config(data_root)
        bad[key] = value
        with pytest.raises(ValueError, match=match):
            load_experiment_config(bad)
    bad = _config(data_root)
    bad["train"]["learning_rate"] = 1
    with pytest.raises(ValueError, match="unknown training option"):
        load_experiment_config(bad)


@pytest.mark.parametrize("name", ["cpu", "cpu-long", "paper"])
def test_shipped_configs(name):
    cfg = load_experiment_config(name)
    labels = [m["label"] for m in cfg["models"]]
    for required in ("msffnet", "msffnet-baseline", "msffnet-lkam", "msffnet-aspp", "unet"):
        assert required in labels
    assert any(lab.startswith("deeplabv3plus") for lab in labels)
    assert len(cfg["seeds"]) >= 3 and len(set(cfg["datasets"])) == 4
    if name == "paper":
        t = cfg["train"]
        assert (t["crop"], t["batch_size"], t["epochs"], t["lr"]) == (512, 32, 150, 1e-4)
        assert len(cfg["seeds"]) == 10
    else:
        assert cfg["train"]["crop"] == 256 and cfg["train"]["time_budget_s"] > 0


def test_summarize_mean_and_sample_std():
    runs = [{"model": "a", "model_name": "unet", "seed": s, "precision": 0.5, "recall": 0.5, "iou": v, "f1": 0.5,
             "iou_dataset_mean": v, "params": 10, "steps": 3, "epochs_run": 1, "train_s": 1.0,
             "infer_s_per_mpx": 1.0, "infer_ms_crop": 1.0, "per_dataset": {"d": {"iou": v, "f1": 0.5}}}
            for s, v in enumerate([0.2, 0.4, 0.6])]
    s = summarize(runs, ["a", "b"], ["d"])
    assert set(s) == {"a"}
    assert s["a"]["iou"]["mean"] == pytest.approx(0.4)
    assert s["a"]["iou"]["std"] == pytest.approx(0.2)  # ddof=1
    assert s["a"]["iou/d"]["n"] == 3 and s["a"]["seeds"] == [0, 1, 2]


def test_describe_plan():
    from msff.engine.experiment import describe_plan

    plan = describe_plan("cpu", models=["unet", "msffnet"], seeds=[4])
    assert plan.splitlines()[:3] == ["experiment cpu: 2 models × 1 seeds", "models: unet, msffnet", "seeds: [4]"]
    with pytest.raises(ValueError, match="nosuch"):
        describe_plan("cpu", models=["nosuch"])


def test_a_failing_run_does_not_stop_the_others(tmp_path, data_root):
    cfg = _config(data_root)
    cfg["models"] = [{"name": "segnet", "kwargs": {"no_such_argument": 1}}, cfg["models"][0]]
    cfg["reference"] = "unet"
    cfg["seeds"] = [0]
    res = run_experiment_config(cfg, tmp_path / "exp")
    assert [r["model"] for r in res["runs"]] == ["unet"]
    (f,) = res["failed"]
    assert f["model"] == "segnet" and "no_such_argument" in f["error"]
    assert "segnet" not in res["summary"] and (tmp_path / "exp" / "results.md").is_file()


def test_paired_comparisons_refuse_runs_with_different_data():
    from msff.engine.experiment_report import paired_comparisons

    runs = [{"model": m, "seed": s, "iou": v, "data_order": f"d{s}" if (m, s) != ("b", 2) else "other"}
            for m, vals in (("a", (0.5, 0.6, 0.7)), ("b", (0.4, 0.55, 0.6))) for s, v in enumerate(vals)]
    r = paired_comparisons(runs, "a", ["a", "b"], metrics=("iou",))
    assert r["b"]["unpaired_seeds"] == [2] and r["b"]["iou"]["n"] == 2
    assert r["b"]["iou"]["diff"] == pytest.approx(-0.075)


def test_soil_proxy_config(data_root):
    from msff.engine.experiment import _soil_bands

    cfg = load_experiment_config(_config(data_root))
    assert _soil_bands(cfg, 3) == {} and _soil_bands(cfg, 14) is None
    cfg["soil_proxy"] = {"red": 4, "green": 3, "blue": 2, "nir": 8}
    assert _soil_bands(cfg, 14) == {"red": 3, "green": 2, "blue": 1, "nir": 7}
    with pytest.raises(ValueError, match="input has 3 band"):
        _soil_bands(cfg, 3)
    bad = _config(data_root)
    bad["soil_proxy"] = {"red": 0}
    with pytest.raises(ValueError, match="1-based"):
        load_experiment_config(bad)
