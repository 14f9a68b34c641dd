"""Slice-by-slice propagation of one object from a box (see the package docstring)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

import numpy as np

from napari_medsam.engine.errors import BoxError, ImageError, OptionTypeError
from napari_medsam.engine.intensity import Intensity, WindowLike, gray_to_rgb
from napari_medsam.engine.types import Segmenter
from napari_medsam.engine.validate import check_box, check_index, parse_z_range

from .boxes import _model_scale, chained_box, default_margin, interpolate_boxes
from .convert import volume_to_uint8
from .records import PropagationResult, SliceRecord
from .stop_rule import DEFAULT_STOP, StopRule

if TYPE_CHECKING:  # annotations only
    from napari_medsam.engine.cache import Embedding

BoxLike = Sequence[float]
UP, DOWN = "up", "down"  # up = increasing slice index


def _box4(b: np.ndarray) -> tuple[float, float, float, float]:
    """A box as 4 Python floats, for the per-slice trace."""
    return (float(b[0]), float(b[1]), float(b[2]), float(b[3]))


def propagate(
    model: Segmenter,
    volume: Any,
    box: BoxLike | None,
    slice: int | None,
    *,
    modality: str = "auto",
    window: WindowLike = None,
    z_range: tuple[int, int] | None = None,
    key_boxes: Mapping[int, BoxLike] | None = None,
    stop: StopRule | None = None,
    margin: float | None = None,
    on_slice: Callable[[int, np.ndarray], None] | None = None,
    on_record: Callable[[SliceRecord], None] | None = None,
    cancel: threading.Event | None = None,
    volume_u8: np.ndarray | None = None,
) -> PropagationResult:
    """Segment one object in a volume from a box on one slice (or boxes on several).

    Args:
        model: a :class:`~napari_medsam.engine.predictor.MedSAM` (needs ``embed_rgb_status``,
            ``predict``, ``recipe``, ``name`` and ideally ``cache``).
        volume: (D, H, W) array of any numeric dtype, or an RGB volume (D, H, W, 3).
        box: (x0, y0, x1, y1) on slice ``slice``, x = column, y = row, image pixels.
        slice: key slice index along axis 0.
        modality, window: intensity rule, resolved on the whole volume
            (``auto``, ``ct``, ``mr``...; CT window (level, width) or preset name).
        z_range: optional inclusive user bounds (first, last) for both directions.
        key_boxes: ``{z: box}`` on two or more slices; boxes are interpolated between
            them and used as prompts there; ``box``/``slice`` (if given) count as one more.
        stop: :class:`StopRule` (default :data:`DEFAULT_STOP`; ``StopRule.never()`` = authors).
        margin: chaining margin in model-input pixels (default 3 at 256, 5 at 1024).
        on_slice: called as ``on_slice(z, mask2d)`` after each kept slice.
        on_record: called as ``on_record(record)`` with each slice's :class:`SliceRecord`
            (its box, area, predicted IoU, kept or not) as soon as the slice is decoded,
            before ``on_slice`` for that slice (a viewer shows each slice's box as it comes).
        cancel: a ``threading.Event``; checked before each slice. When set, the
            result holds what was done and ``cancelled`` is True (no exception).
        volume_u8: the volume already converted (skips the conversion; for callers
            segmenting many objects in one volume).
    """
    t0 = time.perf_counter()
    stop = DEFAULT_STOP if stop is None else stop
    if not isinstance(stop, StopRule):
        raise OptionTypeError(f"stop must be a StopRule, got {type(stop).__name__}")
    if on_slice is not None and not callable(on_slice):
        raise OptionTypeError(f"on_slice must be callable as on_slice(z, mask), got {type(on_slice).__name__}")
    if on_record is not None and not callable(on_record):
        raise OptionTypeError(f"on_record must be callable as on_record(record), got {type(on_record).__name__}")
    if cancel is not None and not callable(getattr(cancel, "is_set", None)):
        raise OptionTypeError(f"cancel must be a threading.Event (anything with is_set()), got {type(cancel).__name__}")
    if volume_u8 is None:
        u8, intensity, rgb = volume_to_uint8(volume, modality, window)
    else:
        u8 = np.ascontiguousarray(volume_u8)
        if u8.dtype != np.uint8 or u8.ndim not in (3, 4):
            raise ImageError(f"volume_u8 must be a uint8 (D, H, W[, 3]) array, got {u8.dtype} {u8.shape}")
        intensity, rgb = Intensity("uint8"), u8.ndim == 4
    depth, shape = u8.shape[0], tuple(u8.shape[1:3])

    # prompts: the key box plus any key_boxes
    anchors: dict[int, np.ndarray] = {}
    for z, kb in (key_boxes or {}).items():
        zi = check_index(z, depth, "key_boxes slice")
        anchors[zi] = check_box(kb, shape, f"key_boxes[{zi}]")
    if slice is not None:
        slice = check_index(slice, depth, "slice")  # noqa: A001 (public keyword name)
    if box is not None:
        if slice is None:
            raise BoxError("a box needs the slice it was drawn on")
        anchors[slice] = check_box(box, shape, "box")
    if not anchors:
        raise BoxError("no box given: pass box and slice, or key_boxes={slice: box, ...}")
    span = (min(anchors), max(anchors))
    if slice is None:  # start where the box is largest (as in the authors' annotation study)
        slice = max(anchors, key=lambda z: (anchors[z][2] - anchors[z][0]) * (anchors[z][3] - anchors[z][1]))  # noqa: A001 (public keyword name)
    elif slice not in anchors and not span[0] < slice < span[1]:
        raise BoxError(f"slice {slice} has no box and lies outside the span {span[0]}..{span[1]} of key_boxes")

    lo, hi = 0, depth - 1
    if z_range is not None:
        first, last = parse_z_range(z_range, depth)
        if not (first <= span[0] and span[1] <= last and first <= slice <= last):
            raise BoxError(
                f"z_range {first}..{last} must contain the key slice {slice} and every boxed slice {sorted(anchors)}"
            )
        lo, hi = first, last

    mx_model = default_margin(model) if margin is None else float(margin)
    if not math.isfinite(mx_model) or mx_model < 0:
        raise BoxError(f"margin must be a non-negative number of model-input pixels, got {margin!r}")
    sx, sy = _model_scale(model, shape)
    margin_xy = (mx_model / sx, mx_model / sy)

    result = PropagationResult(np.zeros((depth,) + shape, dtype=bool), intensity=intensity)
    seen: dict[int, Embedding] = {}

    def embedding(z: int) -> Embedding:
        if z in seen:
            return seen[z]
        rgb_slice = np.ascontiguousarray(u8[z]) if rgb else gray_to_rgb(u8[z])
        emb, encoded = model.embed_rgb_status(rgb_slice)
        (result.encoded if encoded else result.cached).append(z)
        seen[z] = emb
        return emb

    def run(z: int, box_z: np.ndarray) -> tuple[np.ndarray, float, int, float]:
        pred = model.predict(embedding(z), box_z)
        m = np.asarray(pred.masks[0], dtype=bool)
        area = int(m.sum())
        mean = float(u8[z][m].mean()) if area else 0.0
        return m, float(pred.iou[0]), area, mean

    def cancelled() -> bool:
        return cancel is not None and cancel.is_set()

    def record(r: SliceRecord) -> None:
        result.slices.append(r)
        if on_record is not None:
            on_record(r)

    def keep(z: int, m: np.ndarray) -> None:
        result.mask[z] = m
        if on_slice is not None:
            on_slice(z, m)

    # key slice
    if cancelled():
        result.cancelled = True
        result.stopped = {UP: "cancelled", DOWN: "cancelled"}
        result.seconds = time.perf_counter() - t0
        return result
    key_box = interpolate_boxes(anchors, slice)
    m, iou, area, mean = run(slice, key_box)
    record(
        SliceRecord(
            slice,
            "key",
            "key" if slice in anchors else "interpolated",
            _box4(key_box),
            area,
            iou,
            mean,
            True,
        )
    )
    keep(slice, m)

    # both directions, interleaved so a viewer sees the object grow both ways
    state = {
        UP: {"z": slice, "mask": m, "area": area, "step": 1, "bound": hi, "ref": mean if area else None},
        DOWN: {"z": slice, "mask": m, "area": area, "step": -1, "bound": lo, "ref": mean if area else None},
    }
    active = [UP, DOWN]
    while active:
        for d in list(active):
            s = state[d]
            z = s["z"] + s["step"]
            if (s["step"] > 0 and z > s["bound"]) or (s["step"] < 0 and z < s["bound"]):
                result.stopped[d] = "z_range" if z_range is not None and 0 <= z < depth else "end"
                active.remove(d)
                continue
            if cancelled():
                result.cancelled = True
                for dd in active:
                    result.stopped[dd] = "cancelled"
                active = []
                break
            inside = span[0] <= z <= span[1]
            if inside:
                b: np.ndarray | None
                prompt, b = "interpolated", interpolate_boxes(anchors, z)
                if z in anchors:
                    prompt = "key"
            else:
                b = chained_box(s["mask"], margin_xy)
                prompt = "chained"
                if b is None:  # previous slice empty: authors fall back to the outermost box
                    if stop.stop_on_empty:
                        result.stopped[d] = "empty"
                        active.remove(d)
                        continue
                    b, prompt = anchors[span[1] if s["step"] > 0 else span[0]], "fallback"
            mz, iou, area, mean = run(z, b)
            if inside and area:  # a user box: this slice is the intensity reference beyond the span
                s["ref"] = mean
            reason = None if inside else stop.check(area, s["area"], iou, mean, s["ref"])
            kept = reason is None or (stop.keep_last and reason != "empty")
            if not stop.stop_on_empty and area < max(int(stop.min_pixels), 1):
                mz = np.zeros_like(mz)
                area = 0
            record(SliceRecord(z, d, prompt, _box4(b), area, iou, mean, kept, reason))
            if kept:
                keep(z, mz)
            if reason is not None:
                result.stopped[d] = reason
                active.remove(d)
                continue
            s.update(z=z, mask=mz, area=area)
    result.seconds = time.perf_counter() - t0
    return result


class VolumeOptions(TypedDict, total=False):
    """The keyword options of :func:`propagate`, shared by :func:`segment_volume` and
    ``MedSAM.segment_volume`` so the three cannot drift apart (``tests/test_volume.py``
    checks the keys against :func:`propagate`'s signature)."""

    modality: str
    window: WindowLike
    z_range: tuple[int, int] | None
    key_boxes: Mapping[int, BoxLike] | None
    stop: StopRule | None
    margin: float | None
    on_slice: Callable[[int, np.ndarray], None] | None
    on_record: Callable[[SliceRecord], None] | None
    cancel: threading.Event | None
    volume_u8: np.ndarray | None


def segment_volume(
    model: Segmenter,
    volume: Any,
    box: BoxLike | None,
    slice: int | None,
    *,
    stats: dict | None = None,
    **options: Unpack[VolumeOptions],
) -> np.ndarray:
    """(D, H, W) bool mask of one object; see :func:`propagate` for the arguments and defaults.

    ``stats``: an optional dict, updated with the encoder counters (``encoded``,
    ``n_encoded``, ``cached``), the per-slice trace, why each direction stopped,
    ``cancelled`` and ``z_extent``.
    """
    res = propagate(model, volume, box, slice, **options)
    if stats is not None:
        stats.update(res.as_stats())
    return res.mask
