"""The `msff` command: train / evaluate / demo, config files, and bad input (one clear error naming
the file, no run folder left behind)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import rasterio

from msff.cli import build_parser, main
from msff.data import write_scene_dataset
from msff.models import ModelCard

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

FAST = ["--preset", "tiny", "--kernel-size", "3", "--epochs", "1", "--batch-size", "4", "--crop", "32",
        "--device", "cpu", "--no-progress", "--overlays", "1"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return write_scene_dataset(tmp_path_factory.mktemp("cli") / "scenes", n=10, size=40, seed=9)


def write(path, arr, driver="PNG", nodata=None):
    arr = arr[None] if arr.ndim == 2 else arr
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver=driver, width=arr.shape[2], height=arr.shape[1], count=arr.shape[0],
                       dtype=arr.dtype, nodata=nodata) as d:
        d.write(arr)


def test_train_then_evaluate(scenes, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(scenes), "--out", str(run), *FAST]) == 0
    out = capsys.readouterr().out
    assert "validation @ epoch 1" in out and str(run / "best") in out
    metrics = json.loads((run / "metrics.json").read_text())
    meta = ModelCard.from_checkpoint(run / "best")
    val_names = meta["splits"]["val"]
    assert len(val_names) == 2 and not set(val_names) & set(meta["splits"]["train"])
    (tmp_path / "val.txt").write_text("\n".join(val_names))
    res_path = tmp_path / "eval.json"
    assert main(["evaluate", str(run), str(scenes), "--list", str(tmp_path / "val.txt"), "--out", str(res_path)]) == 0
    res = json.loads(res_path.read_text())
    assert res["iou"] == pytest.approx(metrics["best"]["iou"]) and res["images"] == 2
    assert '"iou"' in capsys.readouterr().out
    # default output file lands in the run folder
    assert main(["evaluate", str(run / "best"), str(scenes)]) == 0
    assert (run / f"evaluation_{scenes.name}.json").is_file()
    # an existing run folder is refused without --overwrite, replaced with it
    assert main(["train", str(scenes), "--out", str(run), *FAST]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["train", str(scenes), "--out", str(run), "--overwrite", "--overlays", "0", *FAST[:-2]]) == 0


def test_config_file_and_overrides(scenes, tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"preset": "tiny", "kernel_size": 3, "epochs": 3, "lr": 0.01, "batch_size": 4,
                               "crop": 32, "device": "cpu", "overlays": 0, "val_ratio": 0.3}))
    run = tmp_path / "r"
    assert main(["train", str(scenes), "--config", str(cfg), "--epochs", "1", "--out", str(run), "--no-progress"]) == 0
    tc = json.loads((run / "train_config.json").read_text())
    assert tc["epochs"] == 1 and tc["lr"] == 0.01 and tc["model_kwargs"] == {"kernel_size": 3}
    assert json.loads((run / "metrics.json").read_text())["best"]["images"] == 3
    cfg.write_text(json.dumps({"learning_rate": 1}))
    assert main(["train", str(scenes), "--config", str(cfg), "--out", str(tmp_path / "x")]) == 2
    assert "learning_rate" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_bundled_configs_are_valid():
    from msff.cli import parse_command
    from msff.config import TrainConfig, shipped_configs

    assert {"realdata-cpu", "demo"} <= set(shipped_configs())
    for n in shipped_configs():
        cfgs = parse_command("train", ["somewhere", "--config", n, "--out", "x"])
        assert cfgs[TrainConfig].epochs >= 1


@pytest.mark.parametrize("cfg,key", [
    ({"epochs": "ten"}, "epochs"),
    ({"crop": "64"}, "crop"),
    ({"batch_size": None}, "batch_size"),
    ({"crop": True}, "crop"),
])
def test_config_file_type_error_is_one_line_naming_the_key(scenes, tmp_path, capsys, cfg, key):
    c = tmp_path / "c.json"
    c.write_text(json.dumps(cfg))
    assert main(["train", str(scenes), "--config", str(c), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msff: error:") and f"'{key}'" in err[0] and str(c) in err[0], err
    assert "Traceback" not in err[0] and not (tmp_path / "r").exists()


def test_config_file_type_error_in_a_subprocess_exits_2_without_traceback(tmp_path):
    c = tmp_path / "c.yaml"
    c.write_text("crop: true\n")
    p = subprocess.run([sys.executable, "-m", "msff.cli", "train", "d", "--config", str(c), "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "'crop'" in p.stderr, p.stderr


@pytest.mark.parametrize("argv,needle", [
    (["--epochs", "ten"], "'epochs'"), (["--crop", "6.5"], "'crop'"), (["--loss", "focal"], "loss"),
    (["--bands", "x,y"], "--bands"), (["--time-budget", "soon"], "--time-budget"), (["--bogus", "1"], "--bogus"),
    (["--augment", "maybe"], "augment"),
])
def test_command_line_type_error_is_one_line(tmp_path, capsys, argv, needle):
    assert main(["train", "d", "--out", str(tmp_path / "r"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msff: error:") and needle in err[0], err


def test_print_config_round_trips_and_old_flags_still_work(tmp_path, capsys):
    from msff.cli import parse_command
    from msff.config import DataConfig, RunConfig, SplitConfig, TrainConfig

    argv = ["d1", "d2", "--config", "realdata-cpu", "--epochs", "5", "--bands", "3,2,1", "--no-augment", "--val", "v1",
            "v2", "--time-budget", "15m", "--ignore-value", "0", "--ignore-value", "255", "--channels-last",
            "--mask-color", "255,255,0", "-o", str(tmp_path / "run"), "--no-progress", "--kernel-size", "7"]
    cfgs = parse_command("train", argv)
    t, d, s, r = cfgs[TrainConfig], cfgs[DataConfig], cfgs[SplitConfig], cfgs[RunConfig]
    assert (t.epochs, t.augment, t.time_budget_s, t.channels_last, t.crop, t.lr) == (5, False, 900.0, True, 256, 0.001)
    assert (d.data, d.bands, d.ignore_value, d.mask_color) == (["d1", "d2"], [3, 2, 1], [0, 255], [255, 255, 0])
    assert s.val == ["v1", "v2"] and (r.progress, r.kernel_size, r.lkam_blocks) == (False, 7, 1)
    assert parse_command("train", argv + ["--print_config"]) is None
    printed = capsys.readouterr().out
    (tmp_path / "p.yaml").write_text(printed)
    again = parse_command("train", ["--config", str(tmp_path / "p.yaml")])
    assert again == cfgs  # the printed YAML is a config file that gives the same configs
    # the jsonargparse spellings work too
    alt = parse_command("train", ["d1", "--batch_size", "4", "--bands", "[4, 3, 2]", "--augment", "false"])
    assert alt[TrainConfig].batch_size == 4 and alt[DataConfig].bands == [4, 3, 2] and not alt[TrainConfig].augment


def test_every_command_prints_its_config(capsys):
    for argv in (["evaluate", "ck", "d"], ["predict", "ck", "a.tif", "--date", "pre", "a", "b", "--band-indexes", "1,2"],
                 ["demo", "--scenes", "10"], ["experiment", "cpu", "--out", "x", "--models", "unet,msffnet"]):
        assert main([*argv, "--print_config"]) == 0
        assert capsys.readouterr().out.strip(), argv


def test_a_bug_in_an_msff_module_is_not_reported_as_unavailable(tmp_path, monkeypatch):
    import argparse

    from msff.cli import _add_optional

    (tmp_path / "msff_buggy_cmd.py").write_text("raise RuntimeError('a bug at import')\n")
    (tmp_path / "msff_needs_missing_dep.py").write_text("import msff_no_such_module_xyz\n")
    (tmp_path / "msff_needs_optional.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'onnxruntime'\", name='onnxruntime')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sub = argparse.ArgumentParser(prog="msff").add_subparsers(dest="command")
    with pytest.raises(RuntimeError, match="a bug at import"):
        _add_optional(sub, "buggy", "msff_buggy_cmd", "add", "run", "x")
    with pytest.raises(ModuleNotFoundError, match="msff_no_such_module_xyz"):
        _add_optional(sub, "needs", "msff_needs_missing_dep", "add", "run", "x")
    _add_optional(sub, "opt", "msff_needs_optional", "add", "run", "x")  # a missing optional package: listed
    assert "unavailable" in sub.choices["opt"].format_usage() + str(sub._choices_actions[-1].help)


def _bad_dataset(kind, root):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (3, 24, 24)).astype(np.uint8)
    mask = (rng.random((24, 24)) > 0.7).astype(np.uint8) * 255
    for i in range(4):
        write(root / "images" / f"t{i}.png", img)
        write(root / "masks" / f"t{i}.png", mask)
    if kind == "missing":
        return root / "nowhere", "nowhere"
    if kind == "unpaired":
        write(root / "images" / "orphan.png", img)
        return root, "orphan.png"
    if kind == "size":
        write(root / "masks" / "t2.png", mask[:20])
        return root, "t2.png"
    if kind == "encoding":
        m = mask.copy()
        m[:3] = 7
        write(root / "masks" / "t1.png", m)
        return root, "t1.png"
    if kind == "nan":
        f = rng.random((3, 24, 24)).astype(np.float32)
        f[1, 5, 5] = np.nan
        for i in range(4):
            (root / "images" / f"t{i}.png").unlink()
            write(root / "images" / f"t{i}.tif", f if i == 3 else np.nan_to_num(f), driver="GTiff")
        return root, "t3.tif"
    if kind == "empty":
        for p in (root / "images").iterdir():
            p.unlink()
        return root, "no image files"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "unpaired", "size", "encoding", "nan", "empty"])
def test_bad_input_one_clear_error_and_no_run_folder(kind, tmp_path, capsys):
    data, needle = _bad_dataset(kind, tmp_path / "data")
    run = tmp_path / "run"
    assert main(["train", str(data), "--out", str(run), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("msff: error:") and needle in err[0], err
    assert not run.exists()


def test_wrong_band_count_for_checkpoint(scenes, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", str(scenes), "--out", str(run), *FAST]) == 0
    rng = np.random.default_rng(1)
    for i in range(2):
        write(tmp_path / "ms" / "images" / f"m{i}.tif", rng.integers(0, 999, (4, 24, 24)).astype(np.uint16), driver="GTiff")
        write(tmp_path / "ms" / "masks" / f"m{i}.tif", (rng.random((24, 24)) > 0.5).astype(np.uint8), driver="GTiff")
    assert main(["evaluate", str(run), str(tmp_path / "ms")]) == 2
    err = capsys.readouterr().err
    assert "expects 3 band" in err and "m0.tif" in err
    assert main(["evaluate", str(run), str(tmp_path / "ms"), "--bands", "3,2,1"]) == 0  # bands selected


def test_demo_small_and_refuses_existing(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--scenes", "10", "--size", "32", "--epochs", "1", "--no-progress"]
    assert main(args) == 0
    for f in ("metrics.json", "curves.png", "best/model.pt", "log.csv", "scenes/images/scene_0000.png"):
        assert (out / f).is_file(), f
    assert list((out / "overlays").glob("*.png"))
    assert "metrics.json" in capsys.readouterr().out
    assert main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert not list(tmp_path.glob(".msff-demo-*"))  # no staging folder left behind


def test_subcommands_registered():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"train", "evaluate", "demo", "predict", "experiment"} <= set(sub.choices)


def test_console_entry_point_help():
    p = subprocess.run([sys.executable, "-m", "msff.cli", "demo", "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "--overwrite" in p.stdout


def test_separate_val_and_test_folders(scenes, tmp_path, capsys):
    val = write_scene_dataset(tmp_path / "val", n=3, size=40, seed=10)
    test = write_scene_dataset(tmp_path / "test", n=2, size=40, seed=11)
    run = tmp_path / "run"
    assert main(["train", str(scenes), "--val", str(val), "--test", str(test), "--out", str(run), *FAST]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert m["best"]["images"] == 3 and m["test"]["images"] == 2
    assert "test: precision" in capsys.readouterr().out


def test_experiment_command_dry_run_and_bad_config(tmp_path, capsys):
    assert main(["experiment", "cpu", "--dry-run", "--models", "unet,msffnet", "--seeds", "4"]) == 0
    assert capsys.readouterr().out.splitlines()[:3] == ["experiment cpu: 2 models × 1 seeds", "models: unet, msffnet",
                                                        "seeds: [4]"]
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"datasets": ["a"], "models": ["unet"], "seeds": [0], "train": {"crop": "64"}}))
    for argv, needle in [(["nosuch", "--out", str(tmp_path / "o")], "neither a file nor a shipped config"),
                         ([str(bad), "--out", str(tmp_path / "o")], "'crop'"), (["cpu"], "--out")]:
        assert main(["experiment", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists()
