"""Window geometry and blending weights."""
import itertools

import numpy as np
import pytest

from msff.inference.tiling import TileGrid, axis_weights, window_starts


@pytest.mark.parametrize("size,tile,overlap", [(1, 8, 2), (7, 8, 2), (8, 8, 2), (9, 8, 2), (100, 32, 8), (101, 32, 8), (1000, 256, 64), (37, 5, 4)])
def test_window_starts_cover_and_clamp(size, tile, overlap):
    starts = window_starts(size, tile, overlap)
    ext = min(tile, size)
    assert starts == sorted(set(starts)) and starts[0] == 0
    assert starts[-1] + ext == size  # last window clamped inside, ending at the border
    covered = np.zeros(size, bool)
    for s in starts:
        assert 0 <= s and s + ext <= size
        covered[s : s + ext] = True
    assert covered.all()
    # regular stride except possibly the clamped last step
    steps = np.diff(starts)
    assert np.all(steps[:-1] == tile - overlap) if len(steps) > 1 else True
    assert np.all(steps <= tile - overlap)


def test_window_starts_rejects_bad_arguments():
    with pytest.raises(ValueError, match="overlap"):
        window_starts(10, 4, 4)
    with pytest.raises(ValueError, match="tile"):
        window_starts(10, 0, 0)
    with pytest.raises(ValueError, match="size"):
        window_starts(0, 4, 1)


def test_every_pixel_gets_weight_for_many_geometries():
    for size, tile, overlap in itertools.product([1, 5, 16, 33, 64, 65, 127, 300], [4, 16, 32, 64], [0, 1, 3, 8, 15, 31]):
        if overlap >= tile:
            continue
        g = TileGrid(size, size + 3, tile, overlap)
        assert (g.coverage() > 0).all(), (size, tile, overlap)


def test_regular_neighbours_sum_to_one_and_border_is_flat():
    g = TileGrid(64 * 5, 40, tile=64, overlap=16, margin=4)
    assert g.rows == [0, 48, 96, 144, 192, 240, 256]
    w0 = axis_weights(0, 64, 320, 16, 4)
    assert np.all(w0[:48] == 1.0)  # raster-border side: flat
    assert np.all(w0[-4:] == 0.0)  # inner edge: zero margin
    # interior rows away from the irregular last window are exactly partitioned
    cov = g.coverage()[:240, 0]
    np.testing.assert_allclose(cov, 1.0, atol=1e-12)


def test_single_window_when_raster_smaller_than_tile():
    g = TileGrid(30, 50, tile=64, overlap=16)
    assert (g.tile_h, g.tile_w, g.rows, g.cols) == (30, 50, [0], [0])
    assert np.all(g.weights(0, 0) == 1.0)


def test_margin_validation():
    with pytest.raises(ValueError, match="margin"):
        TileGrid(100, 100, 32, 8, margin=5)
    with pytest.raises(ValueError, match="stride"):
        TileGrid(100, 100, 32, 30, margin=3)
