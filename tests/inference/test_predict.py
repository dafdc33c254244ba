"""Whole-scene prediction: seamless tiling, georeferenced outputs, nodata, atomic writes."""
import os
import tracemalloc
import warnings

import numpy as np
import pytest
import rasterio
import torch
import torch.nn.functional as F

from conftest import (
    NORM3,
    ConstantModel,
    LocalConvModel,
    PixelModel,
    TileRampModel,
    smooth_bands,
    write_tif,
)
from msff.inference import (
    InferenceError,
    NotGeoreferencedInputWarning,
    Predictor,
    load_predictor,
    predict_array,
    predict_scene,
)
from msff.inference.writers import MASK_NODATA, UINT8_SCALE


def single_pass(model, x, norm=NORM3, output="logits"):
    """Reference: the whole raster through the model at once."""
    xn = (x.astype(np.float32) - np.float32(norm["mean"])[:, None, None]) / np.float32(norm["std"])[:, None, None]
    with torch.no_grad():
        y = model(torch.from_numpy(xn)[None])[0, 0]
    return (torch.sigmoid(y) if output == "logits" else y).numpy()


def no_leftovers(folder):
    return [f for f in os.listdir(folder) if f.startswith(".")]


# ---- tiling equals a single pass ------------------------------------------------------------------
@pytest.mark.parametrize("h,w,tile,overlap", [(147, 203, 64, 16), (64, 64, 64, 8), (33, 200, 48, 12), (17, 9, 64, 16), (100, 101, 32, 24)])
def test_pixel_model_tiled_equals_single_pass_everywhere(h, w, tile, overlap):
    x = smooth_bands(3, h, w)
    m = PixelModel().eval()
    got = predict_array(m, x, normalization=NORM3, tile=tile, overlap=overlap, batch_size=3)
    np.testing.assert_allclose(got, single_pass(m, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("h,w", [(150, 211), (97, 64), (61, 300)])
def test_local_model_tiled_equals_single_pass_when_margin_covers_receptive_field(h, w):
    x = smooth_bands(3, h, w)
    m = LocalConvModel().eval()
    ref = single_pass(m, x)
    got = predict_array(m, x, normalization=NORM3, tile=48, overlap=16, margin=m.radius)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    # without the zero margin, inner tile edges (zero padding) leak in: the margin is what makes it exact
    leaky = predict_array(m, x, normalization=NORM3, tile=48, overlap=16, margin=0)
    assert np.abs(leaky - ref).max() > 1e-4


def test_msffnet_tiled_close_to_single_pass_away_from_border():
    from msff import MSFFNet

    m = MSFFNet(in_channels=3, width_multiplier=0.0625, lkam_blocks=1, kernel_size=3).eval()
    with torch.no_grad():  # spread the random model's outputs so the comparison means something
        m.head.weight.mul_(30)
        m.head.bias.zero_()
    x = smooth_bands(3, 150, 197)
    ref = predict_array(m, x, normalization=NORM3, tile=4096, overlap=0)
    got = predict_array(m, x, normalization=NORM3, tile=96, overlap=48, batch_size=4)
    b = 16
    d = np.abs(got - ref)[b:-b, b:-b]
    spread = ref[b:-b, b:-b].std()
    assert spread > 1e-3
    assert d.mean() < 0.05 * spread, (d.mean(), spread)
    assert np.corrcoef(got[b:-b, b:-b].ravel(), ref[b:-b, b:-b].ravel())[0, 1] > 0.99


# ---- no seams ---------------------------------------------------------------------------------------
def test_constant_model_gives_constant_output_without_seams():
    x = smooth_bands(3, 130, 170)
    got = predict_array(ConstantModel(logit=0.7), x, normalization=NORM3, tile=40, overlap=12)
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-0.7)), rtol=0, atol=1e-6)


def test_blending_removes_seams_of_a_tile_dependent_model():
    x = smooth_bands(3, 40, 300)
    p = Predictor(TileRampModel(), mean=NORM3["mean"], std=NORM3["std"], output="probabilities")
    tile, overlap = 64, 32
    got = predict_array(p, x, tile=tile, overlap=overlap)
    # hard stitching would jump by ~overlap/tile = 0.5 at every window boundary
    jump = np.abs(np.diff(got, axis=1)).max()
    assert jump < 0.1, jump


# ---- GeoTIFF outputs ---------------------------------------------------------------------------------
def test_geotiff_outputs_roundtrip_grid_nodata_and_cog(tmp_path, scene):
    path, x = scene
    m = PixelModel().eval()
    r = predict_scene(m, path, tmp_path / "p.tif", tmp_path / "m.tif", normalization=NORM3, tile=64, overlap=16, progress=False)
    with rasterio.open(path) as src:
        crs, transform = src.crs, src.transform
    ref = single_pass(m, x)
    invalid = np.all(x == 0, axis=0) | np.any(x == 0, axis=0)
    for f, dtype in ((r.prob, "float32"), (r.mask, "uint8")):
        with rasterio.open(f) as ds:
            assert ds.crs == crs and ds.transform == transform
            assert (ds.width, ds.height, ds.count, ds.dtypes[0]) == (203, 147, 1, dtype)
            assert ds.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
            assert ds.profile["tiled"] and ds.compression.name.lower() == "deflate"
            band = ds.read(1)
    with rasterio.open(r.prob) as ds:
        assert np.isnan(ds.nodata)
        prob = ds.read(1)
        assert ds.tags()["msff_tile"] == "64"
    with rasterio.open(r.mask) as ds:
        assert ds.nodata == MASK_NODATA
        mask = ds.read(1)
    assert np.isnan(prob[invalid]).all() and np.all(mask[invalid] == MASK_NODATA)
    ok = ~invalid
    np.testing.assert_allclose(prob[ok], ref[ok], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(mask[ok], (ref[ok] >= 0.5).astype(np.uint8))
    assert r.valid_pixels == ok.sum() and r.landslide_pixels == (mask == 1).sum()
    assert band.shape == (147, 203)
    assert no_leftovers(tmp_path) == []


def test_uint8_probabilities_are_scaled(tmp_path, scene):
    path, _ = scene
    m = PixelModel().eval()
    kw = dict(normalization=NORM3, tile=64, overlap=16, progress=False)
    r8 = predict_scene(m, path, tmp_path / "p8.tif", prob_dtype="uint8", **kw)
    r32 = predict_scene(m, path, tmp_path / "p32.tif", **kw)
    with rasterio.open(r8.prob) as ds:
        assert ds.dtypes[0] == "uint8" and ds.nodata == 255
        assert ds.scales[0] == pytest.approx(UINT8_SCALE)
        q = ds.read(1)
    with rasterio.open(r32.prob) as ds:
        p = ds.read(1)
    nod = q == 255
    np.testing.assert_array_equal(nod, np.isnan(p))
    assert q[~nod].max() <= 250
    np.testing.assert_allclose(q[~nod] * UINT8_SCALE, p[~nod], atol=0.5 * UINT8_SCALE + 1e-6)


def test_nodata_from_internal_mask_and_override(tmp_path):
    x = smooth_bands(3, 90, 70)
    valid = np.ones((90, 70), bool)
    valid[40:60, 10:30] = False
    path = write_tif(tmp_path / "masked.tif", x, mask=valid)
    r = predict_scene(PixelModel(), path, None, tmp_path / "m.tif", normalization=NORM3, tile=32, overlap=8, progress=False)
    with rasterio.open(r.mask) as ds:
        m = ds.read(1)
    np.testing.assert_array_equal(m == MASK_NODATA, ~valid)
    # --nodata: a value that occurs in the data makes those pixels nodata
    x2 = x.copy()
    x2[1, :5, :5] = 7
    path2 = write_tif(tmp_path / "plain.tif", x2)
    r2 = predict_scene(PixelModel(), path2, None, tmp_path / "m2.tif", normalization=NORM3, nodata=7, progress=False)
    with rasterio.open(r2.mask) as ds:
        m2 = ds.read(1)
    assert np.all(m2[:5, :5] == MASK_NODATA) and np.all(m2[5:] != MASK_NODATA)


def test_all_nodata_windows_are_skipped(tmp_path):
    x = smooth_bands(3, 128, 128)
    x[:, :64, :] = 0
    path = write_tif(tmp_path / "half.tif", x, nodata=0)
    calls = []

    class Counting(PixelModel):
        def forward(self, t):
            calls.append(t.shape[0])
            return super().forward(t)

    r = predict_scene(Counting(), path, tmp_path / "p.tif", normalization=NORM3, tile=32, overlap=0, batch_size=2, progress=False)
    assert r.tiles_skipped == 8 and r.tiles == 8 and sum(calls) == 8


def test_band_stack_equals_multiband_file(tmp_path):
    x = smooth_bands(3, 70, 90)
    multi = write_tif(tmp_path / "rgb.tif", x, nodata=0)
    singles = [write_tif(tmp_path / f"b{i}.tif", x[i], nodata=0) for i in range(3)]
    m = LocalConvModel().eval()
    a = predict_scene(m, multi, tmp_path / "a.tif", normalization=NORM3, tile=32, overlap=16, progress=False)
    b = predict_scene(m, singles, tmp_path / "b.tif", normalization=NORM3, tile=32, overlap=16, progress=False)
    with rasterio.open(a.prob) as da, rasterio.open(b.prob) as db:
        np.testing.assert_array_equal(da.read(1), db.read(1))


def test_tta_averages_the_four_flips():
    x = smooth_bands(3, 40, 56)
    m = LocalConvModel().eval()
    got = predict_array(m, x, normalization=NORM3, tile=64, overlap=8, tta=True)
    flips = [(), (2,), (1,), (1, 2)]
    want = np.mean([np.flip(single_pass(m, np.flip(x, d).copy()), [a - 1 for a in d]) if d else single_pass(m, x) for d in flips], axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.abs(got - single_pass(m, x)).max() > 1e-4  # the model is not flip-invariant


def test_memory_stays_bounded_by_tile_rows(tmp_path):
    h, w = 4000, 256
    x = smooth_bands(1, h, w)
    path = write_tif(tmp_path / "tall.tif", x)
    norm = {"mean": [2000.0], "std": [1000.0]}
    kw = dict(normalization=norm, tile=64, overlap=16, progress=False)
    predict_scene(PixelModel(1), write_tif(tmp_path / "warm.tif", x[:, :80]), tmp_path / "w.tif", **kw)  # lazy imports
    tracemalloc.start()
    try:
        predict_scene(PixelModel(1), path, tmp_path / "p.tif", tmp_path / "m.tif", **kw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    whole = h * w * 4  # one float32 copy of the scene; the sweep holds ~(tile + 16) rows
    assert peak < 0.2 * whole, (peak, whole)


class _CacheProbe(PixelModel):
    """Records GDAL's block-cache limit while the sweep runs."""

    seen: list

    def forward(self, x):
        from rasterio._env import get_gdal_config

        self.seen.append(get_gdal_config("GDAL_CACHEMAX"))
        return super().forward(x)


def test_gdal_block_cache_is_bounded_by_width_not_height(tmp_path):
    """GDAL's default cache (5 % of RAM) fills with every block read and written, so RSS grew with
    the scene (measured: +330 MB over a 100 MP sweep). During a sweep it is held to one window row's
    blocks, which depends on the width only, and the caller's setting comes back afterwards."""
    from rasterio._env import get_gdal_config

    from msff.inference.predict import GDAL_CACHE_MIN, gdal_cache_bytes

    assert gdal_cache_bytes(10_000, 3, 512) == (512 + 1024) * 10_000 * 3 * 4
    assert gdal_cache_bytes(100, 3, 64) == GDAL_CACHE_MIN
    norm = {"mean": [2000.0], "std": [1000.0]}
    before = get_gdal_config("GDAL_CACHEMAX")
    seen = {}
    with rasterio.Env(GDAL_CACHEMAX=2**30):
        for h in (100, 400):
            m = _CacheProbe(1)
            m.seen = []
            path = write_tif(tmp_path / f"s{h}.tif", smooth_bands(1, h, 2000))
            predict_scene(m, path, tmp_path / f"p{h}.tif", normalization=norm, tile=64, overlap=16, progress=False,
                          engine="nchw")
            seen[h] = set(m.seen)
            assert get_gdal_config("GDAL_CACHEMAX") == 2**30  # restored
    assert seen[100] == seen[400] == {gdal_cache_bytes(2000, 1, 64)}, seen
    assert get_gdal_config("GDAL_CACHEMAX") == before


# ---- bad input and outputs ------------------------------------------------------------------------------
def test_refuses_to_overwrite_without_flag(tmp_path, scene):
    path, _ = scene
    out = tmp_path / "p.tif"
    out.write_bytes(b"keep me")
    with pytest.raises(InferenceError, match="already exists.*overwrite"):
        predict_scene(PixelModel(), path, out, normalization=NORM3, progress=False)
    assert out.read_bytes() == b"keep me"
    predict_scene(PixelModel(), path, out, normalization=NORM3, overwrite=True, progress=False)
    with rasterio.open(out) as ds:
        assert ds.width == 203


def test_failure_mid_scene_leaves_nothing(tmp_path, scene):
    path, _ = scene

    class Boom(PixelModel):
        n = 0

        def forward(self, t):
            Boom.n += 1
            if Boom.n == 3:
                raise RuntimeError("out of memory (simulated)")
            return super().forward(t)

    before = set(os.listdir(tmp_path))
    with pytest.raises(RuntimeError, match="simulated"):
        predict_scene(Boom(), path, tmp_path / "p.tif", tmp_path / "m.tif", normalization=NORM3, tile=32, overlap=8, batch_size=1, progress=False)
    assert set(os.listdir(tmp_path)) == before


def test_band_mismatch_is_one_clear_error(tmp_path):
    path = write_tif(tmp_path / "two.tif", smooth_bands(2, 20, 20))
    with pytest.raises(InferenceError, match=r"has 2 band\(s\) but the model .* expects 3"):
        predict_scene(PixelModel(3), path, tmp_path / "p.tif", normalization=NORM3, progress=False)
    assert not (tmp_path / "p.tif").exists() and no_leftovers(tmp_path) == []


def test_files_on_different_grids_are_rejected_without_align(tmp_path):
    # (with the default align=True they are reprojected onto the first grid: tests/inference/test_stack.py)
    from rasterio.transform import from_origin

    from msff.inference.sources import RasterStack

    a = write_tif(tmp_path / "a.tif", smooth_bands(1, 20, 20))
    b = write_tif(tmp_path / "b.tif", smooth_bands(1, 20, 20), transform=from_origin(500010.0, 4700000.0, 10.0, 10.0))
    c = write_tif(tmp_path / "c.tif", smooth_bands(1, 20, 21))
    for other in (b, c):
        with pytest.raises(InferenceError, match="not on the same grid"):
            RasterStack([a, a, other], align=False)


def test_unreadable_and_missing_inputs(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00 this is not a tiff")
    with pytest.raises(InferenceError, match="bad.tif: not a readable raster"):
        predict_scene(PixelModel(), bad, tmp_path / "p.tif", normalization=NORM3, progress=False)
    with pytest.raises(InferenceError, match="file not found"):
        predict_scene(PixelModel(), tmp_path / "nope.tif", tmp_path / "p.tif", normalization=NORM3, progress=False)


def test_unwritable_output_folder_fails_before_work(tmp_path, scene):
    path, _ = scene
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(InferenceError, match="cannot create output folder|not writable"):
        predict_scene(PixelModel(), path, blocker / "sub" / "p.tif", normalization=NORM3, progress=False)


def test_ungeoreferenced_input_warns_and_still_works(tmp_path):
    x = smooth_bands(3, 50, 40)
    path = write_tif(tmp_path / "plain.tif", x, crs=None)
    with pytest.warns(NotGeoreferencedInputWarning, match="no georeferencing"):
        r = predict_scene(PixelModel(), path, tmp_path / "p.tif", tmp_path / "m.tif", normalization=NORM3, progress=False)
    assert not r.georeferenced
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with rasterio.open(r.mask) as ds:
            assert ds.crs is None and ds.shape == (50, 40)


# ---- checkpoints ----------------------------------------------------------------------------------------
def test_load_predictor_from_msffnet_checkpoint(tmp_path, tiny_ckpt, scene):
    p = load_predictor(tiny_ckpt)
    assert p.name == "tiny" and p.threshold == 0.5 and p.bands == ["B4", "B3", "B2"]
    np.testing.assert_allclose(p.mean, NORM3["mean"])
    path, _ = scene
    r = predict_scene(p, path, tmp_path / "p.tif", tmp_path / "m.tif", tile=64, overlap=32, progress=False)
    with rasterio.open(r.prob) as ds:
        prob = ds.read(1, masked=True)
    assert prob.count() == r.valid_pixels and 0 <= prob.min() and prob.max() <= 1


def test_load_predictor_errors(tmp_path):
    from msff import MSFFNet

    ck = MSFFNet(in_channels=3, width_multiplier=0.0625, lkam_blocks=1, kernel_size=3).save_pretrained(tmp_path / "nonorm")
    with pytest.raises(InferenceError, match="no 'normalization'"):
        load_predictor(ck)
    with pytest.raises(InferenceError, match="not found"):
        load_predictor(tmp_path / "missing")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"format": "something.else"}')
    with pytest.raises(InferenceError):
        load_predictor(other)


def test_softmax_two_class_models_use_class_one():
    x = smooth_bands(3, 20, 30)

    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 2, 1)

        def forward(self, t):
            return self.conv(t)

    m = Two().eval()
    got = predict_array(m, x, normalization=NORM3, tile=16, overlap=4)
    xn = torch.from_numpy((x.astype(np.float32) - 2000) / 1000)[None]
    with torch.no_grad():
        want = F.softmax(m(xn), 1)[0, 1].numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_read_error_mid_scene_propagates_and_leaves_nothing(tmp_path, scene):
    from msff.inference import RasterStack

    path, _ = scene

    class FlakyStack(RasterStack):
        calls = 0

        def read(self, window):
            FlakyStack.calls += 1
            if FlakyStack.calls == 5:
                raise InferenceError(f"{self.paths[0]}: reading window {window} failed (simulated bad block)")
            return super().read(window)

    before = set(os.listdir(tmp_path))
    with FlakyStack(path) as stack, pytest.raises(InferenceError, match="simulated bad block"):
        predict_scene(PixelModel(), stack, tmp_path / "p.tif", tmp_path / "m.tif", normalization=NORM3, tile=32, overlap=8, progress=False)
    assert set(os.listdir(tmp_path)) == before


def test_amp_on_cpu_runs_in_bfloat16_and_stays_close():
    x = smooth_bands(3, 40, 50)
    m = LocalConvModel().eval()
    full = predict_array(m, x, normalization=NORM3, tile=32, overlap=8)
    half = predict_array(m, x, normalization=NORM3, tile=32, overlap=8, amp=True)
    assert not np.array_equal(full, half)  # autocast really ran in bf16
    np.testing.assert_allclose(half, full, atol=0.05)


def test_band_indexes_select_and_reorder_bands(tmp_path):
    x = smooth_bands(5, 40, 60)
    five = write_tif(tmp_path / "five.tif", x)
    rgb = write_tif(tmp_path / "rgb.tif", x[[3, 2, 1]])
    m = PixelModel().eval()
    kw = dict(normalization=NORM3, tile=32, overlap=8, progress=False)
    a = predict_scene(m, five, tmp_path / "a.tif", band_indexes=[4, 3, 2], **kw)
    b = predict_scene(m, rgb, tmp_path / "b.tif", **kw)
    with rasterio.open(a.prob) as da, rasterio.open(b.prob) as db:
        np.testing.assert_array_equal(da.read(1), db.read(1))
    with pytest.raises(InferenceError, match="band selection"):
        predict_scene(m, five, tmp_path / "c.tif", band_indexes=[6, 1, 2], **kw)


def test_load_predictor_accepts_a_run_folder(tmp_path, tiny_ckpt):
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(tiny_ckpt, run / "best")
    assert load_predictor(run).name == "tiny"


def test_comparison_model_checkpoint_from_the_zoo(tmp_path, scene):
    zoo = pytest.importorskip("msff.models.zoo")
    m = zoo.create_model("unet", 3, width_multiplier=0.125)
    ck = zoo.save_model(m, tmp_path / "unet", {"normalization": dict(NORM3), "threshold": 0.4})
    p = load_predictor(ck)
    assert p.name == "unet" and p.threshold == 0.4 and p.in_channels == 3
    path, x = scene
    r = predict_scene(p, path, tmp_path / "p.tif", tmp_path / "m.tif", tile=64, overlap=16, progress=False)
    with rasterio.open(r.mask) as ds:
        mask = ds.read(1)
    assert r.threshold == 0.4 and np.all(mask[:20, :33] == MASK_NODATA) and set(np.unique(mask)) <= {0, 1, 255}
    with pytest.raises(InferenceError, match="expects 3"):
        predict_scene(p, write_tif(tmp_path / "one.tif", x[0]), tmp_path / "q.tif", progress=False)
