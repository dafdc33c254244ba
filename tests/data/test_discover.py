"""Pairing images with masks, and the four real datasets of ../shared/data."""
import numpy as np
import pytest
import rasterio

from msff.data import DataError, SegmentationDataset, find_pairs, read_mask

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def touch_png(path, h=8, w=8, bands=3):
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="PNG", width=w, height=h, count=bands, dtype="uint8") as d:
        d.write(np.zeros((bands, h, w), np.uint8))


def test_pair_by_stem(tmp_path):
    for n in ("a", "b", "c"):
        touch_png(tmp_path / "images" / f"{n}.png")
        touch_png(tmp_path / "masks" / f"{n}.png", bands=1)
    pairs = find_pairs(tmp_path)
    assert [(p.image.name, p.mask.name) for p in pairs] == [("a.png", "a.png"), ("b.png", "b.png"), ("c.png", "c.png")]


def test_pair_by_number_sichuan_style(tmp_path):
    for i in (3, 4, 17):
        touch_png(tmp_path / "img" / f"Landslide{i:03d}.png")
        touch_png(tmp_path / "labels" / f"LandslideLabel{i:03d}.png")
    pairs = find_pairs(tmp_path)
    assert [(p.image.stem, p.mask.stem) for p in pairs] == [
        ("Landslide003", "LandslideLabel003"), ("Landslide004", "LandslideLabel004"), ("Landslide017", "LandslideLabel017")]
    with pytest.raises(DataError, match="unpaired.*Landslide003.png"):
        find_pairs(tmp_path, pair_by="stem")


def test_explicit_folders_and_unpaired_image_named(tmp_path):
    touch_png(tmp_path / "rgb" / "x1.png")
    touch_png(tmp_path / "rgb" / "lonely.png")
    touch_png(tmp_path / "truth" / "x1.png", bands=1)
    with pytest.raises(DataError, match="no image folder"):
        find_pairs(tmp_path)
    with pytest.raises(DataError, match="lonely.png"):
        find_pairs(tmp_path, image_dir="rgb", mask_dir="truth")
    pairs = find_pairs(tmp_path, image_dir="rgb", mask_dir="truth", require_masks=False)
    assert [p.mask is None for p in pairs] == [True, False]


def test_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="not found"):
        find_pairs(tmp_path / "absent")
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    with pytest.raises(DataError, match="no image files"):
        find_pairs(tmp_path)
    with pytest.raises(DataError, match="empty dataset"):
        SegmentationDataset([])


# name, expected pairs, landslide fraction mean from SOURCE.md (range of the per-mask fractions)
REAL = [
    ("bijie_landslide", 26, 0.0787),
    ("cas_hokkaido_iburi_tobu", 26, 0.0965),
    ("nepal_landslide", 31, 0.0068),
    ("sichuan_landslide", 18, 0.1875),
]


@pytest.mark.parametrize("name,count,frac", REAL)
def test_real_datasets_load_by_auto_detection(shared_data, name, count, frac):
    pairs = find_pairs(f"{shared_data}/{name}")
    assert len(pairs) == count
    ds = SegmentationDataset(pairs, cache=False)  # header checks: sizes, bands
    assert ds.in_channels == 3
    # decode a few masks (auto-detected colour) and compare the landslide fraction with SOURCE.md
    fr = [float((read_mask(p.mask) == 1).mean()) for p in pairs[:6]]
    assert all(f > 0 for f in fr)
    assert 0.2 * frac < np.mean(fr) < 5 * frac
