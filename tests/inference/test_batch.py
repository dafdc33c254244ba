"""Many scenes in one ``msff predict``: globs and scene lists, resume, per-scene failures and the
summary table; and the same run under torchrun with 2 gloo CPU processes (issue 14)."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import rasterio
from conftest import smooth_bands, write_tif

from msff.inference.batch import expand_inputs, read_scene_list, scene_state
from msff.inference.cli import _plan, build_parser, main

FAST = ["--engine", "nchw", "--quiet", "--tile", "64", "--overlap", "16", "--no-domain-check"]


def _scenes(folder, n=3, size=(70, 90)):
    folder.mkdir(parents=True, exist_ok=True)
    import torch

    rng = torch.Generator().manual_seed(0)
    paths = []
    for i in range(n):
        paths.append(write_tif(folder / f"s{i}.tif", smooth_bands(3, *size, rng=rng)))
    return paths


def _summary(path):
    with open(path) as f:
        return {os.path.basename(r["scene"]): r for r in csv.DictReader(f)}


def test_expand_inputs_glob_list_and_errors(tmp_path):
    paths = _scenes(tmp_path / "in", 3)
    lst = tmp_path / "list.txt"
    lst.write_text("# scenes\n\nin/s2.tif\n")
    got = expand_inputs([str(tmp_path / "in" / "s[12].tif"), str(paths[0])], str(lst))
    assert [os.path.basename(p) for p in got] == ["s1.tif", "s2.tif", "s0.tif", "s2.tif"]
    assert main([str(paths[0]), str(tmp_path / "in" / "s[12].tif"), "--scene-list", str(lst)]) == 2  # s2 twice
    with pytest.raises(ValueError, match="matches no file"):
        expand_inputs([str(tmp_path / "none*.tif")])
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n")
    with pytest.raises(ValueError, match="names no raster"):
        read_scene_list(empty)


def test_many_scenes_failure_recorded_then_resume(tiny_ckpt, tmp_path, capsys):
    _scenes(tmp_path / "in", 3)
    bad = tmp_path / "in" / "s9.tif"
    bad.write_bytes(b"not a tiff")
    out = tmp_path / "out"
    rc = main([str(tiny_ckpt), str(tmp_path / "in" / "*.tif"), "--out", f"{out}/", *FAST])
    assert rc == 1  # one scene failed, the others ran
    rows = _summary(out / "summary.csv")
    assert {k: r["status"] for k, r in rows.items()} == {"s0.tif": "done", "s1.tif": "done", "s2.tif": "done",
                                                         "s9.tif": "failed"}
    assert "s9.tif" in rows["s9.tif"]["error"]
    for i in range(3):
        assert int(rows[f"s{i}.tif"]["valid_pixels"]) == 70 * 90
        assert float(rows[f"s{i}.tif"]["landslide_area_m2"]) == pytest.approx(100 * int(rows[f"s{i}.tif"]["landslide_pixels"]))
        assert (out / f"s{i}_prob.tif").is_file() and (out / f"s{i}_run.json").is_file()
    assert not (out / "s9_prob.tif").exists()
    table = capsys.readouterr().out
    assert "failed" in table and "s1.tif" in table

    # resume: complete scenes are skipped, an interrupted one (no sidecar) is predicted again
    bad.unlink()
    (out / "s1_run.json").unlink()
    before = (out / "s0_prob.tif").stat().st_mtime_ns
    rc = main([str(tiny_ckpt), str(tmp_path / "in" / "*.tif"), "--out", f"{out}/", "--resume", *FAST])
    assert rc == 0
    rows = _summary(out / "summary.csv")
    assert rows["s0.tif"]["status"] == "skipped" and rows["s2.tif"]["status"] == "skipped"
    assert rows["s1.tif"]["status"] == "done" and (out / "s1_run.json").is_file()
    assert (out / "s0_prob.tif").stat().st_mtime_ns == before  # untouched

    # without --resume existing outputs are still refused before any work
    assert main([str(tiny_ckpt), str(tmp_path / "in" / "*.tif"), "--out", f"{out}/", *FAST]) == 2


def test_resume_checks_outputs_are_valid(tiny_ckpt, tmp_path):
    paths = _scenes(tmp_path / "in", 1)
    out = tmp_path / "out"
    assert main([str(tiny_ckpt), str(paths[0]), "--out", f"{out}/", *FAST]) == 0
    args = build_parser().parse_args([str(tiny_ckpt), str(paths[0]), "--out", f"{out}/"])
    pl = _plan(args)[0]
    assert scene_state(pl, str(tiny_ckpt)) == ("complete", "")
    assert scene_state(pl, "other/ckpt")[0] == "stale"
    (out / "s0_mask.tif").write_bytes(b"truncated")
    assert scene_state(pl, str(tiny_ckpt))[0] == "partial"
    assert main([str(tiny_ckpt), str(paths[0]), "--out", f"{out}/", "--resume", *FAST]) == 0
    with rasterio.open(out / "s0_mask.tif") as ds:
        assert (ds.width, ds.height) == (90, 70)
    # outputs of another checkpoint are not replaced under --resume
    other = tmp_path / "ckpt2"
    shutil.copytree(tiny_ckpt, other)
    assert main([str(other), str(paths[0]), "--out", f"{out}/", "--resume", *FAST]) == 1


def _torchrun(args, env_extra=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "msff.cli", "predict", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_torchrun_two_gloo_ranks_scene_list_equals_single_process(tiny_ckpt, tmp_path):
    _scenes(tmp_path / "in", 3)
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert main([str(tiny_ckpt), str(tmp_path / "in" / "*.tif"), "--out", f"{single}/", "--device", "cpu", *FAST]) == 0
    p = _torchrun([str(tiny_ckpt), str(tmp_path / "in" / "*.tif"), "--out", f"{multi}/", "--device", "cpu", *FAST])
    assert p.returncode == 0, p.stderr[-3000:]
    rows = _summary(multi / "summary.csv")
    assert sorted(r["status"] for r in rows.values()) == ["done"] * 3
    assert {r["rank"] for r in rows.values()} == {"0", "1"}  # both ranks worked
    for i in range(3):
        with rasterio.open(single / f"s{i}_mask.tif") as a, rasterio.open(multi / f"s{i}_mask.tif") as b:
            assert np.array_equal(a.read(1), b.read(1))
        with rasterio.open(single / f"s{i}_prob.tif") as a, rasterio.open(multi / f"s{i}_prob.tif") as b:
            np.testing.assert_allclose(b.read(1), a.read(1), rtol=1e-5, atol=1e-6)
    assert not [f for f in os.listdir(multi) if f.startswith(".")]  # no temporary file left


def test_row_shares_cover_the_scene_and_every_touching_window():
    from msff.inference.distributed import row_shares
    from msff.inference.tiling import TileGrid

    for h, tile, ov, world in ((1600, 512, 64, 2), (300, 64, 16, 3), (70, 64, 16, 2), (1000, 128, 100, 4)):
        g = TileGrid(h, 50, tile, ov)
        shares = row_shares(g.rows, g.tile_h, h, world)
        assert shares[0][0] == 0 and max(s[1] for s in shares) == h
        ends = [s for s in shares if s[1] > s[0]]
        assert all(a[1] == b[0] for a, b in zip(ends, ends[1:], strict=False))  # contiguous, no gap, no overlap
        for first, end, wrows in ends:
            assert set(wrows) == {y for y in g.rows if y < end and y + g.tile_h > first}


def test_torchrun_two_gloo_ranks_one_scene_split_by_rows_equals_single_process(tiny_ckpt, tmp_path):
    import torch

    scene = write_tif(tmp_path / "big.tif", smooth_bands(3, 300, 170, rng=torch.Generator().manual_seed(3)))
    args = [str(tiny_ckpt), str(scene), "--device", "cpu", *FAST]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    p = _torchrun([*args, "--out", str(tmp_path / "multi")])
    assert p.returncode == 0, p.stderr[-3000:]
    with rasterio.open(tmp_path / "single_mask.tif") as a, rasterio.open(tmp_path / "multi_mask.tif") as b:
        assert np.array_equal(a.read(1), b.read(1))
        assert b.profile["crs"] == a.profile["crs"] and b.transform == a.transform
    with rasterio.open(tmp_path / "single_prob.tif") as a, rasterio.open(tmp_path / "multi_prob.tif") as b:
        np.testing.assert_allclose(b.read(1), a.read(1), rtol=1e-5, atol=1e-6)
        assert b.tags().get("msff_ranks") == "2"
    assert (tmp_path / "multi_run.json").is_file()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]  # parts and temporaries removed
