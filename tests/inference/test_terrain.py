"""Terrain bands from a DEM: slope and hillshade against analytic values on synthetic surfaces
(a plane of known slope, a cone), windowed reads with a halo equal to a whole read, and the
terrain stack in training (model card) and prediction (built from the card)."""
import math

import numpy as np
import pytest
from conftest import write_tif
from rasterio.transform import from_origin
from rasterio.windows import Window

from msff.data.terrain import DemOnGrid, check_terrain, hillshade, slope

X0, Y0 = 500000.0, 4700000.0


def _plane(h, w, px, gx, gy):
    """z rising gx m/m eastwards and gy m/m northwards (rows go south)."""
    cols, rows = np.meshgrid(np.arange(w) * px, np.arange(h) * px)
    return gx * cols - gy * rows + 100.0


@pytest.mark.parametrize("deg", [5.0, 30.0, 60.0])
def test_plane_slope_and_hillshade_match_analytic(deg):
    k = math.tan(math.radians(deg))
    z = _plane(12, 14, 10.0, k * 0.6, k * 0.8)  # gradient magnitude k, pointing ENE-ish
    s = slope(z, 10.0, 10.0)
    np.testing.assert_allclose(s, deg, atol=1e-4)
    gx, gy = k * 0.6, k * 0.8
    az, alt = math.radians(315), math.radians(45)
    want = 255 * max(0.0, (-gx * math.sin(az) * math.cos(alt) - gy * math.cos(az) * math.cos(alt) + math.sin(alt))
                     / math.sqrt(1 + k * k))
    np.testing.assert_allclose(hillshade(z, 10.0, 10.0), want, atol=1e-3)


def test_flat_hillshade_is_sin_altitude_and_facing_the_sun_is_brighter():
    flat = np.zeros((5, 5))
    np.testing.assert_allclose(hillshade(flat, 10, 10), 255 * math.sin(math.radians(45)), atol=1e-4)
    # a slope facing north-west (towards the 315° sun) is brighter than one facing south-east
    nw = _plane(5, 5, 10.0, 0.5, -0.5)  # rises to the south-east: faces (descends towards) the north-west
    se = _plane(5, 5, 10.0, -0.5, 0.5)
    assert hillshade(nw, 10, 10).mean() > hillshade(flat, 10, 10).mean() > hillshade(se, 10, 10).mean()


def test_cone_has_its_slope_everywhere_but_the_apex():
    theta = 25.0
    n, px = 61, 5.0
    c = np.arange(n) - n // 2
    r = np.hypot(*np.meshgrid(c * px, c * px))
    z = 500.0 - r * math.tan(math.radians(theta))
    s = slope(z, px, px)  # (n-2, n-2), centre at (n//2 - 1)
    rr = r[1:-1, 1:-1]
    ring = (rr > 3 * px) & (rr < 25 * px)
    # Horn's 3x3 gradient on a cone is exact up to the curvature of the level lines
    assert np.abs(s[ring] - theta).max() < 0.6
    assert np.abs(np.median(s[ring]) - theta) < 0.05


def test_geographic_pixels_are_converted_to_metres(tmp_path):
    # a plane rising 0.2 m per metre eastwards, sampled on an EPSG:4326 grid at 42.7 N
    lat0, d = 42.77, 9e-5
    h, w = 30, 40
    m_lon = 111412.84 * math.cos(math.radians(lat0 - h * d / 2)) - 93.5 * math.cos(3 * math.radians(lat0 - h * d / 2))
    cols = np.arange(w) * d * m_lon
    z = np.tile(0.2 * cols, (h, 1)).astype(np.float32)
    dem = write_tif(tmp_path / "dem.tif", z, crs="EPSG:4326", transform=from_origin(141.9, lat0, d, d), nodata=-9999)
    with DemOnGrid(dem, __import__("rasterio").crs.CRS.from_epsg(4326), from_origin(141.9, lat0, d, d), w, h, ["slope"]) as g:
        s = g.read(0, 0, w, h)[0]
    inner = s[2:-2, 2:-2]
    np.testing.assert_allclose(inner, math.degrees(math.atan(0.2)), atol=0.05)
    assert np.isnan(s[:, 0]).all() and np.isnan(s[0, :]).all()  # halo beyond the DEM: nodata


def _dem_30m(tmp_path, h=30, w=30):
    z = _plane(h, w, 30.0, 0.3, 0.1).astype(np.float32)
    return write_tif(tmp_path / "dem30.tif", z, transform=from_origin(X0 - 60, Y0 + 60, 30, 30), nodata=-9999)


def test_windowed_terrain_equals_whole_and_stack_appends_it(tmp_path):
    from msff.inference.sources import RasterStack

    img = write_tif(tmp_path / "b.tif", np.full((2, 70, 80), 500, np.uint16), transform=from_origin(X0, Y0, 10, 10))
    dem = _dem_30m(tmp_path)
    with RasterStack([img], dem=dem, terrain=["slope", "hillshade"]) as st:
        assert st.count == 4 and st.dtypes[2:] == ["float32", "float32"]
        assert st.descriptions[2:] == ["slope(dem30.tif)", "hillshade(dem30.tif)"]
        whole, v = st.read(Window(0, 0, 80, 70))
        part, _ = st.read(Window(33, 17, 25, 31))
    assert v.all()
    np.testing.assert_allclose(part, whole[:, 17:48, 33:58], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(whole[2], math.degrees(math.atan(math.hypot(0.3, 0.1))), atol=0.01)


def test_terrain_in_training_card_and_prediction(tmp_path, capsys):
    import rasterio

    from msff import MSFFNet
    from msff.data import SegmentationDataset, compute_normalization, find_pairs
    from msff.inference import load_predictor, predict_scene
    from msff.inference.sources import InferenceError

    dem = _dem_30m(tmp_path)
    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "masks").mkdir()
    for i in range(2):
        tr = from_origin(X0 + 100 * i, Y0 - 50 * i, 10, 10)
        write_tif(tmp_path / "d" / "images" / f"t{i}.tif", np.full((3, 32, 32), 40 + i, np.uint8), transform=tr)
        m = np.zeros((32, 32), np.uint8)
        m[5:9, 5:9] = 1
        write_tif(tmp_path / "d" / "masks" / f"t{i}.tif", m, transform=tr)
    ds = SegmentationDataset(find_pairs(tmp_path / "d"), dem=dem, terrain=["slope"])
    assert ds.in_channels == 4 and ds.band_dtypes == ["uint8"] * 3 + ["float32"]
    item = ds.raw(0)[0]
    np.testing.assert_allclose(item[3], math.degrees(math.atan(math.hypot(0.3, 0.1))), atol=0.01)
    card = {"normalization": compute_normalization(ds), "model_name": "terr", **ds.model_card()}
    assert card["stack"]["terrain"] == ["slope"] and card["domain"]["bands"][3]["dtype"] == "float32"
    ck = MSFFNet(in_channels=4, width_multiplier=0.0625, lkam_blocks=1, kernel_size=3).save_pretrained(
        tmp_path / "ck", metadata=card)
    p = load_predictor(ck)
    scene = write_tif(tmp_path / "scene.tif", np.full((3, 50, 60), 41, np.uint8), transform=from_origin(X0, Y0, 10, 10))
    with pytest.raises(InferenceError, match=r"need a DEM \(--dem"):
        predict_scene(p, scene, tmp_path / "p.tif", progress=False)
    with pytest.raises(InferenceError, match=r"trained with terrain bands \[slope\].*--terrain slope"):
        predict_scene(p, scene, tmp_path / "p.tif", progress=False, dem=dem, terrain=["hillshade"])
    r = predict_scene(p, scene, tmp_path / "p.tif", progress=False, dem=dem, tile=32, overlap=8, domain_check="off")
    with rasterio.open(r.prob) as o, rasterio.open(scene) as s:
        assert (o.crs, o.transform, o.shape) == (s.crs, s.transform, s.shape)


def test_unknown_terrain_band_and_missing_dem_are_clear(tmp_path):
    from msff.data import DataError, SegmentationDataset

    with pytest.raises(ValueError, match="unknown terrain band 'aspect'"):
        check_terrain(["slope", "aspect"])
    with pytest.raises(DataError, match="need a DEM raster"):
        SegmentationDataset([object()], terrain=["slope"])  # checked before any file is read
