"""Multi-date input: the date order is kept in the model card, and a model trained on pre,post
refuses post,pre unless told to reorder (then the stack is built in the trained order)."""
import json

import numpy as np
import pytest
from conftest import smooth_bands, write_tif

from msff.data import DataError, SegmentationDataset, compute_normalization, find_pairs
from msff.inference.cli import main


def _two_date_dataset(root, bands=6):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(2):
        write_tif(root / "images" / f"t{i}.tif", smooth_bands(bands, 24, 24, lo=10, hi=240).astype(np.uint8))
        m = np.zeros((24, 24), np.uint8)
        m[3:7, 3:9] = 1
        write_tif(root / "masks" / f"t{i}.tif", m)
    return find_pairs(root)


@pytest.fixture
def prepost_ckpt(tmp_path):
    from msff import MSFFNet

    ds = SegmentationDataset(_two_date_dataset(tmp_path / "d"), dates=["pre", "post"])
    card = {"normalization": compute_normalization(ds), "model_name": "change", **ds.model_card()}
    assert card["stack"]["dates"] == ["pre", "post"] and card["stack"]["bands_per_date"] == 3
    m = MSFFNet(in_channels=6, width_multiplier=0.0625, lkam_blocks=1, kernel_size=3)
    return m.save_pretrained(tmp_path / "ck", metadata=card)


def _date_files(tmp_path):
    files = {}
    for d in ("pre", "post"):
        files[d] = [str(write_tif(tmp_path / f"{d}.B{b}.tif", smooth_bands(1, 40, 40, lo=10, hi=240).astype(np.uint8)))
                    for b in (4, 3, 2)]
    return files


def test_wrong_date_order_is_refused_unless_told(prepost_ckpt, tmp_path, capsys):
    f = _date_files(tmp_path)
    base = [str(prepost_ckpt), "--tile", "32", "--overlap", "8", "--quiet", "--no-domain-check"]
    swapped = ["--date", "post", *f["post"], "--date", "pre", *f["pre"]]
    assert main(base + swapped + ["--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "trained on dates in the order pre, post, but they were given as post, pre" in err
    assert "--reorder-dates" in err and not (tmp_path / "a_prob.tif").exists()
    assert main(base + swapped + ["--out", str(tmp_path / "b"), "--reorder-dates", "--quicklook"]) == 0
    assert (tmp_path / "b_quicklook.png").stat().st_size > 100
    doc = json.loads((tmp_path / "b_run.json").read_text())
    assert doc["dates"] == ["pre", "post"] and doc["inputs"] == f["pre"] + f["post"]
    assert main(base + ["--date", "pre", *f["pre"], "--date", "post", *f["post"], "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c_run.json").read_text())["inputs"] == f["pre"] + f["post"]
    assert main(base + ["--date", "before", *f["pre"], "--date", "post", *f["post"], "--out", str(tmp_path / "d")]) == 2
    assert "trained on the dates pre, post" in capsys.readouterr().err


def test_dates_must_divide_the_bands(tmp_path):
    with pytest.raises(DataError, match=r"2 dates \(pre, post\) do not divide the 5 image bands"):
        SegmentationDataset(_two_date_dataset(tmp_path / "d", bands=5), dates=["pre", "post"])
