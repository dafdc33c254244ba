"""Polygons: they match the mask, areas in m² (planar and geodesic), mean probability, writers."""
import json
import math

import numpy as np
import pytest
import torch
from rasterio.crs import CRS
from rasterio.transform import from_origin

from msff.inference.vector import polygon_areas_m2, polygonize, write_polygons


def random_mask(h, w, nodata_frac=0.05):
    g = torch.nn.functional.avg_pool2d(torch.randn(1, 1, h, w), 7, 1, 3)[0, 0].numpy()
    m = (g > 0.15).astype(np.uint8)
    m[np.random.rand(h, w) < nodata_frac] = 255
    return m


def rasterize_back(polys, transform, shape):
    from rasterio import features

    return features.rasterize(((g, 1) for g in polys.geometries), out_shape=shape, transform=transform, fill=0, dtype="uint8")


@pytest.mark.parametrize("crs", ["EPSG:32654", "EPSG:4326", None])
def test_polygons_rasterize_back_to_the_mask(crs):
    h, w = 83, 121
    mask = random_mask(h, w)
    if crs == "EPSG:4326":
        transform = from_origin(141.89, 42.77, 8.983e-05, 8.983e-05)
    elif crs:
        transform = from_origin(500000, 4700000, 10, 10)
    else:
        transform = None
    polys = polygonize(mask, transform, CRS.from_string(crs) if crs else None)
    assert len(polys) > 3
    back = rasterize_back(polys, transform if transform is not None else from_origin(0, 0, 1, -1), (h, w))
    np.testing.assert_array_equal(back, (mask == 1).astype(np.uint8))
    assert polys.area_px.sum() == (mask == 1).sum()
    size = polys.area_m2 if crs else polys.area_px
    assert np.all(np.diff(size) <= 0)  # largest first


def test_planar_areas_and_mean_probability():
    mask = np.zeros((40, 50), np.uint8)
    mask[2:12, 3:23] = 1  # 200 px with a 2x2 hole
    mask[5:7, 8:10] = 0
    mask[30:33, 40:45] = 1  # 15 px
    prob = np.random.rand(40, 50).astype(np.float32)
    polys = polygonize(mask, from_origin(500000, 4700000, 10, 10), CRS.from_epsg(32654), prob)
    np.testing.assert_array_equal(polys.area_px, [196, 15])
    np.testing.assert_allclose(polys.area_m2, [19600.0, 1500.0])
    big = mask.copy()
    big[30:33, 40:45] = 0
    np.testing.assert_allclose(polys.mean_prob, [prob[big == 1].mean(), prob[30:33, 40:45].mean()], rtol=1e-6)
    assert len(polys.geometries[0]["coordinates"]) == 2  # exterior + hole


def test_geodesic_area_for_geographic_crs_matches_spherical_formula():
    lat0, d = 42.77, 8.983e-05
    mask = np.zeros((60, 60), np.uint8)
    mask[10:50, 5:45] = 1
    polys = polygonize(mask, from_origin(141.89, lat0, d, d), CRS.from_epsg(4326))
    # authalic sphere: A = R² Δλ (sin φ1 − sin φ2)
    r = 6371007.2
    top, bottom = math.radians(lat0 - 10 * d), math.radians(lat0 - 50 * d)
    want = r * r * math.radians(40 * d) * (math.sin(top) - math.sin(bottom))
    assert polys.area_m2[0] == pytest.approx(want, rel=5e-3)
    # a projected pixel is not a geographic one: ~10 m x ~7.3 m at 42.8 N
    assert polys.area_m2[0] / 1600 == pytest.approx(73.4, rel=0.01)


def test_min_area_drops_small_polygons_and_keeps_holes():
    mask = np.zeros((40, 40), np.uint8)
    mask[2:20, 2:20] = 1
    mask[9:11, 9:11] = 0  # a 4 px hole must survive the sieve
    mask[30:32, 30:32] = 1  # a 400 m² speck
    polys = polygonize(mask, from_origin(500000, 4700000, 10, 10), CRS.from_epsg(32654), min_area=1000)
    assert len(polys) == 1 and polys.area_px[0] == 18 * 18 - 4
    assert len(polys.geometries[0]["coordinates"]) == 2


def test_areas_of_projected_feet_crs_use_metres():
    sq = {"type": "Polygon", "coordinates": [[(0, 0), (100, 0), (100, 100), (0, 100), (0, 0)]]}
    ft = CRS.from_epsg(2227)  # California zone 3, US survey feet
    assert polygon_areas_m2([sq], ft)[0] == pytest.approx(1e4 * 0.3048006096**2, rel=1e-6)


def test_geojson_is_wgs84_and_gpkg_keeps_crs(tmp_path):
    pyogrio = pytest.importorskip("pyogrio")
    mask = random_mask(50, 60, 0)
    prob = np.random.rand(50, 60)
    polys = polygonize(mask, from_origin(500000, 4700000, 10, 10), CRS.from_epsg(32654), prob)
    gj = write_polygons(polys, tmp_path / "p.geojson")
    doc = json.loads(gj.read_text())
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == len(polys)
    lon, lat = np.asarray(doc["features"][0]["geometry"]["coordinates"][0]).T
    assert np.all((140 < lon) & (lon < 142)) and np.all((42 < lat) & (lat < 43))
    props = doc["features"][0]["properties"]
    assert props["area_px"] == polys.area_px[0] and props["area_m2"] == pytest.approx(polys.area_m2[0])
    gp = write_polygons(polys, tmp_path / "p.gpkg")
    info = pyogrio.read_info(gp)
    assert info["features"] == len(polys) and info["crs"] == "EPSG:32654"
    _, _, geoms, fields = pyogrio.raw.read(gp)
    np.testing.assert_allclose(fields[1], polys.area_m2)
    np.testing.assert_allclose(fields[3], polys.mean_prob)
    with pytest.raises(Exception, match="exists"):
        write_polygons(polys, tmp_path / "p.gpkg")
    with pytest.raises(Exception, match="unknown format"):
        write_polygons(polys, tmp_path / "p.shp")


def test_empty_mask_writes_empty_layers(tmp_path):
    polys = polygonize(np.zeros((10, 10), np.uint8), from_origin(0, 10, 1, 1), CRS.from_epsg(32654))
    assert len(polys) == 0
    doc = json.loads(write_polygons(polys, tmp_path / "e.geojson").read_text())
    assert doc["features"] == []


def test_gpkg_without_pyogrio_is_a_clear_error(tmp_path, monkeypatch):
    import sys

    from msff.inference import InferenceError

    monkeypatch.setitem(sys.modules, "pyogrio", None)
    monkeypatch.setitem(sys.modules, "pyogrio.raw", None)
    polys = polygonize(np.ones((4, 4), np.uint8), from_origin(0, 4, 1, 1), CRS.from_epsg(32654))
    with pytest.raises(InferenceError, match="needs the optional package pyogrio"):
        write_polygons(polys, tmp_path / "x.gpkg")
    assert list(tmp_path.iterdir()) == []
