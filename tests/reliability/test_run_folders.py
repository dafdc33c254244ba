"""Issue 16, cases 3-6 and 11: destructive flags, concurrent runs, wrong-typed configs and
checkpoint mistakes — validated before anything on disk changes; a finished run is never lost."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from rel_helpers import FAST, one_error_line, snapshot

from msff.cli import main
from msff.fileio import RunLock

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


@pytest.fixture
def run(finished_run, tmp_path):
    """A private copy of a finished run folder and its snapshot."""
    dst = tmp_path / "runs" / "run"
    shutil.copytree(finished_run, dst)
    return dst, snapshot(dst)


def _leftovers(run):
    return sorted(p.name for p in run.parent.iterdir() if p.name.startswith("."))


@pytest.mark.parametrize("bad,key", [
    (["--lr", "-1"], "lr"),
    (["--epochs", "0"], "epochs"),
    (["--model", "nosuchnet"], "nosuchnet"),
    (["--crop", "-5"], "crop"),
    (["--threshold", "2"], "threshold"),
    (["--device", "gpu"], "device"),
])
def test_overwrite_with_an_invalid_option_keeps_the_finished_run(scenes, run, capsys, bad, key):
    folder, before = run
    assert main(["train", str(scenes), "--out", str(folder), "--overwrite", *FAST, *bad]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("msff: error:") and key in line, line
    assert snapshot(folder) == before and _leftovers(folder) == []


def test_overwrite_that_fails_before_its_first_checkpoint_restores_the_old_run(scenes, run, monkeypatch):
    import msff.engine.train as train

    folder, before = run

    def boom(*a, **k):
        raise FloatingPointError("injected failure in the first epoch")

    monkeypatch.setattr(train, "segmentation_loss", boom)
    with pytest.raises(FloatingPointError, match="injected"):
        main(["train", str(scenes), "--out", str(folder), "--overwrite", *FAST])
    assert snapshot(folder) == before and _leftovers(folder) == []


def test_overwrite_replaces_the_run_once_the_new_one_produced_a_checkpoint(scenes, run):
    folder, before = run
    assert main(["train", str(scenes), "--out", str(folder), "--overwrite", *FAST, "--seed", "7"]) == 0
    after = snapshot(folder)
    assert json.loads(after["train_config.json"])["seed"] == 7 and after["best/model.pt"] != before["best/model.pt"]
    assert json.loads(after["status.json"])["state"] == "complete" and _leftovers(folder) == []


def test_a_replacement_killed_before_its_first_checkpoint_is_undone_on_the_next_run(run, tmp_path):
    folder, before = run
    # A process moves the finished run aside (as --overwrite does), then dies by SIGKILL.
    code = ("import os, signal, sys; from pathlib import Path; from msff.engine.train import _RunFolder; "
            "f = _RunFolder(Path(sys.argv[1]), False, True); f.check(); f.open(); "
            "(f.dir / 'status.json').write_text('{\"state\": \"running\"}'); os.kill(os.getpid(), signal.SIGKILL)")
    p = subprocess.run([sys.executable, "-c", code, str(folder)])
    assert p.returncode == -signal.SIGKILL
    assert snapshot(folder) != before and any(n.endswith(".previous") for n in _leftovers(folder))
    from msff.engine import RunError
    from msff.engine.train import _RunFolder

    f = _RunFolder(folder, resume=False, overwrite=False)
    f.check()  # read-only: the dead replacement is settled once the lock is held
    with pytest.raises(RunError, match="not empty"):
        f.open()  # ...but taking the lock settles the dead replacement first: the old run is back
    assert snapshot(folder) == before and _leftovers(folder) == []


def _hold_lock(folder):
    code = ("import sys, time; from msff.fileio import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_a_second_run_on_a_folder_in_use_is_refused_and_a_dead_owner_is_taken_over(scenes, run, capsys):
    folder, before = run
    holder = _hold_lock(folder)
    try:
        for extra in (["--overwrite"], ["--resume"]):
            assert main(["train", str(scenes), "--out", str(folder), *extra, *FAST]) == 2
            line = one_error_line(capsys.readouterr().err)
            assert f"in use by process {holder.pid} on {socket.gethostname()}" in line, line
            assert snapshot(folder) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder died by SIGKILL: its lock file is still there, but stale
    assert (folder.parent / ".run.msff-lock").exists() and RunLock(folder).holder() is None
    assert main(["train", str(scenes), "--out", str(folder), "--overwrite", *FAST]) == 0
    assert _leftovers(folder) == []


@pytest.mark.slow
def test_two_concurrent_cli_runs_one_wins_the_other_says_why(scenes, tmp_path):
    out = tmp_path / "shared_run"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "msff.cli", "train", str(scenes), "--out", str(out), "--overwrite", *FAST,
           "--epochs", "2"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(r[0] for r in results)
    if codes == [0, 0]:
        pytest.skip("the two runs did not overlap on this machine (one finished before the other started)")
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "in use by process" in one_error_line(loser)
    assert json.loads((out / "status.json").read_text())["state"] == "complete"
    assert (out / "best" / "config.json").is_file() and _leftovers(out) == []


@pytest.mark.parametrize("cfg,key", [
    ({"epochs": 1.7}, "epochs"),
    ({"lr": -1}, "lr"),
    ({"lr": "fast"}, "lr"),
    ({"augment": "yes"}, "augment"),
    ({"val_ratio": "0.2"}, "val_ratio"),
    ({"runs": 2.5}, "runs"),
    ({"kernel_size": "three"}, "kernel_size"),
    ({"model_kwargs": {"in_channels": "three"}}, "in_channels"),
    ({"model_kwargs": {"kernel_sise": 3}}, "kernel_sise"),
])
def test_wrong_typed_config_is_one_line_naming_the_key_and_leaves_nothing(scenes, tmp_path, capsys, cfg, key):
    c = tmp_path / "c.json"
    c.write_text(json.dumps(dict({"preset": "tiny", "epochs": 1, "device": "cpu", "crop": 32}, **cfg)))
    out = tmp_path / "runs" / "r"
    assert main(["train", str(scenes), "--config", str(c), "--out", str(out), "--no-progress"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert key in line, line
    assert not out.exists() and (not out.parent.exists() or list(out.parent.iterdir()) == [])
    if key == "epochs":  # the same command with the key fixed is not blocked by anything left behind
        c.write_text(json.dumps({"preset": "tiny", "kernel_size": 3, "epochs": 1, "device": "cpu", "crop": 32,
                                 "batch_size": 4, "overlays": 0}))
        assert main(["train", str(scenes), "--config", str(c), "--out", str(out), "--no-progress"]) == 0


def test_evaluate_refuses_to_replace_results_without_overwrite(scenes, run, tmp_path, capsys):
    folder, _ = run
    out = tmp_path / "eval.json"
    out.write_text('{"iou": 0.5}')
    assert main(["evaluate", str(folder), str(scenes), "--out", str(out)]) == 2
    assert "--overwrite" in one_error_line(capsys.readouterr().err) and out.read_text() == '{"iou": 0.5}'
    assert main(["evaluate", str(folder), str(scenes), "--out", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["images"] == 10
    # the default file in the run folder follows the same rule
    assert main(["evaluate", str(folder), str(scenes)]) == 0
    default = folder / f"evaluation_{scenes.name}.json"
    first = default.read_bytes()
    capsys.readouterr()
    assert main(["evaluate", str(folder), str(scenes)]) == 2
    assert str(default) in one_error_line(capsys.readouterr().err) and default.read_bytes() == first


def test_evaluate_missing_checkpoint_says_not_found(scenes, tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "no_such_run"), str(scenes)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "no_such_run" in line and "not found" in line, line
    (tmp_path / "empty_run").mkdir()
    assert main(["evaluate", str(tmp_path / "empty_run"), str(scenes)]) == 2
    assert "not found" in one_error_line(capsys.readouterr().err)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_tampered_pickle_checkpoint_is_refused_in_one_line_and_not_executed(scenes, run, tmp_path, capsys):
    folder, _ = run
    marker = tmp_path / "PWNED"
    state = torch.load(folder / "best" / "model.pt", weights_only=True)
    state["extra"] = _Payload(marker)
    torch.save(state, folder / "best" / "model.pt")
    assert main(["evaluate", str(folder), str(scenes), "--out", str(tmp_path / "e.json")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "not a valid msff checkpoint" in line and "not loaded" in line and "weights_only" not in line, line
    assert not marker.exists() and not (tmp_path / "e.json").exists()


def test_checkpoint_config_with_a_wrong_type_names_the_key(scenes, run, tmp_path, capsys):
    folder, _ = run
    cfg_path = folder / "best" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["init_args"]["in_channels"] = "three"  # format 2 (msff.models.checkpoint): the constructor's arguments
    cfg_path.write_text(json.dumps(cfg))
    assert main(["evaluate", str(folder), str(scenes), "--out", str(tmp_path / "e.json")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "in_channels" in line and "three" in line and str(folder / "best") in line, line


def test_stale_running_status_of_a_killed_run_does_not_block_resume(scenes, run):
    """SIGKILL mid-run leaves status "running" with a dead pid, a stale lock and maybe a temporary
    checkpoint file; --resume takes over, removes the temporary and finishes."""
    out, _ = run
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname().replace("-", "_")
    (out / "status.json").write_text(json.dumps({"state": "running", "pid": dead.pid}))
    (out.parent / ".run.msff-lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    stale = out / "checkpoints" / f".last.pt.msff-{host}-{dead.pid}-abcd1234.tmp"
    stale.write_bytes(b"half a checkpoint")
    assert main(["train", str(scenes), "--out", str(out), "--resume", *FAST, "--epochs", "2"]) == 0
    assert json.loads((out / "status.json").read_text())["state"] == "complete"
    assert not stale.exists() and _leftovers(out) == []
    assert [r["epoch"] for r in torch.load(out / "checkpoints" / "last.pt", weights_only=True)["history"]] == [1, 2]


@pytest.mark.slow
def test_training_killed_mid_epoch_resumes_bit_identical(scenes, tmp_path):
    """SIGKILL in the middle of epoch 2 (a long epoch), then --resume: the final weights equal an
    uninterrupted run's bit for bit. (tests/engine/test_train.py resumes from a clean stop; this
    is the kill.)"""
    opts = [*FAST[:FAST.index("--epochs")], "--device", "cpu", "--no-progress", "--overlays", "0",
            "--samples-per-epoch", "320", "--epochs", "3"]
    ref = tmp_path / "ref"
    assert main(["train", str(scenes), "--out", str(ref), *opts]) == 0
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.Popen([sys.executable, "-m", "msff.cli", "train", str(scenes), "--out", str(out), *opts], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = out / "checkpoints" / "last.pt"
    deadline = time.time() + 600
    while not state.exists() and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # inside epoch 2
    assert p.poll() is None, "the run ended before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert torch.load(state, weights_only=True)["epoch"] < 3, "the kill came after the last epoch"
    assert main(["train", str(scenes), "--out", str(out), "--resume", *opts]) == 0
    a = torch.load(ref / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(state, weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
