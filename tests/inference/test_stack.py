"""Bands from different grids stacked onto one reference grid (WarpedVRT, windowed): a known
pattern lands where it should within half a pixel for a 10 m + 30 m + other-CRS stack."""
import numpy as np
import pytest
from conftest import PixelModel, write_tif
from rasterio.transform import from_origin
from rasterio.windows import Window

from msff.inference import predict_scene
from msff.inference.sources import InferenceError, RasterStack

X0, Y0 = 500000.0, 4700000.0  # UTM 54N origin of the 10 m reference grid
SQUARE = (X0 + 300.0, X0 + 500.0, Y0 - 450.0, Y0 - 250.0)  # x0, x1, y0, y1 in metres


def _inside(x, y):
    x0, x1, y0, y1 = SQUARE
    return ((x >= x0) & (x < x1) & (y >= y0) & (y < y1)).astype(np.float32)


def _grid(path, crs, transform, h, w, nodata=None):
    """Rasterise the square (in UTM metres) onto a grid by its pixel centres."""
    from rasterio.warp import transform as warp

    cols, rows = np.meshgrid(np.arange(w) + 0.5, np.arange(h) + 0.5)
    xs, ys = transform * (cols.ravel(), rows.ravel())
    if crs != "EPSG:32654":
        xs, ys = warp(crs, "EPSG:32654", xs, ys)
    data = _inside(np.asarray(xs), np.asarray(ys)).reshape(h, w) * 100 + 1
    return write_tif(path, data.astype(np.float32), crs=crs, transform=transform, nodata=nodata)


def _centroid(a):
    r, c = np.nonzero(a > 50)
    return r.mean(), c.mean()


def test_10m_30m_and_other_crs_align_within_half_a_pixel(tmp_path):
    from rasterio.warp import transform_bounds

    ref = _grid(tmp_path / "b10.tif", "EPSG:32654", from_origin(X0, Y0, 10, 10), 80, 90)
    coarse = _grid(tmp_path / "dem30.tif", "EPSG:32654", from_origin(X0 - 60, Y0 + 60, 30, 30), 36, 38)
    left, bottom, right, top = transform_bounds("EPSG:32654", "EPSG:4326", X0 - 100, Y0 - 1000, X0 + 1100, Y0 + 100)
    d = 1.2e-4  # ~10 m in latitude
    geo = _grid(tmp_path / "geo.tif", "EPSG:4326", from_origin(left, top, d, d),
                int((top - bottom) / d), int((right - left) / d))
    with RasterStack([ref, coarse, geo]) as st:
        assert [a["file"] for a in st.aligned] == [str(coarse), str(geo)]
        assert all(a["resampling"] == "bilinear" for a in st.aligned)
        x, v = st.read(Window(0, 0, 90, 80))
        assert v.all()
        want = _centroid(x[0])
        # the square is 20 x 20 reference pixels, rows 25..44, cols 30..49
        assert want == pytest.approx((34.5, 39.5))
        for band in (1, 2):
            got = _centroid(x[band])
            assert abs(got[0] - want[0]) <= 0.5 and abs(got[1] - want[1]) <= 0.5, (band, got, want)
        # windowed reads equal the whole read
        xw, _ = st.read(Window(37, 21, 30, 40))
        np.testing.assert_allclose(xw, x[:, 21:61, 37:67], rtol=1e-6)


def test_outside_a_smaller_raster_is_nodata_and_nearest_is_honoured(tmp_path):
    ref = write_tif(tmp_path / "a.tif", np.ones((40, 40), np.float32), transform=from_origin(X0, Y0, 10, 10))
    cls = np.arange(100, dtype=np.float32).reshape(10, 10) % 3  # classes 0, 1, 2
    small = write_tif(tmp_path / "cls.tif", cls, transform=from_origin(X0, Y0, 20, 20))  # covers the top-left 20x20
    with RasterStack([ref, small], resampling=[None, "nearest"]) as st:
        x, v = st.read(Window(0, 0, 40, 40))
    assert v[:20, :20].all() and not v[20:, :].any() and not v[:, 20:].any()
    assert set(np.unique(x[1][v])) <= {0.0, 1.0, 2.0}  # nearest: no blended class values
    np.testing.assert_array_equal(x[1][:20, :20], np.kron(cls, np.ones((2, 2))))


def test_predict_on_a_mixed_grid_stack_writes_the_reference_grid(tmp_path):
    import rasterio

    ref = _grid(tmp_path / "b10.tif", "EPSG:32654", from_origin(X0, Y0, 10, 10), 64, 70)
    coarse = _grid(tmp_path / "dem30.tif", "EPSG:32654", from_origin(X0, Y0, 30, 30), 22, 24)
    norm = {"mean": [50.0, 50.0], "std": [40.0, 40.0]}
    r = predict_scene(PixelModel(2), [ref, coarse], tmp_path / "p.tif", normalization=norm, tile=32, overlap=8,
                      progress=False, domain_check="off")
    with rasterio.open(ref) as a, rasterio.open(r.prob) as b:
        assert (a.crs, a.transform, a.shape) == (b.crs, b.transform, b.shape)


def test_align_off_and_disjoint_rasters_are_refused(tmp_path):
    a = write_tif(tmp_path / "a.tif", np.ones((20, 20), np.float32), transform=from_origin(X0, Y0, 10, 10))
    b = write_tif(tmp_path / "b.tif", np.ones((20, 20), np.float32), transform=from_origin(X0 + 10, Y0, 10, 10))
    far = write_tif(tmp_path / "far.tif", np.ones((20, 20), np.float32), transform=from_origin(X0 + 1e5, Y0, 10, 10))
    with pytest.raises(InferenceError, match="not on the same grid"):
        RasterStack([a, b], align=False)
    with pytest.raises(InferenceError, match="far.tif does not overlap"):
        RasterStack([a, far])
    with pytest.raises(InferenceError, match="unknown resampling 'cubicle'"):
        RasterStack([a, b], resampling="cubicle")


def test_training_stacks_a_different_grid_raster_onto_each_image(tmp_path):
    from msff.data import SegmentationDataset, find_pairs

    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "masks").mkdir()
    for i, (ox, oy) in enumerate([(X0, Y0), (X0 + 200, Y0 - 100)]):
        tr = from_origin(ox, oy, 10, 10)
        write_tif(tmp_path / "d" / "images" / f"t{i}.tif", np.full((3, 60, 70), 50 + i, np.uint8), transform=tr)
        write_tif(tmp_path / "d" / "masks" / f"t{i}.tif", np.zeros((60, 70), np.uint8), transform=tr)
    coarse = _grid(tmp_path / "sq30.tif", "EPSG:32654", from_origin(X0 - 60, Y0 + 60, 30, 30), 40, 40)
    ds = SegmentationDataset(find_pairs(tmp_path / "d"), extra_rasters=[coarse])
    assert ds.in_channels == 4 and ds.band_dtypes == ["uint8"] * 3 + ["float32"]
    for i, (ox, oy) in enumerate([(X0, Y0), (X0 + 200, Y0 - 100)]):
        img = ds.raw(i)[0]
        # the square (UTM metres) must land on this image's own pixels, within half a pixel
        r0 = (Y0 - 250 - oy) / -10.0
        c0 = (X0 + 300 - ox) / 10.0
        got = _centroid(img[3])
        assert abs(got[0] - (r0 + 9.5)) <= 0.5 and abs(got[1] - (c0 + 9.5)) <= 0.5, (i, got)
    card = ds.model_card()
    assert card["stack"]["extra_rasters"] == ["sq30.tif"] and card["domain"]["bands"][3]["name"] == "sq30.tif:1"
