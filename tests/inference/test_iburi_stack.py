"""The real Iburi scene (../shared/data/iburi_s2_geotiff): Sentinel-2 RGB (10 m) + the 30 m slope
raster + slope/hillshade derived from the 30 m DSM, stacked on the 10 m grid, predicted end to
end with aligned outputs; and the domain check of an 8-bit model on it."""
import json
import os

import numpy as np
import pytest
import rasterio
import torch

from msff.inference import predict_scene
from msff.inference.predictor import Predictor

BANDS = ("B4", "B3", "B2")



def test_rgb_slope_and_dem_terrain_stack_predicts_aligned(iburi, tmp_path):
    files = [os.path.join(iburi, "post-event", f"download.{b}.tif") for b in BANDS]
    files.append(os.path.join(iburi, "slope", "download.slope.tif"))
    dem = os.path.join(iburi, "dem", "download.DSM.tif")
    torch.manual_seed(0)
    model = torch.nn.Conv2d(6, 1, 1)
    card = {"stack": {"terrain": ["slope", "hillshade"]}, "model_name": "iburi6"}
    pred = Predictor(model, mean=[800, 800, 1000, 10, 10, 180], std=[300, 200, 150, 8, 8, 40], metadata=card)
    r = predict_scene(pred, files, tmp_path / "p.tif", tmp_path / "m.tif", dem=dem, tile=512, overlap=64,
                      progress=False)
    with rasterio.open(files[0]) as s, rasterio.open(r.prob) as p, rasterio.open(r.mask) as m:
        assert (s.crs, s.transform, s.shape) == (p.crs, p.transform, p.shape) == (m.crs, m.transform, m.shape)
        prob, mask = p.read(1), m.read(1)
    assert r.extra["stack"]["aligned"][0]["file"].endswith("download.slope.tif")
    assert r.extra["stack"]["aligned"][0]["from_resolution"][0] > 2.5 * r.extra["stack"]["aligned"][0]["to_resolution"][0]
    valid = mask != 255
    assert valid.mean() > 0.95  # the terrain rasters cover the scene (a one-pixel DSM edge may be nodata)
    assert np.isfinite(prob[valid]).all() and np.isnan(prob[~valid]).all()
    # derived slope agrees with the shipped 30 m slope raster where both exist (same DSM, degrees)
    from rasterio.windows import Window

    from msff.inference.sources import RasterStack

    with RasterStack(files, dem=dem, terrain=["slope"]) as st:
        x, v = st.read(Window(300, 300, 400, 300))
    shipped, derived = x[3][v], x[4][v]
    assert np.corrcoef(shipped, derived)[0, 1] > 0.8, np.corrcoef(shipped, derived)[0, 1]
    assert abs(np.median(derived) - np.median(shipped)) < 3.0


def test_domain_check_of_an_8bit_model_on_iburi(iburi, tmp_path):
    from msff.data.domain import DomainError

    files = [os.path.join(iburi, "post-event", f"download.{b}.tif") for b in BANDS]
    card = {"model_name": "png8", "normalization": {"mean": [99.0, 108.0, 81.0], "std": [55.0, 55.0, 55.0]},
            "domain": {"bands": [{"name": n, "dtype": "uint8", "raw_min": 0.0, "raw_max": 255.0, "min": 0.0,
                                  "max": 255.0, "raw_p01": 5.0, "raw_p99": 240.0, "p01": 5.0, "p99": 240.0}
                                 for n in BANDS]}}
    pred = Predictor(torch.nn.Conv2d(3, 1, 1), mean=[99.0, 108.0, 81.0], std=[55.0] * 3, metadata=card)
    with pytest.raises(DomainError, match=r"band 1 \(download\.B4\.tif:1\): mean 7\d\d\.\d vs training 99 ± 55"):
        predict_scene(pred, files, tmp_path / "p.tif", progress=False, domain_check="strict")
    r = predict_scene(pred, files, tmp_path / "q.tif", progress=False, domain_check="warn",
                      input_scale="percentile:2,98:255")
    assert r.extra["domain"]["ok"], json.dumps(r.extra["domain"]["bands"], default=str)[:500]
