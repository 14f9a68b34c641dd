"""3D segmentation from a 2D box: slice-by-slice propagation with a stop rule.

The authors' recipe (bowang-lab/MedSAM, ``CVPR24_LiteMedSAM_infer.py``):

1. The whole volume goes to 8-bit once (CT window, or the 0.5..99.5th percentile
   of the voxels > 0 over the whole volume), then each slice is repeated to three
   channels and encoded on its own.
2. The key slice is segmented with the user's box. Then the propagation goes up
   (increasing z) and, separately, down (decreasing z) one slice at a time: the
   prompt for slice ``z +- 1`` is the bounding box of the mask on slice ``z``,
   enlarged by a margin fixed at model-input scale (3 px at 256 for LiteMedSAM,
   5 px at 1024 for MedSAM/SAM), converted back to image pixels.

The authors fill the whole z-range they are given and, when a mask comes out
empty, fall back to the key-slice box. A viewer user gives no z-range, so we add
our own **stop rule** (:class:`StopRule`). A direction stops at the first slice where

* the mask is empty (fewer than ``min_pixels`` pixels), or
* its area falls below ``min_area_ratio`` x the area on the previous slice
  (the object has ended and the model is clinging to a fragment), or
* the decoder's predicted IoU falls below ``min_iou``, or
* the mean 8-bit intensity inside the mask has moved away from the mean inside
  the user's (key-slice) mask by more than ``max_intensity_shift`` x that mean
  (and at least ``intensity_shift_floor`` grey levels): past the end of an
  object the model keeps returning plausible masks on the neighbouring tissue,
  with a confident IoU, but that tissue looks different.

The slice that trips a rule is dropped unless ``keep_last``. The defaults were
tuned on the 20 3D cases of the project's test data (see ``docs/accuracy_3d.md``
and ``benchmarks/accuracy_3d.py``); the intensity rule is the one that matters
there. Optional user bounds ``z_range=(first, last)`` cap both directions (the
stop rule still applies inside them). With boxes on two or more slices
(``key_boxes``), slices between the outermost boxes get linearly interpolated boxes
(as in the authors' annotation study) and no stop rule; beyond them the chaining
rule and the stop rule apply, with the outermost boxed slice as intensity reference.

Every slice goes through ``model.embed_rgb`` so the model's embedding cache is
used: a slice is encoded at most once per intensity setting, and a second object
in the same volume costs decoder time only. :func:`propagate` returns a
:class:`PropagationResult` with the per-slice trace and the encoder counters;
:func:`segment_volume` returns only the mask (pass ``stats={}`` to get the rest).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import BoxError, ImageError
from .intensity import Intensity, WindowLike, convert, gray_to_rgb
from .labels import apply_mask, mask_box
from .types import Segmenter
from .validate import check_box, check_index, parse_z_range
from .validate import check_volume as check_volume  # its old home was here

BoxLike = Sequence[float]
UP, DOWN = "up", "down"  # up = increasing slice index


@dataclass(frozen=True)
class StopRule:
    """When a propagation direction stops (see the module docstring).

    Attributes:
        min_pixels: a mask with fewer pixels counts as empty.
        min_area_ratio: stop when area < this x the previous slice's area (0 disables).
        min_iou: stop when the decoder's predicted IoU < this (0 disables).
        max_intensity_shift: stop when the mean 8-bit intensity inside the mask differs
            from the reference slice's by more than this fraction of the reference mean
            (None disables).
        intensity_shift_floor: ... and by more than this many grey levels (so dark
            objects, whose relative shifts are noisy, are not cut short).
        keep_last: keep the slice that tripped the area / IoU / intensity rule.
        stop_on_empty: ``False`` reproduces the authors: an empty mask does not stop,
            the next slice is prompted with the key box instead.
    """

    min_pixels: int = 1
    min_area_ratio: float = 0.2
    min_iou: float = 0.5
    max_intensity_shift: Optional[float] = 0.35
    intensity_shift_floor: float = 30.0
    keep_last: bool = False
    stop_on_empty: bool = True

    @classmethod
    def never(cls) -> "StopRule":
        """The authors' behaviour: no stop rule, empty masks fall back to the key box."""
        return cls(min_area_ratio=0.0, min_iou=0.0, max_intensity_shift=None, keep_last=True, stop_on_empty=False)

    def check(self, area: int, prev_area: int, iou: float, mean: Optional[float] = None, ref_mean: Optional[float] = None) -> Optional[str]:
        """Why this slice stops its direction (``empty``, ``area``, ``iou``, ``intensity``), or None.

        ``mean`` / ``ref_mean``: mean 8-bit intensity inside this slice's mask and
        inside the reference (key) slice's mask.
        """
        if area < max(int(self.min_pixels), 1):
            return "empty" if self.stop_on_empty else None
        if self.min_area_ratio > 0 and prev_area > 0 and area < self.min_area_ratio * prev_area:
            return "area"
        if self.min_iou > 0 and iou < self.min_iou:
            return "iou"
        if self.max_intensity_shift is not None and mean is not None and ref_mean is not None:
            if abs(mean - ref_mean) > max(self.max_intensity_shift * ref_mean, self.intensity_shift_floor):
                return "intensity"
        return None


DEFAULT_STOP = StopRule()


@dataclass
class SliceRecord:
    """What happened on one slice."""

    z: int
    direction: str  # "key", "up" or "down"
    prompt: str  # "key", "interpolated" or "chained" (or "fallback": key box after an empty mask)
    box: Tuple[float, float, float, float]
    area: int
    iou: float
    mean: float  # mean 8-bit intensity inside the mask (0 when empty)
    kept: bool
    reason: Optional[str] = None  # why the direction stopped here


@dataclass
class PropagationResult:
    """A 3D mask and how it was made.

    Attributes:
        mask: (D, H, W) bool.
        slices: per-slice trace in processing order.
        encoded: slice indices whose embedding was computed in this call (cache misses).
        cached: slice indices whose embedding came from the cache.
        stopped: per direction why it ended: ``empty``, ``area``, ``iou``,
            ``z_range`` (user bound), ``end`` (volume edge) or ``cancelled``.
        cancelled: the cancel event was set before the work was done.
        intensity: the rule applied to the whole volume.
        seconds: wall time.
    """

    mask: np.ndarray
    slices: List[SliceRecord] = field(default_factory=list)
    encoded: List[int] = field(default_factory=list)
    cached: List[int] = field(default_factory=list)
    stopped: Dict[str, str] = field(default_factory=dict)
    cancelled: bool = False
    intensity: Optional[Intensity] = None
    seconds: float = 0.0

    @property
    def n_encoded(self) -> int:
        return len(self.encoded)

    @property
    def z_extent(self) -> Optional[Tuple[int, int]]:
        """(first, last) slice with a non-empty mask, or None."""
        zs = np.flatnonzero(self.mask.reshape(self.mask.shape[0], -1).any(axis=1))
        return (int(zs[0]), int(zs[-1])) if zs.size else None

    def as_stats(self) -> dict:
        return {
            "encoded": list(self.encoded),
            "n_encoded": self.n_encoded,
            "cached": list(self.cached),
            "slices": [asdict(s) for s in self.slices],
            "stopped": dict(self.stopped),
            "cancelled": self.cancelled,
            "z_extent": self.z_extent,
            "intensity": self.intensity.describe() if self.intensity else None,
            "seconds": self.seconds,
        }


# -- input checks -------------------------------------------------------------
# check_volume, the slice-index and box checks live in engine/validate.py.
def volume_to_uint8(
    volume: np.ndarray, modality: str = "auto", window: WindowLike = None
) -> Tuple[np.ndarray, Intensity, bool]:
    """Validate and convert a whole volume to 8-bit at once (volume-wide percentiles).

    Returns ((D, H, W) or (D, H, W, 3) uint8, the rule applied, is_rgb); see
    :func:`engine.intensity.convert`.
    """
    r = convert(volume, "volume", modality, window)
    return r.pixels, r.intensity, r.rgb


# -- geometry -------------------------------------------------------------------
def default_margin(model: Segmenter) -> float:
    """The authors' chaining margin at model input scale: 3 px at 256, 5 px at 1024."""
    return model.recipe.chain_margin


def _model_scale(model: Segmenter, shape: Tuple[int, int]) -> Tuple[float, float]:
    """Image pixel -> model input pixel factors (sx, sy)."""
    return model.recipe.model_scale(shape)


def chained_box(mask: np.ndarray, margin_xy: Tuple[float, float]) -> Optional[np.ndarray]:
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


# -- propagation -------------------------------------------------------------------
def propagate(
    model: Segmenter,
    volume,
    box: Optional[BoxLike],
    slice: Optional[int],
    *,
    modality: str = "auto",
    window: WindowLike = None,
    z_range: Optional[Tuple[int, int]] = None,
    key_boxes: Optional[Mapping[int, BoxLike]] = None,
    stop: Optional[StopRule] = None,
    margin: Optional[float] = None,
    on_slice: Optional[Callable[[int, np.ndarray], None]] = None,
    cancel: Optional[threading.Event] = None,
    volume_u8: Optional[np.ndarray] = None,
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
        cancel: a ``threading.Event``; checked before each slice. When set, the
            result holds what was done and ``cancelled`` is True (no exception).
        volume_u8: the volume already converted (skips the conversion; for callers
            segmenting many objects in one volume).
    """
    t0 = time.perf_counter()
    stop = DEFAULT_STOP if stop is None else stop
    if not isinstance(stop, StopRule):
        raise TypeError(f"stop must be a StopRule, got {type(stop).__name__}")
    if volume_u8 is None:
        u8, intensity, rgb = volume_to_uint8(volume, modality, window)
    else:
        u8 = np.ascontiguousarray(volume_u8)
        if u8.dtype != np.uint8 or u8.ndim not in (3, 4):
            raise ImageError(f"volume_u8 must be a uint8 (D, H, W[, 3]) array, got {u8.dtype} {u8.shape}")
        intensity, rgb = Intensity("uint8"), u8.ndim == 4
    depth, shape = u8.shape[0], tuple(u8.shape[1:3])

    # prompts: the key box plus any key_boxes
    anchors: Dict[int, np.ndarray] = {}
    for z, b in (key_boxes or {}).items():
        zi = check_index(z, depth, "key_boxes slice")
        anchors[zi] = check_box(b, shape, f"key_boxes[{zi}]")
    if slice is not None:
        slice = check_index(slice, depth, "slice")
    if box is not None:
        if slice is None:
            raise BoxError("a box needs the slice it was drawn on")
        anchors[slice] = check_box(box, shape, "box")
    if not anchors:
        raise BoxError("no box given: pass box and slice, or key_boxes={slice: box, ...}")
    span = (min(anchors), max(anchors))
    if slice is None:  # start where the box is largest (as in the authors' annotation study)
        slice = max(anchors, key=lambda z: (anchors[z][2] - anchors[z][0]) * (anchors[z][3] - anchors[z][1]))
    elif slice not in anchors and not span[0] < slice < span[1]:
        raise BoxError(f"slice {slice} has no box and lies outside the span {span[0]}..{span[1]} of key_boxes")

    lo, hi = 0, depth - 1
    if z_range is not None:
        first, last = parse_z_range(z_range, depth)
        if not (first <= span[0] and span[1] <= last and first <= slice <= last):
            raise BoxError(f"z_range {first}..{last} must contain the key slice {slice} and every boxed slice {sorted(anchors)}")
        lo, hi = first, last

    mx_model = default_margin(model) if margin is None else float(margin)
    if not math.isfinite(mx_model) or mx_model < 0:
        raise BoxError(f"margin must be a non-negative number of model-input pixels, got {margin!r}")
    sx, sy = _model_scale(model, shape)
    margin_xy = (mx_model / sx, mx_model / sy)

    result = PropagationResult(np.zeros((depth,) + shape, dtype=bool), intensity=intensity)
    seen: Dict[int, object] = {}

    def embedding(z: int):
        if z in seen:
            return seen[z]
        rgb_slice = np.ascontiguousarray(u8[z]) if rgb else gray_to_rgb(u8[z])
        emb, encoded = model.embed_rgb_status(rgb_slice)
        (result.encoded if encoded else result.cached).append(z)
        seen[z] = emb
        return emb

    def run(z: int, box_z: np.ndarray) -> Tuple[np.ndarray, float, int, float]:
        pred = model.predict(embedding(z), box_z)
        m = np.asarray(pred.masks[0], dtype=bool)
        area = int(m.sum())
        mean = float(u8[z][m].mean()) if area else 0.0
        return m, float(pred.iou[0]), area, mean

    def cancelled() -> bool:
        return cancel is not None and cancel.is_set()

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
    result.slices.append(SliceRecord(slice, "key", "key" if slice in anchors else "interpolated",
                                     tuple(float(v) for v in key_box), area, iou, mean, True))
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
            result.slices.append(SliceRecord(z, d, prompt, tuple(float(v) for v in b), area, iou, mean, kept, reason))
            if kept:
                keep(z, mz)
            if reason is not None:
                result.stopped[d] = reason
                active.remove(d)
                continue
            s.update(z=z, mask=mz, area=area)
    result.seconds = time.perf_counter() - t0
    return result


def segment_volume(
    model: Segmenter,
    volume,
    box: Optional[BoxLike],
    slice: Optional[int],
    *,
    modality: str = "auto",
    window: WindowLike = None,
    z_range: Optional[Tuple[int, int]] = None,
    key_boxes: Optional[Mapping[int, BoxLike]] = None,
    stop: Optional[StopRule] = None,
    margin: Optional[float] = None,
    on_slice: Optional[Callable[[int, np.ndarray], None]] = None,
    cancel: Optional[threading.Event] = None,
    stats: Optional[dict] = None,
) -> np.ndarray:
    """(D, H, W) bool mask of one object; see :func:`propagate` for the arguments.

    ``stats``: an optional dict, updated with the encoder counters (``encoded``,
    ``n_encoded``, ``cached``), the per-slice trace, why each direction stopped,
    ``cancelled`` and ``z_extent``.
    """
    res = propagate(
        model, volume, box, slice, modality=modality, window=window, z_range=z_range, key_boxes=key_boxes,
        stop=stop, margin=margin, on_slice=on_slice, cancel=cancel,
    )
    if stats is not None:
        stats.update(res.as_stats())
    return res.mask


# -- labels -------------------------------------------------------------------
def paste_object(labels: np.ndarray, mask3d: np.ndarray, label_id: int, overwrite: bool = False) -> np.ndarray:
    """Write ``mask3d`` into the integer label volume ``labels`` as ``label_id``, in place.

    Voxels already holding another object are left alone unless ``overwrite``;
    voxels of ``label_id`` outside the new mask are kept (call with a cleared
    object to replace it). Returns ``labels``. Raises ``ValueError`` when the id
    does not fit the label dtype (use uint16/uint32 for ids > 255).
    """
    if not isinstance(labels, np.ndarray):
        raise ImageError(f"labels must be an integer numpy array, got {type(labels).__name__}")
    mask3d = np.asarray(mask3d, dtype=bool)
    if mask3d.shape != labels.shape:
        raise ImageError(f"mask shape {mask3d.shape} differs from labels shape {labels.shape}")
    apply_mask(labels, None, mask3d, label_id, clear_id=False, overwrite=overwrite)  # the one writer of objects
    return labels
