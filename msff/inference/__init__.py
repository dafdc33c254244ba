"""Whole-scene landslide mapping: tiled, seamless prediction over GeoTIFFs of any size.

Example:
    >>> from msff.inference import load_predictor, predict_scene, polygonize_mask
    >>> p = load_predictor("checkpoints/msffnet")                                   # doctest: +SKIP
    >>> r = predict_scene(p, ["B4.tif", "B3.tif", "B2.tif"], "out_prob.tif", "out_mask.tif")  # doctest: +SKIP
    >>> polygonize_mask("out_mask.tif", "out_prob.tif", "slides.gpkg", min_area=500)  # doctest: +SKIP
"""
from msff.inference.predict import (
    NotGeoreferencedInputWarning,
    SceneResult,
    predict_array,
    predict_scene,
    resolve_device,
)
from msff.inference.predictor import Predictor, load_predictor
from msff.inference.quicklook import quicklook
from msff.inference.sources import InferenceError, RasterStack
from msff.inference.tiling import TileGrid, window_starts
from msff.inference.vector import Polygons, polygonize, polygonize_mask, write_polygons

__all__ = [
    "InferenceError",
    "NotGeoreferencedInputWarning",
    "Polygons",
    "Predictor",
    "RasterStack",
    "SceneResult",
    "TileGrid",
    "load_predictor",
    "predict_array",
    "polygonize",
    "polygonize_mask",
    "predict_scene",
    "quicklook",
    "resolve_device",
    "window_starts",
    "write_polygons",
]
