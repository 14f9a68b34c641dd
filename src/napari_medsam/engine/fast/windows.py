"""Token windows of the fused decoder: which embedding tokens a pixel region needs.

The decoder's output upscaling is local (each 256-grid logit depends on one 64-grid
token) and the final bilinear resize reads a known span of rows, so a region of the
full-size mask needs only the tokens under it. ``grow_box`` is the one rule for "the
box plus a margin" shared with the plugin's preview region.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

#: a box grown by this fraction of its size on each side ...
GROW_MARGIN = 0.25
#: ... plus this many pixels (so tiny boxes still get room)
GROW_PAD_PX = 8.0

Window = tuple[int, int, int, int]  # (ty0, ty1, tx0, tx1) in embedding tokens, ends exclusive
Region = tuple[int, int, int, int]  # (y0, y1, x0, x1) in pixels, ends exclusive


def grow_box(
    box: Sequence[float], margin: float = GROW_MARGIN, pad: float = GROW_PAD_PX
) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) grown by ``margin`` of its width / height plus ``pad`` pixels per side (ordered)."""
    x0, y0, x1, y1 = (float(v) for v in box)
    x0, x1 = min(x0, x1), max(x0, x1)
    y0, y1 = min(y0, y1), max(y0, y1)
    mx, my = (x1 - x0) * margin + pad, (y1 - y0) * margin + pad
    return x0 - mx, y0 - my, x1 + mx, y1 + my


def grown_region(
    box: Sequence[float], shape: tuple[int, int], margin: float = GROW_MARGIN, pad: float = GROW_PAD_PX
) -> Region:
    """(y0, y1, x0, x1): the pixels of :func:`grow_box`, clipped to ``shape`` (the plugin's preview region)."""
    h, w = shape
    x0, y0, x1, y1 = grow_box(box, margin, pad)
    return (
        int(max(0, np.floor(y0))),
        int(min(h, np.ceil(y1) + 1)),
        int(max(0, np.floor(x0))),
        int(min(w, np.ceil(x1) + 1)),
    )


def _source_span(n_in: int, n_out: int, start: int, stop: int) -> tuple[int, int]:
    """Rows of an ``n_in`` grid that bilinear (align_corners=False) reads for output rows [start, stop)."""
    scale = n_in / n_out

    def src(i: int) -> float:
        return max(0.0, (i + 0.5) * scale - 0.5)

    lo = min(int(np.floor(src(start))), n_in - 1)
    hi = min(int(np.floor(src(stop - 1))) + 1, n_in - 1)
    return lo, hi + 1


def _pixel_span(n_in: int, n_out: int, lo: int, hi: int) -> tuple[int, int]:
    """Output rows [y0, y1) outside which bilinear upsampling reads no input row in [lo, hi)."""
    r = n_out / n_in
    y0 = int(np.floor((lo - 0.5) * r - 0.5)) - 1
    y1 = int(np.ceil((hi + 0.5) * r - 0.5)) + 1
    return max(0, y0), min(n_out, y1)


def window_for(
    recipe: Any, resized: tuple[int, int], original: tuple[int, int], region: Region, grid: tuple[int, int]
) -> Window:
    """Token window whose upscaled logits cover the pixel ``region`` of the original image exactly."""
    nh, nw = resized
    gh, gw = grid
    s = recipe.input_size // gh  # logit pixels per token (256 / 64 = 4)
    H, W = original
    y0, y1, x0, x1 = region
    ly0, ly1 = _source_span(nh, H, y0, y1)
    lx0, lx1 = _source_span(nw, W, x0, x1)
    return ly0 // s, min(gh, -(-ly1 // s)), lx0 // s, min(gw, -(-lx1 // s))


def auto_window(
    recipe: Any, box_t: torch.Tensor, resized: tuple[int, int], grid: tuple[int, int], margin: float = GROW_MARGIN
) -> Window | None:
    """Tokens under the union of the boxes (model pixels) grown by :func:`grow_box`; None if empty."""
    gh, _ = grid
    s = recipe.input_size // gh
    nh, nw = resized
    b = box_t.detach().cpu().numpy().astype(np.float64)
    union = (b[:, [0, 2]].min(), b[:, [1, 3]].min(), b[:, [0, 2]].max(), b[:, [1, 3]].max())
    x0, y0, x1, y1 = grow_box(union, margin)
    ty0 = max(0, int(np.floor(y0 / s)))
    ty1 = min(-(-nh // s), int(np.ceil(y1 / s)) + 1)
    tx0 = max(0, int(np.floor(x0 / s)))
    tx1 = min(-(-nw // s), int(np.ceil(x1 / s)) + 1)
    if ty1 <= ty0 or tx1 <= tx0:
        return None
    return ty0, ty1, tx0, tx1


def touches_border(m: torch.Tensor, win: Window, resized: tuple[int, int], s: int) -> bool:
    """Any positive logit on a window edge that is not the edge of the unpadded image."""
    ty0, ty1, tx0, tx1 = win
    nh, nw = resized
    y0, y1, x0, x1 = ty0 * s, min(ty1 * s, nh), tx0 * s, min(tx1 * s, nw)
    inner = m[:, 0, y0:y1, x0:x1]
    edges = []
    if ty0 > 0:
        edges.append(inner[:, 0, :])
    if y1 < nh:
        edges.append(inner[:, -1, :])
    if tx0 > 0:
        edges.append(inner[:, :, 0])
    if x1 < nw:
        edges.append(inner[:, :, -1])
    return any(bool((e > 0).any()) for e in edges)


def window_pixels(win: Window, s: int, resized: tuple[int, int], original: tuple[int, int]) -> Region:
    """The region of the original image outside which a window's logits set no pixel."""
    (nh, nw), (H, W) = resized, original
    y0, y1 = _pixel_span(nh, H, win[0] * s, min(win[1] * s, nh))
    x0, x1 = _pixel_span(nw, W, win[2] * s, min(win[3] * s, nw))
    return y0, y1, x0, x1
