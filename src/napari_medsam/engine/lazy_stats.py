"""The intensity rule's statistics for a slide that is never loaded whole (issue #14).

:func:`rule_for` gives the :class:`Scaling` (rule + the values mapped to 0 and 255) that
:func:`~napari_medsam.engine.intensity.convert` would use for the whole array, computed

* over all of it, when it is an in-memory numpy array (exactly ``convert``'s numbers);
* from its value counts, streamed a few storage chunks at a time, for integer data of up to
  16 bits and up to :data:`STREAM_PIXELS` pixels: exact too (min, max and numpy's linear
  percentiles are recovered from the counts), memory bounded by one chunk;
* from a sample of windows spread over the slide (:func:`sample`, each window inside one
  storage chunk) for anything else: float data, wider integers, larger slides.

8-bit data under an 8-bit rule needs no statistics and nothing is read.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ImageError
from .intensity import DEFAULT_CT_WINDOW, Intensity, WindowLike, resolve_modality

#: exact statistics by streaming value counts up to this many pixels (integer data of <= 16 bits)
STREAM_PIXELS = 1 << 28
#: sampling: a ``GRID`` x ``GRID`` grid of windows of ``TILE`` pixels on up to ``PLANES`` planes; a
#: sample that is constant or has almost no foreground is taken again on a ``DENSE`` x ``DENSE`` grid.
GRID, TILE, PLANES, DENSE = 12, 128, 4, 32
BLOCK = 1024  # streaming step along an axis without storage chunks
_MIN_POSITIVE = 1000  # pixels above 0 the percentile rule wants in a sample
_PIECE = 1 << 22  # values counted at once


@dataclass(frozen=True)
class Scaling:
    """One intensity rule with its statistics: raw values -> uint8 for any crop.

    ``low``/``high``: the values mapped to 0 and 255 (``ct``: the window clipped to the data's
    range; ``percentile``: the 0.5th/99.5th percentiles of pixels > 0; ``rgb``: min and max).
    """

    intensity: Intensity
    low: float = 0.0
    high: float = 255.0

    def apply(self, raw: Any) -> np.ndarray:
        """``raw`` (any shape) as uint8, as :func:`~napari_medsam.engine.intensity.to_uint8` maps it."""
        arr = np.asarray(raw)
        if self.intensity.rule == "uint8":
            if arr.dtype == np.uint8:
                return arr
            if not np.issubdtype(arr.dtype, np.integer) or (arr.size and (arr.min() < 0 or arr.max() > 255)):
                raise ImageError(f"image of dtype {arr.dtype} is not 8-bit here: choose modality 'ct', 'mr' or 'rgb'")
            return arr.astype(np.uint8)
        x = arr.astype(np.float64)
        if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(x).all():
            raise ImageError("image has NaN or infinite pixels: fill or mask them first")
        out = _span_255(x, self.low, self.high)
        if self.intensity.rule == "percentile":
            out[x == 0] = 0
        return out.astype(np.uint8)


def _span_255(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``x`` clipped to [lo, hi] and min-maxed to [0, 255] with the arithmetic of ``intensity._minmax_255``."""
    span = hi - lo
    if not span > 0:
        return np.zeros(x.shape, dtype=np.float64)
    x = np.clip(x, lo, hi)
    if math.isfinite(span):
        return (x - lo) / span * 255.0
    scale = max(abs(lo), abs(hi))
    return np.clip((x / scale - lo / scale) / (hi / scale - lo / scale) * 255.0, 0.0, 255.0)


class Counts:
    """Value counts of integer data (``offset`` + index = value): its exact min, max and percentiles."""

    def __init__(self, dtype: np.dtype):
        info = np.iinfo(dtype)
        self.dtype, self.offset = np.dtype(dtype), int(info.min)
        self.counts = np.zeros(int(info.max) - int(info.min) + 1, np.int64)

    def add(self, block: Any) -> None:
        flat = np.asarray(block).ravel()
        for i in range(0, flat.size, _PIECE):  # bounded temporaries, whatever the chunk size
            piece = flat[i : i + _PIECE].astype(np.int64) - self.offset
            self.counts += np.bincount(piece, minlength=self.counts.size)

    def extremes(self) -> tuple[int, int]:
        nz = np.flatnonzero(self.counts)
        return int(nz[0]) + self.offset, int(nz[-1]) + self.offset

    def positive_percentiles(self, qs: Sequence[float]) -> list[float] | None:
        """``np.percentile(values[values > 0], q)`` for each q (numpy's linear method), or None."""
        start = max(0, 1 - self.offset)
        pos = self.counts[start:]
        n = int(pos.sum())
        if n == 0:
            return None
        cum = np.cumsum(pos)
        out = []
        for q in qs:
            quant = np.float64(q) / 100
            virtual = n * quant + (1 + quant * (1 - 1 - 1)) - 1  # numpy's _compute_virtual_index
            prev = float(np.clip(np.floor(virtual), 0, n - 1))
            a, b = (
                float(np.searchsorted(cum, r, side="right") + start + self.offset) for r in (prev, min(prev + 1, n - 1))
            )
            t = virtual - np.floor(virtual)
            out.append(float(b - (b - a) * (1 - t)) if t >= 0.5 else float(a + (b - a) * t))
        return out


def scaling(values: np.ndarray | Counts, intensity: Intensity) -> Scaling:
    """The statistics of ``intensity`` over ``values`` (the whole image, its value counts, or a sample)."""
    if intensity.rule == "uint8":
        return Scaling(intensity)
    if isinstance(values, Counts):
        lo_v, hi_v = (float(v) for v in values.extremes())
        pct = values.positive_percentiles
    else:
        data = np.asarray(values).astype(np.float64, copy=False)
        lo_v, hi_v = float(data.min()), float(data.max())
        positive = data[data > 0]
        pct = lambda qs: [float(np.percentile(positive, q)) for q in qs] if positive.size else None  # noqa: E731
    if intensity.rule == "ct":
        level, width = intensity.window or DEFAULT_CT_WINDOW
        return Scaling(intensity, max(level - width / 2.0, lo_v), min(level + width / 2.0, hi_v))
    if intensity.rule == "percentile":
        got = pct((0.5, 99.5))
        if got is None:
            raise ImageError("image has no pixel above 0: the percentile rule (MR, ultrasound, X-ray) cannot scale it")
        return Scaling(intensity, got[0], got[1])
    if intensity.rule == "rgb":
        return Scaling(intensity, lo_v, hi_v)
    raise ImageError(f"unknown intensity rule {intensity.rule!r}")


def in_memory(data: Any) -> bool:
    """A numpy array in memory (not a memmap): its statistics are taken over all of it."""
    return isinstance(data, np.ndarray) and not isinstance(data, np.memmap)


def _chunk_starts(data: Any, axis: int) -> list[int]:
    """Where the storage chunks of ``data`` along ``axis`` start (dask's or zarr's ``chunks``; else every BLOCK)."""
    n = int(data.shape[axis])
    chunks = getattr(data, "chunks", None)
    try:
        c = chunks[axis] if chunks is not None else BLOCK
    except (TypeError, IndexError):
        c = BLOCK
    sizes = [int(v) for v in c] if isinstance(c, Sequence) else [max(1, int(c))] * math.ceil(n / max(1, int(c)))
    return [int(v) for v in np.cumsum([0, *sizes[:-1]])]


def _spans(data: Any, axis: int, side: int = 2 * BLOCK) -> list[slice]:
    """Consecutive whole chunks along ``axis`` merged into spans of about ``side`` pixels (fewer reads)."""
    n = int(data.shape[axis])
    out, start = [], 0
    for stop in [*_chunk_starts(data, axis)[1:], n]:
        if stop - start >= side or stop == n:
            out.append(slice(start, stop))
            start = stop
    return out


def _axis_windows(data: Any, axis: int, grid: int, tile: int) -> list[slice]:
    """``grid`` windows of up to ``tile`` pixels evenly spread along ``axis``, each inside one chunk."""
    n = int(data.shape[axis])
    starts = _chunk_starts(data, axis) if getattr(data, "chunks", None) is not None else [0]
    out: list[tuple[int, int]] = []
    for i in range(grid):
        centre = int((i + 0.5) * n / grid)
        k = int(np.searchsorted(starts, centre, side="right")) - 1
        lo, hi = starts[k], starts[k + 1] if k + 1 < len(starts) else n
        side = min(tile, hi - lo)
        start = min(max(lo, centre - side // 2), hi - side)
        out.append((start, start + side))
    return [slice(a, b) for a, b in dict.fromkeys(out)]


def _layout(data: Any, spatial: tuple[int, int]) -> tuple[int, int, list[int], bool]:
    ndim = len(data.shape)
    sy, sx = (a % ndim for a in spatial)
    colour = sx == ndim - 2
    lead = [a for a in range(ndim) if a not in (sy, sx) and not (colour and a == ndim - 1)]
    return sy, sx, lead, colour


def _windows(
    data: Any, spatial: tuple[int, int], rows: list[slice], cols: list[slice], planes: int | None
) -> Iterator[np.ndarray]:
    """Arrays of ``data`` at every (row, col) window, on ``planes`` planes spread over the leading axes (None: all)."""
    sy, sx, lead, colour = _layout(data, spatial)
    n_lead = int(np.prod([data.shape[a] for a in lead])) if lead else 1
    picks = range(n_lead) if planes is None else sorted({int((i + 0.5) * n_lead / planes) for i in range(planes)})
    for flat in picks:
        index = np.unravel_index(min(flat, n_lead - 1), [data.shape[a] for a in lead]) if lead else ()
        for r in rows:
            for c in cols:
                key: list[Any] = [slice(None)] * len(data.shape)
                for a, i in zip(lead, index, strict=True):
                    key[a] = int(i)
                key[sy], key[sx] = r, c
                win = np.asarray(data[tuple(key)])
                yield win.reshape(-1, win.shape[-1]) if colour else win.reshape(-1)


def sample(data: Any, spatial: tuple[int, int], grid: int = GRID, tile: int = TILE, planes: int = PLANES) -> np.ndarray:
    """Pixels of ``data`` from a grid of windows over the two ``spatial`` axes, on up to ``planes``
    planes spread over the other axes (flattened; a colour axis, if any, kept last)."""
    sy, sx, _, _ = _layout(data, spatial)
    rows, cols = _axis_windows(data, sy, grid, tile), _axis_windows(data, sx, grid, tile)
    return np.concatenate(list(_windows(data, spatial, rows, cols, planes)))


def counts(data: Any, spatial: tuple[int, int]) -> Counts:
    """The value counts of all of ``data``, read a few whole storage chunks (about 2 BLOCK px a side) at a time."""
    sy, sx, _, _ = _layout(data, spatial)
    out = Counts(np.dtype(data.dtype))
    for block in _windows(data, spatial, _spans(data, sy), _spans(data, sx), None):
        out.add(block)
    return out


def _streamable(data: Any) -> bool:
    dtype = np.dtype(data.dtype)
    return np.issubdtype(dtype, np.integer) and dtype.itemsize <= 2 and int(np.prod(data.shape)) <= STREAM_PIXELS


def _probe(values: np.ndarray | Counts, dtype: np.dtype) -> np.ndarray:
    """A two-pixel array with the data's dtype, min and max: what :func:`resolve_modality` looks at."""
    if isinstance(values, Counts):
        return np.array(values.extremes(), dtype)
    return np.array([values.min(), values.max()], dtype) if values.size else np.zeros(0, dtype)


def rule_for(
    data: Any, spatial: tuple[int, int], modality: str, window: WindowLike, rgb: bool = False, channel: bool = False
) -> Scaling:
    """The :class:`Scaling` of ``data`` (the planes, or one channel), statistics per the module doc."""
    dtype = np.dtype(data.dtype)
    if dtype == np.uint8:  # 8-bit data read as it is needs no statistics
        intensity = resolve_modality(np.zeros((1, 1, 3) if rgb else (1, 1), np.uint8), modality, window, rgb=rgb)
        if intensity.rule == "uint8":
            return Scaling(intensity)
    values: np.ndarray | Counts
    if in_memory(data):
        values = data
    elif _streamable(data):
        values = counts(data, spatial)
    else:
        values = sample(data, spatial)
        if values.min() == values.max() or int((values > 0).sum()) < _MIN_POSITIVE:
            values = sample(data, spatial, DENSE, TILE // 2)  # a sparse slide: look closer
    if not isinstance(values, Counts) and np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        raise ImageError("image has NaN or infinite pixels: fill or mask them first")
    probe = _probe(values, dtype)
    if probe.size and probe.min() == probe.max():
        raise ImageError(f"image is constant (every pixel = {probe[0]}): nothing to segment")
    intensity = resolve_modality(probe, modality, window, rgb=rgb)
    if channel and intensity.rule == "rgb":
        raise ImageError("a channel of a multichannel image is not RGB")
    return scaling(values, intensity)
