"""Issue 16, cases 1 and 10: corrupt or unpaired input files are one clear error naming the file,
in training, evaluation and the normalisation statistics — never silently wrong pixels."""
import json

import numpy as np
import pytest
import rasterio
from rel_helpers import FAST, copy_dataset, one_error_line, truncate

from msff.cli import main
from msff.data import (
    DataError,
    SegmentationDataset,
    compute_normalization,
    find_pairs,
    read_image,
    read_mask,
)

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")

CUTS = {"half": lambda n: n // 2, "100-bytes": lambda n: 100}


def _corrupt(scenes, tmp_path, folder: str, cut: str):
    data = copy_dataset(scenes, tmp_path / "data")
    victim = sorted((data / folder).iterdir())[3]
    truncate(victim, CUTS[cut](victim.stat().st_size))
    return data, victim


@pytest.mark.parametrize("cut", sorted(CUTS))
@pytest.mark.parametrize("folder", ["images", "masks"])
def test_truncated_png_stops_training_before_the_run_folder(scenes, tmp_path, capsys, folder, cut):
    data, victim = _corrupt(scenes, tmp_path, folder, cut)
    run = tmp_path / "run"
    assert main(["train", str(data), "--out", str(run), *FAST]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("msff: error:") and str(victim) in line and "truncated" in line, line
    assert not run.exists() and not list(tmp_path.glob(".run*"))


@pytest.mark.parametrize("cut", sorted(CUTS))
def test_truncated_png_stops_evaluation_and_writes_nothing(scenes, finished_run, tmp_path, capsys, cut):
    data, victim = _corrupt(scenes, tmp_path, "images", cut)
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(finished_run), str(data), "--out", str(out)]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(victim) in line and "truncated" in line, line
    assert not out.exists()


def test_truncated_png_is_refused_before_statistics_even_without_cache(scenes, tmp_path):
    data, victim = _corrupt(scenes, tmp_path, "images", "half")
    with pytest.raises(DataError, match="truncated") as e:
        SegmentationDataset(find_pairs(data), cache=False)
    assert str(victim) in str(e.value)
    # the intact files give the statistics they gave before
    good = [p for p in find_pairs(data) if p.image != victim]
    ref = compute_normalization(SegmentationDataset([p for p in find_pairs(scenes) if p.image.name != victim.name]))
    assert compute_normalization(SegmentationDataset(good)) == ref


def test_the_same_truncated_file_fails_the_same_way_every_time(scenes, tmp_path):
    _, victim = _corrupt(scenes, tmp_path, "images", "100-bytes")
    msgs = set()
    for _ in range(3):
        with pytest.raises(DataError) as e:
            read_image(victim)
        msgs.add(str(e.value))
    assert len(msgs) == 1 and str(victim) in msgs.pop()


def _write(path, arr, driver, **kw):
    with rasterio.open(path, "w", driver=driver, width=arr.shape[2], height=arr.shape[1], count=arr.shape[0],
                       dtype=arr.dtype, **kw) as d:
        d.write(arr)


@pytest.mark.parametrize("driver,suffix,extra", [
    ("PNG", ".png", {}),
    ("PNG", ".png", {"dtype16": True}),
    ("JPEG", ".jpg", {}),
    ("GTiff", ".tif", {"compress": "deflate"}),
    ("BMP", ".bmp", {}),
])
def test_every_format_refuses_a_truncated_file(tmp_path, driver, suffix, extra):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (3, 96, 80)).astype(np.uint8)
    if extra.pop("dtype16", False):
        arr = (arr.astype(np.uint16) * 257)[:1]
    p = tmp_path / f"x{suffix}"
    _write(p, arr, driver, **extra)
    full, _ = read_image(p)
    assert full.shape == arr.shape
    truncate(p, p.stat().st_size * 2 // 3)
    with pytest.raises(DataError, match="truncated") as e:
        read_image(p)
    assert str(p) in str(e.value)


def test_corrupted_png_bytes_fail_the_checksum(tmp_path):
    p = tmp_path / "m.png"
    _write(p, (np.arange(64 * 64).reshape(1, 64, 64) % 2 * 255).astype(np.uint8), "PNG")
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF  # one flipped byte inside the image data, length unchanged
    p.write_bytes(bytes(b))
    with pytest.raises(DataError, match=str(p)):
        read_mask(p)


def test_mask_without_image_is_an_error_with_the_count(scenes, tmp_path, capsys):
    data = copy_dataset(scenes, tmp_path / "data")
    gone = sorted((data / "images").iterdir())[:2]
    for p in gone:
        p.unlink()
    with pytest.raises(DataError, match="2 unpaired mask") as e:
        find_pairs(data)
    assert all(p.name in str(e.value) for p in gone)
    assert main(["train", str(data), "--out", str(tmp_path / "run"), *FAST]) == 2
    assert "2 unpaired mask" in one_error_line(capsys.readouterr().err)
    # prediction-style listing (masks optional) still pairs what it can
    assert len(find_pairs(data, require_masks=False)) == 8


def test_evaluation_with_intact_files_still_works(scenes, finished_run, tmp_path):
    out = tmp_path / "e.json"
    assert main(["evaluate", str(finished_run), str(scenes), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["images"] == 10
