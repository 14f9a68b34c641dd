"""Box prompts between slices: the authors' chained box and interpolation between key boxes."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from napari_medsam.engine.errors import BoxError
from napari_medsam.engine.labels import mask_box
from napari_medsam.engine.types import Segmenter


# -- geometry -------------------------------------------------------------------
def default_margin(model: Segmenter) -> float:
    """The authors' chaining margin at model input scale: 3 px at 256, 5 px at 1024."""
    return model.recipe.chain_margin


def _model_scale(model: Segmenter, shape: tuple[int, int]) -> tuple[float, float]:
    """Image pixel -> model input pixel factors (sx, sy)."""
    return model.recipe.model_scale(shape)


def chained_box(mask: np.ndarray, margin_xy: tuple[float, float]) -> np.ndarray | None:
    """Bounding box of ``mask`` enlarged by (mx, my) image pixels, clipped to the slice."""
    b = mask_box(mask)
    if b is None:
        return None
    h, w = mask.shape
    mx, my = margin_xy
    x0, y0, x1, y1 = b
    return np.array([max(0.0, x0 - mx), max(0.0, y0 - my), min(w - 1.0, x1 + mx), min(h - 1.0, y1 + my)])


def interpolate_boxes(anchors: Mapping[int, np.ndarray], z: int) -> np.ndarray:
    """Linear interpolation of boxes given on some slices, at slice ``z`` inside their span."""
    zs = sorted(anchors)
    if z in anchors:
        return np.asarray(anchors[z], dtype=np.float64)
    if not zs[0] < z < zs[-1]:
        raise BoxError(f"slice {z} is outside the span {zs[0]}..{zs[-1]} of the given boxes")
    i = int(np.searchsorted(zs, z))
    z0, z1 = zs[i - 1], zs[i]
    t = (z - z0) / (z1 - z0)
    b0, b1 = np.asarray(anchors[z0], np.float64), np.asarray(anchors[z1], np.float64)
    return b0 + (b1 - b0) * t
