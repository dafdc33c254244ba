"""Landslide polygons from a predicted mask: area in m² and mean probability per polygon.

Polygons follow pixel edges (``rasterio.features.shapes``, 4-connected, holes kept). Areas are
geodesic on the CRS's ellipsoid for geographic CRSs (e.g. EPSG:4326, via ``pyproj.Geod``) and
planar in metres for projected CRSs. Output is GeoJSON (plain JSON, RFC 7946: reprojected to
WGS 84 lon/lat) or GeoPackage (needs ``pyogrio``; kept in the raster's CRS).
"""
from __future__ import annotations

import json
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from msff.inference.sources import InferenceError
from msff.inference.writers import MASK_NODATA, _unlink, atomic_replace, check_outputs, temp_path

__all__ = ["VECTOR_FORMATS", "Polygons", "polygonize", "polygonize_mask", "write_polygons", "polygon_areas_m2"]

VECTOR_FORMATS = {".geojson": "GeoJSON", ".json": "GeoJSON", ".gpkg": "GPKG"}


@dataclass
class Polygons:
    """Landslide polygons of one scene.

    Attributes:
        geometries: GeoJSON-like ``{"type": "Polygon", "coordinates": [...]}`` in the raster CRS.
        area_m2: float64 ``(n,)`` area in square metres (NaN when the raster has no CRS).
        area_px: int64 ``(n,)`` pixel count.
        mean_prob: float64 ``(n,)`` mean predicted probability inside (NaN without probabilities).
        crs: the raster CRS (``rasterio.crs.CRS`` or None).
    """

    geometries: list
    area_m2: np.ndarray
    area_px: np.ndarray
    mean_prob: np.ndarray
    crs: object = None

    def __len__(self) -> int:
        return len(self.geometries)


def _pixel_area_m2(transform, crs, height: int, width: int) -> Optional[float]:
    """Largest pixel area in m² over the scene (None without a CRS)."""
    if crs is None:
        return None
    a, b, c, d, e, f = tuple(transform)[:6]
    if crs.is_geographic:
        geod = _geod(crs)
        best = 0.0
        col = width // 2
        for row in (0, height // 2, height - 1):  # pixel area varies with latitude only
            ring = [(col, row), (col + 1, row), (col + 1, row + 1), (col, row + 1)]
            xs = [a * x + b * y + c for x, y in ring]
            ys = [d * x + e * y + f for x, y in ring]
            best = max(best, abs(geod.polygon_area_perimeter(xs, ys)[0]))
        return best
    return abs(a * e - b * d) * _unit_factor(crs) ** 2


def _geod(crs):
    import pyproj

    return pyproj.CRS.from_wkt(crs.to_wkt()).get_geod()


def _unit_factor(crs) -> float:
    try:
        return float(crs.linear_units_factor[1])
    except Exception:  # pragma: no cover - CRS without linear units
        return 1.0


def _shoelace(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def polygon_areas_m2(geometries: list, crs) -> np.ndarray:
    """Area in m² of polygons (coordinates in ``crs``): geodesic for geographic CRSs, planar
    (times the CRS unit factor squared) for projected ones; NaN when ``crs`` is None.

    Example:
        >>> from rasterio.crs import CRS
        >>> sq = {"type": "Polygon", "coordinates": [[(0, 0), (10, 0), (10, 10), (0, 10), (0, 0)]]}
        >>> float(polygon_areas_m2([sq], CRS.from_epsg(32654))[0])
        100.0
    """
    out = np.full(len(geometries), np.nan)
    if crs is None:
        return out
    geod = _geod(crs) if crs.is_geographic else None
    k2 = 1.0 if geod is not None else _unit_factor(crs) ** 2
    for i, g in enumerate(geometries):
        total = 0.0
        for j, ring in enumerate(g["coordinates"]):
            r = np.asarray(ring, dtype=np.float64)
            if geod is not None:
                a = abs(geod.polygon_area_perimeter(r[:, 0], r[:, 1])[0])
            else:
                a = abs(_shoelace(r)) * k2
            total += a if j == 0 else -a
        out[i] = total
    return out


def polygonize(
    mask: np.ndarray,
    transform=None,
    crs=None,
    prob: Optional[np.ndarray] = None,
    min_area: float = 0.0,
) -> Polygons:
    """Polygons of the ``mask == 1`` regions.

    Args:
        mask: uint8/bool ``(H, W)``: 1 landslide, 0 background, other values (nodata) ignored.
        transform: the raster's affine transform (default identity: pixel coordinates).
        crs: the raster CRS (``rasterio.crs.CRS``) or None.
        prob: float ``(H, W)`` probabilities for the per-polygon mean (NaN = no data).
        min_area: drop polygons smaller than this many m² (pixels when ``crs`` is None). Regions
            surely below it are first removed with ``rasterio.features.sieve``.

    Returns:
        :class:`Polygons`, largest first.

    Example:
        >>> import numpy as np
        >>> m = np.zeros((6, 6), np.uint8); m[1:3, 1:4] = 1
        >>> p = polygonize(m)
        >>> len(p), int(p.area_px[0])
        (1, 6)
    """
    from affine import Affine
    from rasterio import features

    transform = Affine.identity() if transform is None else transform
    fg = np.asarray(mask) == 1
    h, w = fg.shape
    if min_area > 0:
        px = _pixel_area_m2(transform, crs, h, w)
        npx = int(min_area // px) if px else int(min_area)
        if npx > 1:
            # sieve also fills small holes; AND-ing with fg keeps holes and only drops specks.
            fg &= features.sieve(fg.astype(np.uint8), size=npx, connectivity=4).astype(bool)
    fg8 = fg.astype(np.uint8)
    shapes = [g for g, val in features.shapes(fg8, mask=fg, connectivity=4) if val == 1]
    n = len(shapes)
    area_px = np.zeros(n, np.int64)
    mean_prob = np.full(n, np.nan)
    if n:
        labels = features.rasterize(
            ((g, i + 1) for i, g in enumerate(shapes)), out_shape=(h, w), dtype="int32", fill=0
        )
        counts = np.bincount(labels.ravel(), minlength=n + 1)
        area_px = counts[1:].astype(np.int64)
        if prob is not None:
            p = np.asarray(prob, dtype=np.float64)
            ok = np.isfinite(p) & (labels > 0)
            s = np.bincount(labels[ok], weights=p[ok], minlength=n + 1)[1:]
            c = np.bincount(labels[ok], minlength=n + 1)[1:]
            with np.errstate(invalid="ignore", divide="ignore"):
                mean_prob = s / c
        del labels
    a, b, c0, d, e, f = tuple(transform)[:6]
    geoms = []
    for g in shapes:
        rings = []
        for ring in g["coordinates"]:
            r = np.asarray(ring, dtype=np.float64)
            rings.append(np.stack([a * r[:, 0] + b * r[:, 1] + c0, d * r[:, 0] + e * r[:, 1] + f], axis=1).tolist())
        geoms.append({"type": "Polygon", "coordinates": rings})
    area_m2 = polygon_areas_m2(geoms, crs)
    size = area_m2 if crs is not None else area_px.astype(np.float64)
    keep = size >= min_area if min_area > 0 else np.ones(n, bool)
    order = [i for i in np.argsort(-size, kind="stable") if keep[i]]
    return Polygons(
        geometries=[geoms[i] for i in order],
        area_m2=area_m2[order],
        area_px=area_px[order],
        mean_prob=mean_prob[order],
        crs=crs,
    )


def _wkb_polygon(rings: list) -> bytes:
    parts = [struct.pack("<BII", 1, 3, len(rings))]
    for ring in rings:
        r = np.asarray(ring, dtype="<f8")
        parts.append(struct.pack("<I", len(r)))
        parts.append(r.tobytes())
    return b"".join(parts)


def _json_num(v: float):
    return None if not np.isfinite(v) else round(float(v), 6)


def write_polygons(polys: Polygons, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write polygons to GeoJSON (``.geojson``/``.json``) or GeoPackage (``.gpkg``), atomically.

    GeoJSON follows RFC 7946 (WGS 84 lon/lat): geometries are reprojected from the raster CRS.
    Without a CRS the coordinates stay in pixels and a warning says so. GeoPackage keeps the
    raster CRS and needs the optional ``pyogrio`` package.

    Properties per polygon: ``id``, ``area_m2``, ``area_px``, ``mean_prob``.

    Returns:
        The path written.
    """
    path = Path(path)
    fmt = VECTOR_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise InferenceError(f"vector output {path}: unknown format; use .geojson or .gpkg")
    check_outputs([path], overwrite=overwrite)
    if fmt == "GPKG":
        try:
            import pyogrio.raw
        except ImportError:
            raise InferenceError(
                "writing GeoPackage needs the optional package pyogrio (pip install pyogrio, or "
                "pip install msff[vector]); or write .geojson instead"
            ) from None
    tmp = temp_path(path, path.suffix)
    try:
        if fmt == "GeoJSON":
            geoms = polys.geometries
            # RFC 7946: 7 decimals of a degree is ~1 cm; keep more for pixel or projected units
            digits = 7 if polys.crs is not None else 3
            if polys.crs is not None and polys.crs.to_epsg() != 4326:
                from rasterio.warp import transform_geom

                geoms = [transform_geom(polys.crs, "EPSG:4326", g) for g in geoms]
            feats = [
                {
                    "type": "Feature",
                    "id": i + 1,
                    "properties": {
                        "id": i + 1,
                        "area_m2": _json_num(polys.area_m2[i]),
                        "area_px": int(polys.area_px[i]),
                        "mean_prob": _json_num(polys.mean_prob[i]),
                    },
                    "geometry": {"type": "Polygon", "coordinates": [np.round(np.asarray(r, dtype=np.float64), digits).tolist() for r in g["coordinates"]]},
                }
                for i, g in enumerate(geoms)
            ]
            doc = {"type": "FeatureCollection", "features": feats}
            if polys.crs is None:
                doc["msff_note"] = "no CRS: coordinates are pixel (col, row); area_m2 unknown"
            tmp.write_text(json.dumps(doc))
        else:
            _unlink(tmp)  # GDAL creates the GeoPackage itself
            n = len(polys)
            geometry = np.array([_wkb_polygon(g["coordinates"]) for g in polys.geometries], dtype=object)
            fields = ["id", "area_m2", "area_px", "mean_prob"]
            data = [
                np.arange(1, n + 1, dtype=np.int64),
                polys.area_m2.astype(np.float64),
                polys.area_px.astype(np.int64),
                polys.mean_prob.astype(np.float64),
            ]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                warnings.filterwarnings("ignore", message=".*crs.* was not provided", category=UserWarning)
                pyogrio.raw.write(
                    str(tmp),
                    geometry,
                    data,
                    fields,
                    layer="landslides",
                    driver="GPKG",
                    geometry_type="Polygon",
                    crs=None if polys.crs is None else polys.crs.to_wkt(),
                )
        atomic_replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise
    return path


def polygonize_mask(
    mask_path: str | os.PathLike,
    prob_path: Optional[str | os.PathLike],
    out_path: str | os.PathLike,
    min_area: float = 0.0,
    overwrite: bool = False,
) -> Polygons:
    """Polygonize a mask GeoTIFF written by :func:`~msff.inference.predict_scene` and write the
    polygons (see :func:`polygonize`, :func:`write_polygons`).

    The mask (1 byte/pixel) and the probabilities are read whole: this step needs about
    9 bytes of memory per pixel, unlike the prediction itself.

    Returns:
        The :class:`Polygons` written.
    """
    import rasterio

    with rasterio.open(mask_path) as ds:
        mask = ds.read(1)
        transform, crs = ds.transform, ds.crs
    mask[mask == MASK_NODATA] = 0
    prob = None
    if prob_path is not None:
        with rasterio.open(prob_path) as ds:
            prob = ds.read(1, masked=True).astype(np.float32) * np.float32(ds.scales[0]) + np.float32(ds.offsets[0])
            prob = prob.filled(np.nan)
    polys = polygonize(mask, transform, crs, prob, min_area=min_area)
    write_polygons(polys, out_path, overwrite=overwrite)
    return polys
