"""End to end on the real Sentinel-2 scene (Hokkaido Iburi): three band files, EPSG:4326, nodata 0."""
import json
import os

import numpy as np
import pytest
import rasterio

from msff.inference.cli import main

BANDS = ("B4", "B3", "B2")



def test_predict_pre_event_scene_from_three_band_files(iburi, tiny_ckpt, tmp_path, capsys):
    # the pre-event scene: ~40 % nodata (0) in a partial swath, which must stay nodata
    files = [os.path.join(iburi, "pre-event", f"download.{b}.tif") for b in BANDS]
    out = tmp_path / "iburi"
    rc = main([str(tiny_ckpt), "--bands", *files, "--out", str(out), "--tile", "512", "--overlap", "64",
               "--batch-size", "2", "--vector", "gpkg", "--min-area", "2000", "--quicklook", "--quiet"])
    assert rc == 0, capsys.readouterr().err
    with rasterio.open(files[0]) as src:
        crs, transform, shape = src.crs, src.transform, src.shape
        nodata = np.zeros(shape, bool)
    for f in files:
        with rasterio.open(f) as src:
            nodata |= src.read(1) == 0
    assert 0.2 < nodata.mean() < 0.6
    with rasterio.open(f"{out}_prob.tif") as ds:
        assert (ds.crs, ds.transform, ds.shape) == (crs, transform, shape)
        assert ds.crs.to_epsg() == 4326 and ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        prob = ds.read(1)
    with rasterio.open(f"{out}_mask.tif") as ds:
        assert (ds.crs, ds.transform, ds.shape) == (crs, transform, shape)
        mask = ds.read(1)
    np.testing.assert_array_equal(np.isnan(prob), nodata)
    np.testing.assert_array_equal(mask == 255, nodata)
    assert np.all((prob[~nodata] >= 0) & (prob[~nodata] <= 1))
    np.testing.assert_array_equal(mask[~nodata], (prob[~nodata] >= 0.5).astype(np.uint8))
    assert os.path.getsize(f"{out}_quicklook.png") > 1000
    pyogrio = pytest.importorskip("pyogrio")
    info = pyogrio.read_info(f"{out}_polygons.gpkg")
    assert info["crs"] == "EPSG:4326"
    if info["features"]:
        _, _, _, fields = pyogrio.raw.read(f"{out}_polygons.gpkg")
        area_m2, area_px = fields[1], fields[2]
        assert np.all(area_m2 >= 2000)
        # a ~10 m Sentinel-2 pixel at 42.7 N is ~7.3 m x 10 m in EPSG:4326
        np.testing.assert_allclose(area_m2 / area_px, 73.5, rtol=0.02)
    json.dumps(info, default=str)
