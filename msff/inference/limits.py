"""Limits of prediction options that depend on the model: the smallest window a network can map
(its downsampling factor) and the window size below which results drift with the tile size.

Example:
    >>> from msff import MSFFNet
    >>> downsampling_factor(MSFFNet(width_multiplier=0.0625))
    16
    >>> check_tile(MSFFNet(width_multiplier=0.0625), 512) is None
    True
"""
from __future__ import annotations

import math
from typing import Optional

from torch import nn

from msff.inference.sources import InferenceError

__all__ = ["downsampling_factor", "check_tile", "check_min_area", "CONTEXT_CELLS"]

#: Windows whose deepest feature map is smaller than this many cells per side get a warning.
CONTEXT_CELLS = 8
#: Assumed deepest stride of a module that is not an msff network (VGG/ResNet encoders: five stride-2 stages).
DEFAULT_FACTOR = 32


def downsampling_factor(model: nn.Module) -> int:
    """How many input pixels one cell of the model's deepest feature map spans.

    Uses a ``downsampling_factor`` / ``output_stride`` attribute when the network has one, else
    the :attr:`~msff.models.SegmentationModel.input_multiple` every msff network declares (MSFFNet:
    16, four stride-2 max-pools); other modules are taken as 32.
    """
    m = getattr(model, "module", model)
    for attr in ("downsampling_factor", "output_stride"):
        v = getattr(m, attr, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    from msff.models.base import SegmentationModel

    if isinstance(m, SegmentationModel):
        v = m.input_multiple
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return DEFAULT_FACTOR


def check_tile(model: nn.Module, tile: int) -> Optional[str]:
    """Refuse a window smaller than the model's downsampling factor; return a warning (or None)
    when the window gives the deepest layers less than :data:`CONTEXT_CELLS` cells per side.

    Raises:
        InferenceError: ``tile`` below the downsampling factor.
    """
    f = downsampling_factor(model)
    if tile < f:
        raise InferenceError(
            f"--tile {tile} is smaller than the model's downsampling factor ({f} px): each window would "
            f"collapse to less than one cell of its deepest features; use --tile {max(f * CONTEXT_CELLS, 256)} "
            "or more (default 512)"
        )
    if tile < f * CONTEXT_CELLS:
        cells = tile / f
        return (f"--tile {tile}: the model's deepest features see only {cells:.0f}x{cells:.0f} cells of "
                f"{f} px per window (under {CONTEXT_CELLS}x{CONTEXT_CELLS}), so results change with the tile "
                f"size; use --tile {f * CONTEXT_CELLS} or more (default 512) for maps that do not depend on it")
    return None


def check_min_area(min_area: float) -> None:
    """``--min-area`` must be a finite number >= 0 (m², or pixels without a CRS)."""
    if not (isinstance(min_area, (int, float)) and math.isfinite(min_area) and min_area >= 0):
        raise InferenceError(f"--min-area must be >= 0 (m², or pixels without a CRS), got {min_area}")
