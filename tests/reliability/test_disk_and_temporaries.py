"""Issue 16, cases 7, 9 and 12: a full disk is one line naming the path and the space needed with
nothing left behind; temporaries of killed runs are cleaned by the next run (only stale ones);
every file and folder msff makes respects the umask."""
import errno
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from rasterio.transform import from_origin
from rel_helpers import FAST, one_error_line, snapshot

import msff.fileio as fileio
from msff.cli import main
from msff.fileio import DiskFullError, atomic_write_bytes, clean_stale_temporaries

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

HOST = fileio._host()


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


@pytest.fixture(scope="module")
def ckpt_and_scene(tmp_path_factory):
    from msff import MSFFNet

    root = tmp_path_factory.mktemp("predict")
    torch.manual_seed(0)
    MSFFNet(width_multiplier=0.0625, kernel_size=3, lkam_blocks=1).save_pretrained(
        root / "ck", metadata={"normalization": {"mean": [100.0] * 3, "std": [50.0] * 3}, "threshold": 0.5})
    x = (np.random.default_rng(0).random((3, 300, 260)) * 200).astype(np.uint8)
    with rasterio.open(root / "scene.tif", "w", driver="GTiff", width=260, height=300, count=3, dtype="uint8",
                       crs="EPSG:32654", transform=from_origin(500000, 4700000, 10, 10)) as d:
        d.write(x)
    return root / "ck", root / "scene.tif"


# ---- case 7: full disk --------------------------------------------------------------------------
def test_atomic_write_on_a_full_disk_names_the_path_and_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    target.write_bytes(b"old")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full)
    with pytest.raises(DiskFullError) as e:
        atomic_write_bytes(target, b"x" * 5000)
    msg = str(e.value)
    assert str(target) in msg and "4.9 KB needed" in msg and "free" in msg and "\n" not in msg
    assert target.read_bytes() == b"old" and _hidden(tmp_path) == []


def test_training_on_a_full_disk_is_one_line_and_leaves_no_temporaries(scenes, tmp_path, capsys, monkeypatch):
    real = fileio.atomic_write_bytes.__wrapped__ if hasattr(fileio.atomic_write_bytes, "__wrapped__") else None
    assert real is None
    real_replace = fileio.os.replace

    def replace(src, dst):  # the checkpoint is the first big file: the disk fills up there
        if Path(dst).name == "last.pt":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    run = tmp_path / "run"
    assert main(["train", str(scenes), "--out", str(run), *FAST]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "no space left on device writing" in line and str(run / "checkpoints" / "last.pt") in line, line
    assert "needed" in line and _hidden(run) == [] and not list(tmp_path.glob(".run*"))


def _can_mount_tmpfs() -> bool:
    if not shutil.which("unshare") or sys.platform != "linux":
        return False
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                        "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d"], capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="cannot mount a small tmpfs here (needs user namespaces)")
def test_a_real_full_disk_tmpfs_predict_and_train(ckpt_and_scene, scenes, tmp_path):
    """A 300 KB tmpfs: predict (3.4 MB of outputs) and train fail with one line naming the path,
    and the file system is left empty."""
    ck, scene = ckpt_and_scene
    mnt = tmp_path / "small"
    mnt.mkdir()
    py = sys.executable
    script = textwrap.dedent(f"""
        set -u
        mount -t tmpfs -o size=300k tmpfs {mnt}
        {py} -m msff.cli predict {ck} {scene} --out {mnt}/ --device cpu --quiet --tile 128 --overlap 16 \
            2> {tmp_path}/predict.err; echo $? > {tmp_path}/predict.rc
        ls -A {mnt} > {tmp_path}/predict.ls
        {py} -m msff.cli train {scenes} --out {mnt}/run {' '.join(FAST)} --preset tiny \
            > /dev/null 2> {tmp_path}/train.err; echo $? > {tmp_path}/train.rc
        find {mnt} -name '.*' > {tmp_path}/train.hidden
    """)
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], env=env, timeout=600,
                   check=True)
    assert (tmp_path / "predict.rc").read_text().strip() == "2"
    line = one_error_line((tmp_path / "predict.err").read_text())
    assert f"no space left on device writing {mnt}/scene_" in line and "needed" in line, line
    assert (tmp_path / "predict.ls").read_text().split() == []
    assert (tmp_path / "train.rc").read_text().strip() == "2", (tmp_path / "train.err").read_text()
    line = one_error_line((tmp_path / "train.err").read_text())
    assert "no space left on device writing" in line and str(mnt) in line, line
    assert (tmp_path / "train.hidden").read_text().split() == []


# ---- case 9: stale temporaries ------------------------------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_only_stale_temporaries_of_the_same_output_are_removed(tmp_path):
    target = tmp_path / "scene_prob.tif"
    dead, live = _dead_pid(), os.getpid()
    files = {
        "dead": f".scene_prob.tif.msff-{HOST}-{dead}-abcd1234.part.tif",
        "dead_aux": f".scene_prob.tif.msff-{HOST}-{dead}-abcd1234.part.tif.aux.xml",
        "live": f".scene_prob.tif.msff-{HOST}-{live}-abcd1234.part.tif",
        "other_host": f".scene_prob.tif.msff-elsewhere-{dead}-abcd1234.part.tif",
        "other_output": f".scene_mask.tif.msff-{HOST}-{dead}-abcd1234.part.tif",
        "legacy_old": ".scene_prob.tif.k2j4h5g6.part.tif",
        "legacy_new": ".scene_prob.tif.q1w2e3r4.part.tif",
        "user_file": ".scene_prob.tif.notes",
    }
    for name in files.values():
        (tmp_path / name).write_bytes(b"x")
    old = time.time() - 2 * fileio.LEGACY_STALE_S
    os.utime(tmp_path / files["legacy_old"], (old, old))
    removed = {p.name for p in clean_stale_temporaries(target)}
    assert removed == {files["dead"], files["dead_aux"], files["legacy_old"]}
    left = {p.name for p in tmp_path.iterdir()}
    assert left == set(files.values()) - removed


def _start_writer_then_die(ck_dir: Path, out: Path) -> None:
    """A process that is streaming prediction rows into its temporaries when SIGKILL arrives."""
    code = textwrap.dedent(f"""
        import os, signal, numpy as np
        from msff.inference.writers import SceneWriter
        w = SceneWriter({str(out / 'scene_prob.tif')!r}, {str(out / 'scene_mask.tif')!r},
                        dict(width=64, height=64, crs=None, transform=None))
        w.write_rows(0, np.full((16, 64), 0.7, np.float32), np.ones((16, 64), bool), 0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    p = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert p.returncode == -signal.SIGKILL


def test_predict_after_a_killed_predict_removes_its_temporaries(ckpt_and_scene, tmp_path):
    ck, scene = ckpt_and_scene
    out = tmp_path / "out"
    out.mkdir()
    _start_writer_then_die(ck, out)
    left = _hidden(out)
    assert len(left) == 2 and all(".part.tif" in n for n in left) and not (out / "scene_prob.tif").exists()
    assert main(["predict", str(ck), str(scene), "--out", f"{out}/", "--device", "cpu", "--quiet"]) == 0
    assert _hidden(out) == [] and (out / "scene_prob.tif").is_file() and (out / "scene_mask.tif").is_file()


@pytest.mark.slow
def test_sigkill_mid_predict_on_a_4000px_scene_then_rerun(ckpt_and_scene, tmp_path):
    """The issue's reproduction: a 4000×4000 scene, SIGKILL while rows stream to disk, re-run."""
    ck, _ = ckpt_and_scene
    scene = tmp_path / "big.tif"
    n = 4000
    with rasterio.open(scene, "w", driver="GTiff", width=n, height=n, count=3, dtype="uint8", crs="EPSG:32654",
                       transform=from_origin(500000, 4700000, 10, 10), tiled=True, compress="deflate") as d:
        rng = np.random.default_rng(1)
        for r in range(0, n, 500):
            d.write((rng.random((3, 500, n)) * 200).astype(np.uint8), window=((r, r + 500), (0, n)))
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "msff.cli", "predict", str(ck), str(scene), "--out", f"{out}/", "--device", "cpu",
           "--quiet"]
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        parts = [q for q in out.glob(".*.part.tif") if q.stat().st_size > 0]
        if parts:
            break
        time.sleep(0.2)
    time.sleep(2)
    assert p.poll() is None, "predict finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert any(".part.tif" in n for n in _hidden(out)) and not (out / "big_prob.tif").exists()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr
    assert _hidden(out) == [] and (out / "big_prob.tif").is_file()


# ---- case 12: umask -----------------------------------------------------------------------------
@pytest.fixture(params=[0o002, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _modes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): stat.S_IMODE(p.stat().st_mode) for p in [folder, *folder.rglob("*")]}


def test_training_evaluation_and_prediction_outputs_follow_the_umask(scenes, ckpt_and_scene, tmp_path, umask):
    run = tmp_path / "run"
    assert main(["train", str(scenes), "--out", str(run), *FAST]) == 0
    ev = tmp_path / "eval.json"
    assert main(["evaluate", str(run), str(scenes), "--out", str(ev)]) == 0
    ck, scene = ckpt_and_scene
    assert main(["predict", str(ck), str(scene), "--out", f"{tmp_path}/pred/", "--device", "cpu", "--quiet"]) == 0
    want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
    for folder in (run, tmp_path / "pred"):
        for name, mode in _modes(folder).items():
            want = want_dir if (folder / name).is_dir() else want_file
            assert mode == want, f"{folder / name}: mode {oct(mode)}, umask {oct(umask)} wants {oct(want)}"
    assert stat.S_IMODE(ev.stat().st_mode) == want_file
    assert stat.S_IMODE((run / "best").stat().st_mode) == want_dir


def test_lock_file_is_removed_and_reports_its_owner(tmp_path):
    lock = fileio.RunLock(tmp_path / "run")
    with lock:
        info = fileio.RunLock(tmp_path / "run").holder()
        assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
        with pytest.raises(fileio.FolderLockedError, match=f"process {os.getpid()}"):
            fileio.RunLock(tmp_path / "run").acquire()
    assert not lock.path.exists() and fileio.RunLock(tmp_path / "run").holder() is None
    assert json.loads(json.dumps(info))  # plain JSON for other tools
    assert snapshot(tmp_path) == {}


# ---- cases 8 and 11: predict options checked against the model ------------------------------------
def test_predict_refuses_a_tile_below_the_downsampling_factor(ckpt_and_scene, tmp_path, capsys):
    ck, scene = ckpt_and_scene
    out = tmp_path / "o"
    for tile in (1, 8):
        assert main(["predict", str(ck), str(scene), "--out", f"{out}/", "--device", "cpu", "--quiet",
                     "--tile", str(tile), "--overlap", "0"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert f"--tile {tile}" in line and "downsampling factor (16 px)" in line, line
    assert not list(out.glob("*")) if out.exists() else True


def test_predict_warns_with_the_reason_below_eight_cells_of_context(ckpt_and_scene, tmp_path, capsys):
    ck, scene = ckpt_and_scene
    assert main(["predict", str(ck), str(scene), "--out", f"{tmp_path}/o/", "--device", "cpu", "--quiet",
                 "--tile", "32", "--overlap", "8"]) == 0
    err = capsys.readouterr().err
    assert "warning: --tile 32" in err and "2x2 cells" in err and "results change with the tile size" in err, err
    assert main(["predict", str(ck), str(scene), "--out", f"{tmp_path}/p/", "--device", "cpu", "--quiet"]) == 0
    assert "--tile" not in capsys.readouterr().err


def test_predict_refuses_a_negative_min_area_before_writing(ckpt_and_scene, tmp_path, capsys):
    ck, scene = ckpt_and_scene
    out = tmp_path / "o"
    assert main(["predict", str(ck), str(scene), "--out", f"{out}/", "--device", "cpu", "--quiet",
                 "--vector", "geojson", "--min-area", "-10"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "--min-area must be >= 0" in line and "-10" in line, line
    assert not out.exists() or not list(out.iterdir())
