"""Sliding-window geometry and blending weights for seamless tiled prediction.

A raster of ``size`` pixels along one axis is covered by windows of ``tile`` pixels that start every
``tile - overlap`` pixels; the last window is clamped inside the raster (it starts at
``size - tile``), and a raster smaller than one window gets a single window of its own size.

Each window's prediction is weighted by a separable 2-D profile and the weighted sum is divided by
the summed weights (so any overlap pattern, including the irregular one the clamped last window
makes, is normalised exactly). Along an axis the profile is

* ``1`` on a side that touches the raster border (nothing else covers those pixels);
* on an inner side, over the ``overlap`` pixels shared with the neighbour: ``0`` for the first
  ``margin`` pixels (the window's own edge, where zero padding corrupts the prediction), then a
  raised-cosine (Hann half-window, ``sin²``) ramp, then ``1``.

Two neighbours at the regular stride therefore have ramps that sum to exactly 1 (``sin² + cos²``)
and a pixel never takes any weight from a window it is within ``margin`` pixels of the inner
edge of. For a model whose receptive field radius is at most ``margin`` the blended result equals a
single pass over the whole raster, exactly (tests check this); for deeper models the seams are
smoothed away.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["window_starts", "axis_weights", "TileGrid", "default_margin"]


def default_margin(overlap: int) -> int:
    """The zero-weight margin used when none is given: a quarter of the overlap."""
    return max(0, overlap // 4)


def window_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the windows covering ``size`` pixels.

    Args:
        size: raster extent along the axis (pixels, >= 1).
        tile: window extent (>= 1). A raster smaller than ``tile`` gets one window of ``size``.
        overlap: pixels shared by neighbouring windows (0 <= overlap < tile).

    Returns:
        Sorted start offsets; the last window ends exactly at ``size``.

    Example:
        >>> window_starts(10, 4, 1)
        [0, 3, 6]
        >>> window_starts(11, 4, 1)
        [0, 3, 6, 7]
        >>> window_starts(3, 4, 1)
        [0]
    """
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if tile < 1:
        raise ValueError(f"tile must be >= 1, got {tile}")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile + 1, stride))
    if starts[-1] + tile < size:
        starts.append(size - tile)
    return starts


def _ramp(length: int, margin: int) -> np.ndarray:
    """Rising profile over ``length`` pixels: ``margin`` zeros, a sin² ramp, ``margin`` ones."""
    r = length - 2 * margin
    out = np.ones(length, dtype=np.float64)
    out[:margin] = 0.0
    if r > 0:
        i = np.arange(r, dtype=np.float64)
        out[margin : margin + r] = np.sin(0.5 * math.pi * (i + 0.5) / r) ** 2
    return out


def axis_weights(
    start: int, extent: int, size: int, overlap: int, margin: int
) -> np.ndarray:
    """1-D blending profile of one window along one axis.

    Args:
        start: window start offset.
        extent: window extent (pixels).
        size: raster extent along the axis.
        overlap: overlap between neighbouring windows.
        margin: zero-weight pixels at each inner edge (``2 * margin <= overlap``).

    Returns:
        float64 array of shape ``(extent,)``, values in [0, 1].
    """
    w = np.ones(extent, dtype=np.float64)
    if overlap <= 0 or extent >= size:
        return w
    n = min(overlap, extent)
    ramp = _ramp(n, min(margin, n // 2))
    if start > 0:
        w[:n] *= ramp
    if start + extent < size:
        w[extent - n :] *= ramp[::-1]
    return w


class TileGrid:
    """The windows covering a ``height × width`` raster and their blending weights.

    Args:
        height, width: raster size in pixels.
        tile: window size (square; clamped to the raster size along each axis).
        overlap: pixels shared by neighbouring windows (``0 <= overlap < tile``).
        margin: zero-weight pixels at each inner window edge; default ``overlap // 4``.
            Must satisfy ``2 * margin <= overlap`` and ``margin <= tile - overlap``.

    Attributes:
        tile_h, tile_w: the window size actually used (every window has this size).
        rows, cols: window start offsets along y and x.

    Example:
        >>> g = TileGrid(100, 70, tile=64, overlap=16)
        >>> g.tile_h, g.tile_w, g.rows, g.cols, len(g)
        (64, 64, [0, 36], [0, 6], 4)
    """

    def __init__(self, height: int, width: int, tile: int, overlap: int, margin: int | None = None):
        if tile < 1:
            raise ValueError(f"tile must be >= 1, got {tile}")
        if not 0 <= overlap < tile:
            raise ValueError(f"overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
        if margin is None:
            margin = min(default_margin(overlap), tile - overlap)
        if margin < 0 or 2 * margin > overlap:
            raise ValueError(f"margin must be in [0, overlap/2], got margin={margin}, overlap={overlap}")
        if margin > tile - overlap:
            raise ValueError(
                f"margin ({margin}) must not exceed the stride tile - overlap ({tile - overlap})"
            )
        self.height, self.width = int(height), int(width)
        self.tile, self.overlap, self.margin = int(tile), int(overlap), int(margin)
        self.tile_h = min(self.tile, self.height)
        self.tile_w = min(self.tile, self.width)
        self.rows = window_starts(self.height, self.tile, self.overlap)
        self.cols = window_starts(self.width, self.tile, self.overlap)
        self._wy = {y: axis_weights(y, self.tile_h, self.height, self.overlap, self.margin) for y in self.rows}
        self._wx = {x: axis_weights(x, self.tile_w, self.width, self.overlap, self.margin) for x in self.cols}

    def __len__(self) -> int:
        return len(self.rows) * len(self.cols)

    def weights(self, row: int, col: int) -> np.ndarray:
        """Blending weights of the window starting at ``(row, col)``: float32 ``(tile_h, tile_w)``."""
        return np.outer(self._wy[row], self._wx[col]).astype(np.float32)

    def coverage(self) -> np.ndarray:
        """Summed weights over the whole raster, float64 ``(height, width)`` (for checks; O(H·W))."""
        sy = np.zeros(self.height)
        sx = np.zeros(self.width)
        for y in self.rows:
            sy[y : y + self.tile_h] += self._wy[y]
        for x in self.cols:
            sx[x : x + self.tile_w] += self._wx[x]
        return np.outer(sy, sx)
