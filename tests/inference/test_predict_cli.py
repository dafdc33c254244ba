"""``msff predict`` command line: outputs, messages and exit codes."""
import argparse
import json
import os

import numpy as np
import pytest
import rasterio
from conftest import smooth_bands, write_tif

from msff.inference.cli import add_predict_parser, build_parser, main, run_predict


def test_add_predict_parser_plugs_into_a_subcommand_cli(tiny_ckpt, scene, tmp_path):
    path, _ = scene
    parser = argparse.ArgumentParser(prog="msff")
    sub = parser.add_subparsers(dest="command")
    add_predict_parser(sub)
    args = parser.parse_args(["predict", str(tiny_ckpt), str(path), "--out", str(tmp_path / "o" / "x"),
                              "--tile", "96", "--overlap", "32", "--quiet"])
    assert args.command == "predict"
    assert run_predict(args) == 0
    for suffix in ("_prob.tif", "_mask.tif"):
        assert (tmp_path / "o" / f"x{suffix}").is_file()


def test_full_run_with_bands_vector_quicklook(tiny_ckpt, tmp_path, capsys):
    x = smooth_bands(3, 130, 150)
    x[:, :10, :] = 0
    bands = [str(write_tif(tmp_path / f"scene.B{i}.tif", x[j], nodata=0)) for j, i in enumerate((4, 3, 2))]
    out = tmp_path / "out"
    argv = [str(tiny_ckpt), "--bands", *bands, "--out", f"{out}/", "--tile", "96", "--overlap", "32",
            "--vector", "geojson", "--quicklook", "--threshold", "0.5", "--quiet", "--tta"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "valid" in printed and "MP/s" in printed
    files = sorted(os.listdir(out))
    assert files == ["scene_mask.tif", "scene_polygons.geojson", "scene_prob.tif", "scene_quicklook.png", "scene_run.json"]
    with rasterio.open(out / "scene_mask.tif") as ds:
        m = ds.read(1)
    assert np.all(m[:10] == 255) and np.all(m[10:] != 255)
    doc = json.loads((out / "scene_polygons.geojson").read_text())
    assert sum(f["properties"]["area_px"] for f in doc["features"]) == (m == 1).sum()
    # a second run refuses to overwrite: exit 2, one message, outputs untouched
    stamp = (out / "scene_prob.tif").stat().st_mtime_ns
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and "Traceback" not in err
    assert (out / "scene_prob.tif").stat().st_mtime_ns == stamp
    assert main(argv + ["--overwrite"]) == 0


def test_clear_errors(tiny_ckpt, tmp_path, capsys):
    two = write_tif(tmp_path / "two.tif", smooth_bands(2, 30, 30))
    assert main([str(tiny_ckpt), str(two), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "has 2 band(s) but the model 'tiny' expects 3 (B4, B3, B2)" in err
    assert not any(f.startswith("o_") or f.startswith(".o_") for f in os.listdir(tmp_path))
    assert main([str(tiny_ckpt), "--out", str(tmp_path / "o")]) == 2
    assert "no input" in capsys.readouterr().err
    assert main([str(tmp_path / "nockpt"), str(two)]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    assert main([str(tiny_ckpt), str(two), str(two), "--out", str(tmp_path / "prefix")]) == 2
    assert "share an output name" in capsys.readouterr().err


def test_help_lists_the_options():
    text = build_parser().format_help()
    for opt in ("--bands", "--out", "--threshold", "--nodata", "--tile", "--overlap", "--batch-size", "--tta",
                "--vector", "--min-area", "--overwrite", "--device", "--amp", "--backend", "--quicklook"):
        assert opt in text


def test_cuda_device_without_gpu_is_a_clear_error(tiny_ckpt, scene, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    path, _ = scene
    assert main([str(tiny_ckpt), str(path), "--out", str(tmp_path / "g"), "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
