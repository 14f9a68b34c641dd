"""Lazy 8-bit views of large planes: slides and mosaics are read and converted crop by crop (issue #14).

A plane with a side over the zoom's ``large_side`` is never encoded whole: its boxes are
answered from crops (:func:`~napari_medsam.engine.zoom.segment_box`). :class:`LazyU8` is
what such a source looks like to the model: an array-like with ``shape``, ``dtype``
(uint8), ``ndim`` and ``__getitem__``; slicing it slices the source (a dask or zarr
array, a memmap: only the chunks under the slice are read) and applies the intensity
rule the whole-image conversion (:func:`~napari_medsam.engine.intensity.convert`,
``"planes"``) would apply.

The rule's statistics (the CT window's reach, the MR percentiles, the RGB min-max) come
from :mod:`.lazy_stats`: exact for in-memory arrays and for integer slides of up to 16 bits
(value counts streamed a few chunks at a time), else from windows sampled over the slide; the
slide is never loaded whole. 8-bit data needs no statistics: it is read as it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from .errors import ImageError
from .intensity import Intensity, WindowLike, parse_channels
from .lazy_stats import Scaling, in_memory, rule_for
from .validate import MIN_SIDE
from .zoom import DEFAULT as ZOOM_DEFAULT


class LazyU8:
    """A uint8 view of ``data`` as the model sees it, converted slice by slice.

    Shape: ``data``'s (``rgb``: the colour axis cut to 3); with ``channels`` (picked along
    the first axis): ``data.shape[1:] + (3,)``, the channels composed into RGB as
    :func:`~napari_medsam.engine.intensity.compose_channels` does. A key is a tuple of ints
    and slices over the leading and spatial axes (the colour axis may be indexed last).
    ``reads`` counts the slices taken from ``data``.
    """

    dtype = np.dtype(np.uint8)

    def __init__(
        self,
        data: Any,
        scalings: Sequence[Scaling],
        *,
        rgb: bool = False,
        channels: Sequence[int] | None = None,
        prefix: Sequence[int] = (),
    ):
        self.data, self.scalings, self.rgb = data, tuple(scalings), rgb
        self.channels = None if channels is None else tuple(int(c) for c in channels)
        self.prefix = tuple(int(i) for i in prefix)
        full = tuple(int(v) for v in data.shape)
        if self.channels is not None:
            full = (*full[1:], 3)
        elif rgb:
            full = (*full[:-1], 3)
        self.shape = full[len(self.prefix) :]
        self._planes: dict[tuple[int, ...], LazyU8] = {}
        self.reads = 0

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def intensity(self) -> Intensity:
        return self.scalings[0].intensity if len(self.scalings) == 1 else Intensity("composed")

    def __len__(self) -> int:
        return self.shape[0]

    def plane(self, index: Sequence[int]) -> LazyU8:
        """The view with the leading ``index`` fixed (the same object for the same index)."""
        key = tuple(int(i) for i in index)
        if not key:
            return self
        view = self._planes.get(key)
        if view is None:
            view = LazyU8(self.data, self.scalings, rgb=self.rgb, channels=self.channels, prefix=self.prefix + key)
            view = self._planes.setdefault(key, view)
        return view

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis or k is None or not isinstance(k, (int, np.integer, slice)) for k in key):
            raise TypeError(f"a lazy plane is indexed with ints and slices, got {key!r}")
        if len(key) > self.ndim:
            raise IndexError(f"too many indices ({len(key)}) for a lazy array of shape {self.shape}")
        full = self.prefix + key
        colour = self.rgb or self.channels is not None
        n_space = len(self.shape) + len(self.prefix) - (1 if colour else 0)
        space, last = full[:n_space], full[n_space:]
        self.reads += 1
        if self.channels is None:
            raw = np.asarray(self.data[space])
            out = self.scalings[0].apply(raw[..., :3] if self.rgb else raw)
        else:
            planes = [s.apply(self.data[(c, *space)]) for c, s in zip(self.channels, self.scalings, strict=True)]
            planes = planes * 3 if len(planes) == 1 else planes
            planes += [np.zeros_like(planes[0])] * (3 - len(planes))
            out = np.stack(planes, axis=-1)
        return out[(..., last[0])] if last else out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self[()]
        return out if dtype is None else out.astype(dtype)

    def __repr__(self) -> str:
        return f"LazyU8(shape={self.shape}, {self.intensity.describe()}, source {type(self.data).__name__})"


def large_planes(data: Any, rgb: bool = False, channels: Any = None, large_side: int = ZOOM_DEFAULT.large_side) -> bool:
    """The planes of ``data`` have a side over ``large_side``: the crop path answers their boxes."""
    shape = tuple(int(v) for v in getattr(data, "shape", ()))
    spatial = shape[-3:-1] if rgb else shape[-2:]
    return len(spatial) == 2 and max(spatial) > large_side and (channels is None or len(shape) >= 3)


def lazy_planes(
    data: Any, modality: str = "auto", window: WindowLike = None, *, rgb: bool = False, channels: Any = None
) -> LazyU8:
    """``data`` (planes ``(..., H, W)``, ``(..., H, W, 3|4)`` when ``rgb``, or channels first with
    ``channels``) as a :class:`LazyU8`: what ``convert(data, "planes", ...)`` gives, read on demand."""
    dtype = np.dtype(getattr(data, "dtype", np.float64))
    if dtype == np.bool_:
        raise ImageError("image is boolean (a mask?): pass the intensity image")
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating)):
        raise ImageError(f"image dtype {dtype} is not a number type")
    shape = tuple(int(v) for v in data.shape)
    spatial_axes = (-3, -2) if rgb else (-2, -1)
    if len(shape) < (3 if rgb else 2) or (rgb and shape[-1] not in (3, 4)):
        raise ImageError(f"expected planes {'(..., H, W, 3|4)' if rgb else '(..., H, W)'}, got shape {shape}")
    if min(shape[a] for a in spatial_axes) < MIN_SIDE:
        raise ImageError(f"image of shape {shape} is too small: at least {MIN_SIDE} x {MIN_SIDE} pixels")
    if channels is not None:
        if len(shape) < 3:
            raise ImageError(f"a multichannel image needs a channel axis and 2 spatial axes, got shape {shape}")
        picked = parse_channels(channels, shape[0])
        if picked is None:
            raise ImageError("no channels picked")
        chans = [data[c] if in_memory(data) else _Channel(data, c) for c in picked]
        rules = [rule_for(ch, (-2, -1), modality, window, channel=True) for ch in chans]
        return LazyU8(data, rules, channels=picked)
    source = data
    if rgb and shape[-1] == 4:
        source = data[..., :3] if in_memory(data) else _Colour(data)
    return LazyU8(data, [rule_for(source, spatial_axes, modality, window, rgb=rgb)], rgb=rgb)


class _Channel:
    """Channel ``c`` (first axis) of ``data``, sliced lazily (for sampling)."""

    def __init__(self, data: Any, c: int):
        self.data, self.c = data, c
        self.shape, self.dtype = tuple(int(v) for v in data.shape[1:]), np.dtype(data.dtype)
        self.chunks = _sub_chunks(data, 1)

    def __getitem__(self, key: tuple) -> Any:
        return self.data[(self.c, *key)]


class _Colour:
    """An RGBA ``data`` seen without its alpha (for sampling)."""

    def __init__(self, data: Any):
        self.data = data
        self.shape, self.dtype = (*tuple(int(v) for v in data.shape[:-1]), 3), np.dtype(data.dtype)
        self.chunks = getattr(data, "chunks", None)

    def __getitem__(self, key: tuple) -> np.ndarray:
        return np.asarray(self.data[key])[..., :3]


def _sub_chunks(data: Any, drop: int) -> tuple | None:
    chunks = getattr(data, "chunks", None)
    return None if chunks is None else tuple(chunks)[drop:]


def as_rgb(plane: Any) -> np.ndarray:
    """A plane (lazy or not) as a contiguous (H, W, 3) uint8 array: all of it is read."""
    from .intensity import gray_to_rgb

    arr = np.asarray(plane)
    return np.ascontiguousarray(arr) if arr.ndim == 3 else gray_to_rgb(arr)
