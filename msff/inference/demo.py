"""The mapping half of ``msff demo``: a synthetic georeferenced GeoTIFF scene mapped end to end
with a trained checkpoint (probability and mask COGs, polygons with areas, quick-look PNG and the
run's JSON sidecar), as a user maps a real scene.

Example:
    >>> paths = map_demo_scene("demo_out/best", "demo_out/map")     # doctest: +SKIP
    >>> paths["prob"], paths["polygons"]                             # doctest: +SKIP
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

__all__ = ["write_demo_scene", "map_demo_scene", "DEMO_CRS"]

#: UTM zone 54N (Hokkaido), 10 m pixels: a real projected CRS so areas come out in m².
DEMO_CRS = "EPSG:32654"
DEMO_ORIGIN = (560000.0, 4740000.0)


def write_demo_scene(path: str | os.PathLike, seed: int = 0, chip: int = 96, grid: tuple[int, int] = (3, 4),
                     border: int = 12) -> tuple[Path, np.ndarray]:
    """Write a synthetic scene: ``grid`` synthetic chips (like the training chips) side by side,
    a ``border``-pixel nodata frame (value 0, declared nodata), uint8 RGB, EPSG:32654, 10 m.

    Returns:
        ``(path, reference_mask)``: the GeoTIFF and its true landslide mask (uint8 0/1, 255 nodata).
    """
    import rasterio
    from rasterio.transform import from_origin

    from msff.data.synthetic import make_scene

    rng = np.random.default_rng([seed, 13])
    rows, cols = grid
    img = np.zeros((3, rows * chip, cols * chip), np.uint8)
    ref = np.zeros((rows * chip, cols * chip), np.uint8)
    for r in range(rows):
        for c in range(cols):
            im, m = make_scene(rng, chip)
            img[:, r * chip : (r + 1) * chip, c * chip : (c + 1) * chip] = np.maximum(im, 1)  # 0 is nodata
            ref[r * chip : (r + 1) * chip, c * chip : (c + 1) * chip] = m
    frame = np.ones(ref.shape, bool)
    frame[border:-border, border:-border] = False
    img[:, frame] = 0
    ref[frame] = 255
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = dict(driver="GTiff", width=img.shape[2], height=img.shape[1], count=3, dtype="uint8", crs=DEMO_CRS,
                   transform=from_origin(*DEMO_ORIGIN, 10.0, 10.0), nodata=0, tiled=True, blockxsize=64,
                   blockysize=64, compress="deflate")
    with rasterio.open(path, "w", **profile) as ds:
        ds.write(img)
        ds.descriptions = ("red", "green", "blue")
    return path, ref


def map_demo_scene(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, seed: int = 0, chip: int = 96,
                   device: str = "cpu", progress: bool = False) -> dict:
    """Map the synthetic scene with ``checkpoint`` into ``out_dir``.

    Returns:
        dict of paths (``scene``, ``prob``, ``mask``, ``polygons``, ``quicklook``, ``report``) and
        numbers (``polygon_count``, ``landslide_area_m2``, ``iou`` against the true mask,
        ``tiles``, ``seconds``, ``warnings``).
    """
    from msff.engine.report import atomic_write_json
    from msff.inference.predict import predict_scene
    from msff.inference.predictor import load_predictor
    from msff.inference.quicklook import quicklook
    from msff.inference.vector import polygonize_mask

    out = Path(out_dir)
    scene, ref = write_demo_scene(out / "scene.tif", seed, chip)
    pred = load_predictor(checkpoint, device=device)
    paths = {k: out / f"scene_{k}{ext}" for k, ext in
             (("prob", ".tif"), ("mask", ".tif"), ("polygons", ".geojson"), ("quicklook", ".png"), ("run", ".json"))}
    tile = 2 * chip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        r = predict_scene(pred, scene, paths["prob"], paths["mask"], tile=tile, overlap=tile // 4, batch_size=4,
                          device=device, progress=progress)
    texts = [str(w.message) for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    polys = polygonize_mask(paths["mask"], paths["prob"], paths["polygons"], min_area=200.0)
    quicklook(scene, paths["mask"], paths["quicklook"])
    import rasterio

    with rasterio.open(paths["mask"]) as ds:
        got = ds.read(1)
    v = ref != 255
    inter = int(((got == 1) & (ref == 1) & v).sum())
    union = int((((got == 1) | (ref == 1)) & v).sum())
    result = {
        "scene": str(scene), **{k: str(p) for k, p in paths.items()},
        "width": r.width, "height": r.height, "crs": r.crs, "tiles": r.tiles, "tiles_skipped": r.tiles_skipped,
        "valid_pixels": r.valid_pixels, "landslide_pixels": r.landslide_pixels,
        "polygon_count": len(polys.geometries), "landslide_area_m2": float(np.nansum(polys.area_m2)),
        "iou": inter / union if union else float("nan"), "seconds": r.seconds, "warnings": texts,
        **{k: r.extra[k] for k in ("input_scale", "domain", "landslide_fraction") if k in r.extra},
    }
    atomic_write_json(paths["run"], result)
    return result

