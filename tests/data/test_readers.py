"""Readers and mask decoding: colour masks (given/detected, soft edges), 0/1 and 0/255 masks,
GeoTIFF nodata, NaNs, band selection, Landslide4Sense-style .h5 patches."""

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin

from msff.data import (
    IGNORE_INDEX,
    DataError,
    MaskEncoding,
    SegmentationDataset,
    decode_mask,
    find_pairs,
    raster_shape,
    read_image,
    read_mask,
)

pytestmark = pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")


def write_png(path, arr):
    arr = arr[None] if arr.ndim == 2 else arr
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="PNG", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0], dtype="uint8") as d:
        d.write(arr)


def write_tif(path, arr, nodata=None):
    arr = arr[None] if arr.ndim == 2 else arr
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", driver="GTiff", width=arr.shape[2], height=arr.shape[1], count=arr.shape[0],
                       dtype=arr.dtype, nodata=nodata, crs="EPSG:32633", transform=from_origin(500000, 4100000, 10, 10)) as d:
        d.write(arr)


def colour_mask(fg, color, rng=None, soft=False):
    """(3, H, W) colour mask of boolean fg; soft: anti-aliased edge pixels at random fractions."""
    frac = fg.astype(np.float32)
    if soft:
        edge = np.zeros_like(fg)
        edge[1:] |= fg[1:] != fg[:-1]
        edge[:, 1:] |= fg[:, 1:] != fg[:, :-1]
        frac[edge] = rng.uniform(0.05, 0.95, int(edge.sum()))
    return (frac[None] * np.asarray(color, np.float32).reshape(3, 1, 1)).round().astype(np.uint8), frac


def random_fg(rng, h=40, w=50):
    yy, xx = np.mgrid[0:h, 0:w]
    return (yy - rng.uniform(10, 30)) ** 2 + (xx - rng.uniform(10, 40)) ** 2 < rng.uniform(40, 150)


@pytest.mark.parametrize("color", [(255, 255, 0), (255, 0, 0), (255, 0, 255), (200, 128, 0)])
def test_colour_mask_auto_and_given(color):
    rng = np.random.default_rng(1)
    fg = random_fg(rng)
    m, _ = colour_mask(fg, color)
    np.testing.assert_array_equal(decode_mask(m), fg.astype(np.uint8))
    np.testing.assert_array_equal(decode_mask(m, MaskEncoding(color=color)), fg.astype(np.uint8))


def test_soft_edges_thresholded_halfway():
    rng = np.random.default_rng(2)
    fg = random_fg(rng)
    m, frac = colour_mask(fg, (200, 128, 0), rng, soft=True)
    got = decode_mask(m, MaskEncoding(color=(200, 128, 0)))
    # projection on the colour vs the stored fraction (rounding moves it by < 1/128)
    clear = np.abs(frac - 0.5) > 0.02
    np.testing.assert_array_equal(got[clear], (frac[clear] >= 0.5).astype(np.uint8))
    assert decode_mask(m).sum() == got.sum()  # auto-detection finds the pure colour
    # a threshold in pixel units (like the dataset note's max > 100) also works
    lo = decode_mask(m, MaskEncoding(color=(200, 128, 0), threshold=100))
    assert got.sum() <= lo.sum()


def test_unknown_colour_encoding_names_file(tmp_path):
    m = np.zeros((3, 20, 20), np.uint8)
    m[:, :5] = np.array([255, 0, 0]).reshape(3, 1, 1)
    m[:, 10:15] = np.array([0, 0, 255]).reshape(3, 1, 1)
    p = tmp_path / "classes.png"
    write_png(p, m)
    with pytest.raises(DataError, match="classes.png.*unknown mask encoding"):
        read_mask(p)


def test_single_band_encodings(tmp_path):
    rng = np.random.default_rng(3)
    fg = random_fg(rng)
    np.testing.assert_array_equal(decode_mask(fg.astype(np.uint8)), fg)
    np.testing.assert_array_equal(decode_mask(fg.astype(np.uint8) * 255), fg)
    multi = fg.astype(np.uint8) * 3
    multi[0, 0] = 7
    p = tmp_path / "weird.png"
    write_png(p, multi)
    with pytest.raises(DataError, match="weird.png.*unknown mask encoding"):
        read_mask(p)
    np.testing.assert_array_equal(read_mask(p, MaskEncoding(threshold=2))[1:], fg[1:])
    ign = decode_mask(multi, MaskEncoding(threshold=2, ignore_values=(7,)))
    assert ign[0, 0] == IGNORE_INDEX


def test_geotiff_nodata_and_bands(tmp_path):
    rng = np.random.default_rng(4)
    img = rng.integers(1, 4000, (5, 30, 40)).astype(np.uint16)
    img[:, :3, :] = 0
    img[2, 10, 10] = 0  # nodata in one band only: the pixel is invalid
    write_tif(tmp_path / "s.tif", img, nodata=0)
    arr, valid = read_image(tmp_path / "s.tif")
    assert arr.dtype == np.uint16 and arr.shape == (5, 30, 40)
    assert not valid[:3].any() and not valid[10, 10] and valid[3:].sum() == 27 * 40 - 1
    sel, _ = read_image(tmp_path / "s.tif", bands=[3, 1])
    np.testing.assert_array_equal(sel, img[[2, 0]])
    with pytest.raises(DataError, match="s.tif.*band"):
        read_image(tmp_path / "s.tif", bands=[6])
    assert raster_shape(tmp_path / "s.tif") == (5, 30, 40)


def test_nan_without_nodata_is_an_error_nan_nodata_is_masked(tmp_path):
    img = np.random.default_rng(5).random((2, 16, 16)).astype(np.float32)
    img[0, 4, 4] = np.nan
    write_tif(tmp_path / "bad.tif", img)
    with pytest.raises(DataError, match="bad.tif.*NaN"):
        read_image(tmp_path / "bad.tif")
    write_tif(tmp_path / "ok.tif", img, nodata=float("nan"))
    _, valid = read_image(tmp_path / "ok.tif")
    assert not valid[4, 4] and valid.sum() == 255


def test_geotiff_pair_nodata_excluded_from_target(tmp_path):
    rng = np.random.default_rng(6)
    img = rng.integers(1, 255, (4, 32, 32)).astype(np.uint16)
    img[:, :, :4] = 0
    mask = random_fg(rng, 32, 32).astype(np.uint8)
    write_tif(tmp_path / "images" / "t1.tif", img, nodata=0)
    write_tif(tmp_path / "masks" / "t1.tif", mask)
    ds = SegmentationDataset(find_pairs(tmp_path))
    item = ds[0]
    assert ds.in_channels == 4 and item["image"].shape == (4, 32, 32)
    t = item["target"].numpy()
    assert (t[:, :4] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(t[:, 4:], mask[:, 4:])
    assert (item["image"][:, :, :4] == 0).all()


def test_landslide4sense_h5_patches(tmp_path):
    h5py = pytest.importorskip("h5py")
    rng = np.random.default_rng(7)
    (tmp_path / "img").mkdir()
    (tmp_path / "mask").mkdir()
    imgs, masks = [], []
    for i in (1, 2, 10):
        img = rng.normal(1.0, 0.5, (128, 128, 14)).astype(np.float64)
        mask = (rng.random((128, 128)) < 0.1).astype(np.uint8)
        with h5py.File(tmp_path / "img" / f"image_{i}.h5", "w") as f:
            f["img"] = img
        with h5py.File(tmp_path / "mask" / f"mask_{i}.h5", "w") as f:
            f["mask"] = mask
        imgs.append(img)
        masks.append(mask)
    pairs = find_pairs(tmp_path)
    assert [(p.image.name, p.mask.name) for p in pairs] == [
        ("image_1.h5", "mask_1.h5"), ("image_10.h5", "mask_10.h5"), ("image_2.h5", "mask_2.h5")]
    ds = SegmentationDataset(pairs)
    assert ds.in_channels == 14
    raw, tgt = ds.raw(0)
    np.testing.assert_array_equal(raw, imgs[0].transpose(2, 0, 1))
    np.testing.assert_array_equal(tgt, masks[0])
    assert ds[1]["image"].shape == (14, 128, 128)
    with h5py.File(tmp_path / "img" / "image_1.h5", "w") as f:
        f["other"] = np.zeros(3)
    with pytest.raises(DataError, match="image_1.h5.*keys"):
        read_image(tmp_path / "img" / "image_1.h5")


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="nope.png.*not found"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "junk.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="junk.png"):
        read_image(tmp_path / "junk.png")
