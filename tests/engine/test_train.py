"""Training: run folder artefacts, exact resume, seeds, failure status, repeated runs, options, DDP."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from msff.data import SegmentationDataset, find_pairs, split_pairs, write_scene_dataset
from msff.engine import RunError, TrainConfig, evaluate, fit, fit_runs, load_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

TINY = dict(preset="tiny", model_kwargs=dict(kernel_size=3), batch_size=4, crop=32, lr=1e-3,
            device="cpu", overlays=2, eval_batch_size=4)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_scene_dataset(tmp_path_factory.mktemp("scenes"), n=12, size=40, seed=5)


def datasets(scenes):
    tr, va, _ = split_pairs(find_pairs(scenes), 0.25, 0.0, seed=0)
    return SegmentationDataset(tr), SegmentationDataset(va)


def last_state(run):
    return torch.load(run / "checkpoints" / "last.pt", weights_only=True)


def test_fit_writes_a_complete_run(scenes, tmp_path):
    tr, va = datasets(scenes)
    cfg = TrainConfig(epochs=2, **TINY)
    res = fit(cfg, tr, va, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    for f in ("metrics.json", "log.csv", "curves.png", "train_config.json", "best/config.json", "best/model.pt",
              "checkpoints/last.pt"):
        assert (run / f).is_file(), f
    assert len(list((run / "overlays").glob("*.png"))) == 2
    assert json.loads((run / "status.json").read_text())["state"] == "complete"
    assert res["epochs_run"] == 2 and len((run / "log.csv").read_text().splitlines()) == 3
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["best"]) >= {"precision", "recall", "iou", "f1", "image_iou"}
    model, meta = load_checkpoint(run)
    assert meta["normalization"] == tr.normalization and len(meta["normalization"]["mean"]) == 3
    assert meta["train"]["lr"] == 1e-3 and meta["threshold"] == 0.5
    again = evaluate(model, va, batch_size=2)  # independent of the eval batch size (padding ignored)
    assert again["iou"] == pytest.approx(res["best"]["iou"]) and again["tp"] == res["best"]["tp"]
    with pytest.raises(RunError, match="exists and is not empty"):
        fit(cfg, tr, va, run, progress=False)


def test_resume_continues_exactly(scenes, tmp_path):
    tr, va = datasets(scenes)
    fit(TrainConfig(epochs=2, seed=3, **TINY), tr, va, tmp_path / "straight", progress=False)
    tr, va = datasets(scenes)
    fit(TrainConfig(epochs=1, seed=3, **TINY), tr, va, tmp_path / "split", progress=False)
    tr, va = datasets(scenes)
    fit(TrainConfig(epochs=2, seed=3, **TINY), tr, va, tmp_path / "split", resume=True, progress=False)
    a, b = last_state(tmp_path / "straight"), last_state(tmp_path / "split")
    assert a["epoch"] == b["epoch"] == 2
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    with pytest.raises(RunError, match="differ.*lr"):
        fit(TrainConfig(epochs=3, seed=3, **dict(TINY, lr=5e-4)), tr, va, tmp_path / "split", resume=True, progress=False)
    with pytest.raises(RunError, match="cannot resume"):
        fit(TrainConfig(epochs=1, **TINY), tr, va, tmp_path / "nothing", resume=True, progress=False)


def test_failed_run_is_marked_and_has_no_metrics(scenes, tmp_path, monkeypatch):
    import msff.engine.train as T

    tr, va = datasets(scenes)
    monkeypatch.setattr(T, "segmentation_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(FloatingPointError, match="training loss"):
        fit(TrainConfig(epochs=1, **TINY), tr, va, tmp_path / "bad", progress=False)
    st = json.loads((tmp_path / "bad" / "status.json").read_text())
    assert st["state"] == "failed" and "not a result" in st["note"]
    assert not (tmp_path / "bad" / "metrics.json").exists()


def test_runs_report_mean_and_std(scenes, tmp_path):
    tr, va = datasets(scenes)
    out = fit_runs(TrainConfig(epochs=1, **dict(TINY, overlays=0)), tr, va, tmp_path / "multi", runs=2, progress=False)
    s = json.loads((tmp_path / "multi" / "summary.json").read_text())
    ious = [r["best"]["iou"] for r in out["runs"]]
    assert out["seeds"] == [0, 1] and (tmp_path / "multi" / "run_1" / "best").is_dir()
    assert s["summary"]["val_iou"]["mean"] == pytest.approx(sum(ious) / 2)
    assert s["summary"]["val_iou"]["std"] == pytest.approx(abs(ious[0] - ious[1]) / 2**0.5)


def test_options_accumulate_amp_channels_last_dice_budget(scenes, tmp_path):
    tr, va = datasets(scenes)
    cfg = TrainConfig(epochs=5, accumulate=2, amp="bf16", channels_last=True, loss="bce+dice",
                      samples_per_epoch=6, time_budget_s=0.01, **TINY)
    res = fit(cfg, tr, va, tmp_path / "opts", progress=False)
    assert res["stopped"] == "time budget" and res["epochs_run"] == 1
    assert 0.0 <= res["best"]["iou"] <= 1.0


def test_config_validation():
    with pytest.raises(ValueError, match="loss"):
        TrainConfig(loss="focal")
    with pytest.raises(ValueError, match="multiple of accumulate"):
        TrainConfig(batch_size=5, accumulate=2)
    with pytest.raises(ValueError, match="unknown training option"):
        TrainConfig.from_dict({"learning_rate": 1})
    paper = TrainConfig()
    assert (paper.lr, paper.weight_decay, paper.epochs, paper.batch_size, paper.loss, paper.plateau_factor) == (
        1e-4, 1e-6, 150, 32, "bce", 0.1)


def test_ddp_two_cpu_processes(scenes, tmp_path):
    """torchrun with 2 gloo processes: both train on their shard; rank 0 writes the run."""
    run = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "msff.cli", "train", str(scenes), "--out", str(run), "--preset", "tiny", "--kernel-size", "3",
           "--epochs", "1", "--batch-size", "4", "--crop", "32", "--device", "cpu", "--no-progress",
           "--overlays", "0"]
    t0 = time.time()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    try:
        out, err = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # the launcher and both workers: no orphans left behind
        out, err = p.communicate()
        pytest.fail("torchrun timed out:\n" + out[-2000:] + err[-2000:])
    assert p.returncode == 0, out[-3000:] + err[-3000:]
    assert json.loads((run / "status.json").read_text())["state"] == "complete"
    m = json.loads((run / "metrics.json").read_text())
    assert m["best"]["images"] == 2  # both ranks' validation shares summed
    assert time.time() - t0 < 120


def test_no_validation_set_and_a_loss_above_one_still_writes_best(scenes, tmp_path):
    # Without a validation set the selection score is minus the training loss; with bce+dice that
    # loss exceeds 1 early on, which once left best/ unwritten (best score started at -1).
    tr, _ = datasets(scenes)
    res = fit(TrainConfig(epochs=1, loss="bce+dice", **dict(TINY, overlays=0)), tr, None, tmp_path / "noval",
              progress=False)
    assert (tmp_path / "noval" / "best" / "model.pt").is_file()
    assert res["epochs_run"] == 1
