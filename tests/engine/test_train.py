"""Training: run folder artefacts, exact resume, seeds, failure status, repeated runs, options, DDP."""
import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from msff.data import (
    SegmentationDataset,
    find_pairs,
    normalization_stats,
    split_pairs,
    write_scene_dataset,
)
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
    assert tr.normalization is None and va.normalization is None  # the caller's datasets are not changed
    assert meta["normalization"] == normalization_stats(tr) and len(meta["normalization"]["mean"]) == 3
    assert meta["train"]["lr"] == 1e-3 and meta["threshold"] == 0.5
    va = va.replace(normalization=meta["normalization"])
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


class _Probe:
    """Records what happens inside ``fit``: the model it builds (forward hooks on every conv),
    the gradients and parameter dtypes at each optimizer step (Adam subclassed), and every loss
    call (logits, target, kind, value)."""

    def __init__(self, monkeypatch, freeze_bn=False):
        import msff.engine.train as T

        self.models, self.steps, self.losses, self.conv_out_dtypes, self.inputs = [], [], [], set(), []
        probe = self
        build, loss = T.build_model, T.segmentation_loss

        def build_model(*a, **k):
            model = build(*a, **k)
            for m in model.modules():
                if isinstance(m, torch.nn.Conv2d):
                    m.register_forward_hook(lambda mod, i, o: probe.conv_out_dtypes.add(o.dtype) if mod.training else None)
                if freeze_bn and isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                    m.eval()
                    m.train = lambda mode=True, m=m: m  # stays in eval: BN is linear in the batch
            model.register_forward_pre_hook(lambda mod, args: probe.inputs.append(args[0].detach()) if mod.training else None)
            probe.models.append(model)
            return model

        class RecordingAdam(torch.optim.Adam):
            def step(self, closure=None):
                params = [p for g in self.param_groups for p in g["params"]]
                probe.steps.append({
                    "grads": [p.grad.detach().clone() for p in params],
                    "param_dtypes": {p.dtype for p in params},
                    "grad_dtypes": {p.grad.dtype for p in params},
                })
                return super().step(closure)

        def segmentation_loss(logits, target, kind="bce"):
            value = loss(logits, target, kind)
            probe.losses.append((logits.detach(), target.detach(), kind, value.detach()))
            return value

        monkeypatch.setattr(T, "build_model", build_model)
        monkeypatch.setattr(T, "segmentation_loss", segmentation_loss)
        monkeypatch.setattr(torch.optim, "Adam", RecordingAdam)


def test_accumulate_two_half_batches_equals_one_batch(scenes, tmp_path, monkeypatch):
    # BN frozen in eval mode (BN's batch statistics differ between half and whole batches), no
    # augmentation (no ignored pixels: each half batch's mean loss weighs the same pixel count).
    # The gradient at the optimizer step and the weights after it must match one whole batch of
    # 4; accumulate=2 takes one step, not two.
    states = {}
    for acc in (1, 2):
        probe = _Probe(monkeypatch, freeze_bn=True)
        tr, va = datasets(scenes)
        cfg = TrainConfig(epochs=1, accumulate=acc, samples_per_epoch=4, augment=False, **dict(TINY, overlays=0))
        fit(cfg, tr, va, tmp_path / f"acc{acc}", progress=False)
        assert len(probe.steps) == 1, f"accumulate={acc}: {len(probe.steps)} optimizer steps for one batch"
        assert [x.shape[0] for x in probe.inputs] == ([4] if acc == 1 else [2, 2])
        states[acc] = (probe.steps[0]["grads"], last_state(tmp_path / f"acc{acc}")["model"])
    (g1, w1), (g2, w2) = states[1], states[2]
    for i, (a, b) in enumerate(zip(g1, g2, strict=True)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-7, msg=lambda m, i=i: f"gradient of parameter {i}: {m}")
    assert sum(float(g.abs().sum()) for g in g1) > 0
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_amp_bf16_runs_the_forward_in_bf16_with_fp32_master_weights(scenes, tmp_path, monkeypatch):
    probe = _Probe(monkeypatch)
    tr, va = datasets(scenes)
    fit(TrainConfig(epochs=1, amp="bf16", samples_per_epoch=4, **dict(TINY, overlays=0)), tr, va,
        tmp_path / "amp", progress=False)
    assert probe.conv_out_dtypes == {torch.bfloat16}, probe.conv_out_dtypes  # inside the model
    assert probe.losses[0][0].dtype == torch.bfloat16  # the training batch's logits
    assert probe.steps and all(s["param_dtypes"] == {torch.float32} == s["grad_dtypes"] for s in probe.steps)
    state = last_state(tmp_path / "amp")["model"]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
    # the control: without amp the same forward runs in fp32
    probe = _Probe(monkeypatch)
    tr, va = datasets(scenes)
    fit(TrainConfig(epochs=1, samples_per_epoch=4, **dict(TINY, overlays=0)), tr, va, tmp_path / "fp32",
        progress=False)
    assert probe.conv_out_dtypes == {torch.float32}


def test_channels_last_model_and_batch(scenes, tmp_path, monkeypatch):
    probe = _Probe(monkeypatch)
    tr, va = datasets(scenes)
    fit(TrainConfig(epochs=1, channels_last=True, samples_per_epoch=4, **dict(TINY, overlays=0)), tr, va,
        tmp_path / "cl", progress=False)
    (model,) = probe.models
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert any(not w.is_contiguous() for w in convs)  # so the check above can fail
    assert probe.inputs and all(
        x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() for x in probe.inputs
    )


def _dice(p, t, eps=1.0):
    return 1 - (2 * (p * t).sum() + eps) / (p.sum() + t.sum() + eps)


def test_dice_losses_on_a_known_input():
    from msff.engine.losses import segmentation_loss

    # logits 0 -> p = 0.5 on 3 valid pixels (one ignored), targets 0, 1, 1:
    # dice = 1 - (2·1 + 1) / (1.5 + 2 + 1) = 1/3, bce = ln 2
    logits = torch.zeros(1, 1, 2, 2)
    target = torch.tensor([[[0, 1], [255, 1]]], dtype=torch.uint8)
    assert segmentation_loss(logits, target, "dice").item() == pytest.approx(1 / 3)
    assert segmentation_loss(logits, target, "bce").item() == pytest.approx(math.log(2))
    assert segmentation_loss(logits, target, "bce+dice").item() == pytest.approx(math.log(2) + 1 / 3)
    # a second, uneven input against the formula written out
    logits = torch.tensor([[[[4.0, 0.0], [0.0, 0.0]]]])
    target = torch.tensor([[[1, 0], [0, 0]]], dtype=torch.uint8)
    p = torch.sigmoid(logits[0, 0]).double()
    t = target[0].double()
    want = float(_dice(p, t))
    assert segmentation_loss(logits, target, "dice").item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("loss", ["dice", "bce+dice"])
def test_dice_option_trains_on_the_dice_formula(scenes, tmp_path, monkeypatch, loss):
    probe = _Probe(monkeypatch)
    tr, va = datasets(scenes)
    res = fit(TrainConfig(epochs=1, loss=loss, samples_per_epoch=4, **dict(TINY, overlays=0)), tr, va,
              tmp_path / "dice", progress=False)
    train_calls = probe.losses[:1]  # one training batch per epoch; validation calls follow
    (logits, target, kind, value), = train_calls
    assert kind == loss
    valid = (target != 255).double()
    p = torch.sigmoid(logits[:, 0].double()) * valid
    t = (target == 1).double() * valid
    want = _dice(p, t)
    if loss == "bce+dice":
        bce = torch.nn.functional.binary_cross_entropy_with_logits(
            logits[:, 0].double(), (target == 1).double(), reduction="none")
        want = want + (bce * valid).sum() / valid.sum()
    assert float(value) == pytest.approx(float(want), rel=1e-5)
    assert res["history"][0]["train_loss"] == pytest.approx(float(want), rel=1e-5)


def test_time_budget_stops_after_the_epoch_that_would_overrun(scenes, tmp_path):
    tr, va = datasets(scenes)
    cfg = TrainConfig(epochs=5, samples_per_epoch=4, time_budget_s=0.01, **dict(TINY, overlays=0))
    res = fit(cfg, tr, va, tmp_path / "budget", progress=False)
    assert res["stopped"] == "time budget" and res["epochs_run"] == 1
    assert json.loads((tmp_path / "budget" / "status.json").read_text())["state"] == "complete"


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


def test_no_validation_set_and_a_loss_above_one_still_writes_best(scenes, tmp_path):
    # Without a validation set the selection score is minus the training loss; with bce+dice that
    # loss exceeds 1 early on, which once left best/ unwritten (best score started at -1).
    tr, _ = datasets(scenes)
    res = fit(TrainConfig(epochs=1, loss="bce+dice", **dict(TINY, overlays=0)), tr, None, tmp_path / "noval",
              progress=False)
    assert (tmp_path / "noval" / "best" / "model.pt").is_file()
    assert res["epochs_run"] == 1


def _settings(ds):
    import copy

    watched = ("normalization", "input_scale", "crop", "augment", "seed", "epoch", "in_channels", "bands")
    return {k: copy.deepcopy(getattr(ds, k)) for k in watched}, id(ds.pairs), list(ds.pairs), id(ds._cache)


def test_fit_fit_runs_and_evaluate_change_no_dataset_they_are_given(scenes, tmp_path):
    tr, va = datasets(scenes)
    _, _, te = split_pairs(find_pairs(scenes), 0.0, 0.25, seed=1)
    te = SegmentationDataset(te, input_scale="divide:2")
    given = (tr, va, te)
    before = [_settings(d) for d in given]
    cfg = TrainConfig(epochs=1, samples_per_epoch=4, augment=True, seed=4, **dict(TINY, overlays=0))
    tr2 = SegmentationDataset(tr.pairs, input_scale="divide:2")
    va2 = SegmentationDataset(va.pairs, input_scale="divide:2")
    before2 = [_settings(d) for d in (tr2, va2)]
    res = fit(cfg, tr2, va2, tmp_path / "one", test_ds=te, progress=False)
    fit_runs(cfg, tr, va, tmp_path / "two", runs=2, progress=False)
    model, meta = load_checkpoint(tmp_path / "one")
    evaluate(model, va)
    assert [_settings(d) for d in given] == before and [_settings(d) for d in (tr2, va2)] == before2
    assert tr.normalization is None and tr.crop is None and tr.augment is None and tr.seed == 0
    # ...while the run itself used the training statistics, crops and seed
    assert meta["normalization"] == normalization_stats(tr2) and meta["input_scale"]["kind"] == "divide"
    assert "test" in res and res["test"]["images"] == len(te)
    saved = last_state(tmp_path / "one")
    assert saved["normalization"] == meta["normalization"] and saved["config"]["seed"] == 4


def test_fit_takes_a_data_module(scenes, tmp_path):
    from msff.data import SegmentationDataModule

    tr, va = datasets(scenes)
    dm = SegmentationDataModule(tr, va, normalization={"mean": [100.0] * 3, "std": [40.0] * 3})
    cfg = TrainConfig(epochs=1, samples_per_epoch=4, **dict(TINY, overlays=0))
    res = fit(cfg, dm, None, tmp_path / "dm", progress=False)
    _, meta = load_checkpoint(tmp_path / "dm")
    assert meta["normalization"] == {"mean": [100.0] * 3, "std": [40.0] * 3} and res["best"]["images"] == len(va)
    assert dm.crop is None and dm.train_dataset.crop is None  # the run's crop went to a module of its own
    with pytest.raises(ValueError, match="through the data module"):
        fit(cfg, dm, va, tmp_path / "dm2", progress=False)
