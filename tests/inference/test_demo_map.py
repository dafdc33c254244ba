"""The mapping half of ``msff demo``: a synthetic georeferenced scene (several tiles, nodata border,
EPSG:32654) mapped into COGs, polygons with areas, a quick-look and the run sidecar."""
import json

import numpy as np
import rasterio

from msff.inference.demo import map_demo_scene


def test_demo_scene_is_mapped_end_to_end(tiny_ckpt, tmp_path):
    r = map_demo_scene(tiny_ckpt, tmp_path / "map", seed=1, chip=32)
    with rasterio.open(r["scene"]) as s, rasterio.open(r["prob"]) as p, rasterio.open(r["mask"]) as m:
        assert s.crs.to_epsg() == 32654 and (s.crs, s.transform, s.shape) == (p.crs, p.transform, p.shape)
        assert p.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG" and m.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"
        mask, prob = m.read(1), p.read(1)
    assert mask.shape == (96, 128) and r["tiles"] >= 2
    assert np.all(mask[:12] == 255) and np.all(mask[:, -12:] == 255) and np.all(mask[12:-12, 12:-12] != 255)
    assert np.isnan(prob[:12]).all() and np.isfinite(prob[12:-12, 12:-12]).all()
    doc = json.loads(open(r["polygons"]).read())
    areas = [f["properties"]["area_m2"] for f in doc["features"]]
    assert len(areas) == r["polygon_count"] and all(a >= 200 for a in areas)
    np.testing.assert_allclose(sum(f["properties"]["area_px"] for f in doc["features"]) * 100.0, sum(areas), rtol=1e-6)
    side = json.loads(open(r["run"]).read())
    assert side["domain"]["pixels_sampled"] > 0 and 0 <= side["landslide_fraction"] <= 1
    assert open(r["quicklook"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
