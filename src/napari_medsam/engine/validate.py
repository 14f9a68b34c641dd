"""Validation of everything a user can pass wrong: images, volumes, boxes, slice indices, z-ranges.

Every function here raises :class:`ImageError` or :class:`BoxError` (both
:class:`MedSAMError` and :class:`ValueError`) with a message that names the
value and says what was expected; never numpy's or Python's own errors.

Boxes are ``(x0, y0, x1, y1)``, x = column, y = row, in image pixels, with
**inclusive** bounds: ``x0 == x1`` is a box one pixel wide, and a one-pixel box
``(x, y, x, y)`` is valid. A box is refused only when it is not four finite
numbers or lies wholly outside the image.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import BoxError, ImageError
from .types import Box

#: the smallest image side the models accept, in pixels.
MIN_SIDE = 2
#: an array (H, W, 3|4) whose first two sides are both at least this is taken as one RGB image,
#: not a volume of 3 or 4 slices: volumes of so few slices of at least 16 x 16 are far rarer
#: than RGB images, and :func:`check_volume` refuses them with a hint.
RGB_MIN_SIDE = 16
_BOX_TEXT_SPLIT = re.compile(r"[,;\s]+")


def _show(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- images and volumes ------------------------------------------------------------
def _check_numeric(arr: np.ndarray, what: str, unit: str) -> None:
    """The checks shared by images and volumes: a number dtype, finite values, not constant."""
    if arr.dtype == bool:
        raise ImageError(f"{what} is boolean (a mask?): pass the intensity {what}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ImageError(f"{what} dtype {arr.dtype} is not a number type")
    if arr.size == 0:
        raise ImageError(f"{what} is empty (shape {arr.shape})")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ImageError(f"{what} has {bad} NaN or infinite {unit}s: fill or mask them first")
    if arr.min() == arr.max():
        raise ImageError(f"{what} is constant (every {unit} = {arr.flat[0]}): nothing to segment")


def _as_array(value: Any, what: str) -> np.ndarray:
    """``value`` as an array; :class:`ImageError` for None, a path or text, and ragged nested lists."""
    if value is None:
        raise ImageError(f"no {what} given (got None)")
    if isinstance(value, (str, bytes, bytearray, os.PathLike)):
        raise ImageError(
            f"{what} {_show(value)} is a path or text, not pixels: read it first "
            "(napari_medsam.engine.io.read_image(path).array)"
        )
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:  # ragged nested lists, objects numpy cannot convert
        raise ImageError(f"{what} is not an array of pixels ({type(value).__name__}): {exc}") from None


def _dtype_first(arr: np.ndarray, what: str) -> None:
    # dtype problems are reported before shape problems (a bool mask of any shape says "boolean")
    if arr.dtype == bool:
        raise ImageError(f"{what} is boolean (a mask?): pass the intensity {what}")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ImageError(f"{what} dtype {arr.dtype} is not a number type")


def check_image(image: Any) -> tuple[np.ndarray, bool]:
    """Validate a 2D image; returns (array, is_rgb) with any alpha channel dropped.

    Accepts (H, W), (H, W, 1), (H, W, 3) and (H, W, 4) arrays of integer or float
    type. Raises :class:`ImageError` for anything else.
    """
    arr = _as_array(image, "image")
    _dtype_first(arr, "image")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = True
        arr = arr[..., :3]
    elif arr.ndim == 2:
        rgb = False
    else:
        hint = " (a volume: use segment_volume, or pass one slice)" if arr.ndim in (3, 4) else ""
        raise ImageError(f"expected a 2D image (H, W) or (H, W, 3|4), got shape {arr.shape}{hint}")
    if min(arr.shape[:2]) < MIN_SIDE:
        raise ImageError(f"image of shape {arr.shape} is too small: at least {MIN_SIDE} x {MIN_SIDE} pixels")
    _check_numeric(arr, "image", "pixel")
    return arr, rgb


def check_volume(volume: Any) -> tuple[np.ndarray, bool]:
    """Validate a volume; returns ((D, H, W) or (D, H, W, 3) array, is_rgb)."""
    arr = _as_array(volume, "volume")
    _dtype_first(arr, "volume")
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    rgb = False
    if arr.ndim == 2:
        raise ImageError(
            f"got a 2D image of shape {arr.shape}; 3D propagation needs a volume (D, H, W): "
            "segment a 2D image with MedSAM.segment, or add a slice axis"
        )
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and min(arr.shape[:2]) >= RGB_MIN_SIDE:
        raise ImageError(
            f"array of shape {arr.shape} looks like one RGB image (H, W, {arr.shape[-1]}), not a volume (D, H, W): "
            "segment it with MedSAM.segment"
        )
    if arr.ndim == 4 and arr.shape[-1] in (3, 4):
        rgb = True
        arr = arr[..., :3]
    elif arr.ndim != 3:
        raise ImageError(f"expected a volume (D, H, W) or an RGB volume (D, H, W, 3), got shape {arr.shape}")
    if arr.shape[0] < 1 or min(arr.shape[1:3]) < MIN_SIDE:
        raise ImageError(
            f"volume of shape {arr.shape} is too small: slices need at least {MIN_SIDE} x {MIN_SIDE} pixels"
        )
    _check_numeric(arr, "volume", "voxel")
    return arr, rgb


def check_planes(data: Any, rgb: bool = False) -> np.ndarray:
    """Validate a stack of planes ``(..., H, W)`` (``(..., H, W, 3|4)`` when ``rgb``) as a whole.

    For callers that already know the layout (a napari layer): no shape guessing,
    only the dtype, the plane size, NaN/inf and constant checks over all planes.
    """
    arr = _as_array(data, "image")
    _dtype_first(arr, "image")
    spatial = arr.shape[-3:-1] if rgb else arr.shape[-2:]
    if len(spatial) < 2 or (rgb and arr.shape[-1] not in (3, 4)):
        want = "(..., H, W, 3|4)" if rgb else "(..., H, W)"
        raise ImageError(f"expected planes {want}, got shape {arr.shape}")
    if min(spatial) < MIN_SIDE:
        raise ImageError(f"image of shape {arr.shape} is too small: at least {MIN_SIDE} x {MIN_SIDE} pixels")
    _check_numeric(arr[..., :3] if rgb else arr, "image", "pixel")
    return arr


# -- boxes --------------------------------------------------------------------------
def _coordinate(v: Any, box: Any) -> float:
    if isinstance(v, (bool, np.bool_)):
        raise BoxError(f"box coordinate {v!r} is a boolean, not a number, in box {_show(box)}")
    if isinstance(v, (int, np.integer)):
        try:
            return float(v)
        except OverflowError:
            raise BoxError(f"box coordinate {_show(v)} is too large for a pixel position in box {_show(box)}") from None
    if isinstance(v, (float, np.floating)):
        return float(v)
    raise BoxError(
        f"box coordinate {_show(v)} ({type(v).__name__}) is not a number in box {_show(box)}; "
        "a box is four numbers (x0, y0, x1, y1) or the text 'x0,y0,x1,y1'"
    )


def _box_row(row: Any, whole: Any) -> list[float]:
    if isinstance(row, str):
        return list(parse_box(row))
    if isinstance(row, np.ndarray):
        row = row.tolist()
    if not isinstance(row, Sequence):
        raise BoxError(f"a box is (x0, y0, x1, y1); got {_show(row)} in {_show(whole)}")
    vals = [_coordinate(v, row) for v in row]
    if len(vals) != 4:
        raise BoxError(f"a box is (x0, y0, x1, y1); got {len(vals)} values in {_show(row)}")
    return vals


def box_array(boxes: Any) -> np.ndarray:
    """One box or many, in any accepted form -> (N, 4) float64 (not yet ordered or clipped).

    Accepted: a 4-sequence or (4,) array of real numbers, an (N, 4) array or a
    sequence of boxes, or the text ``"x0,y0,x1,y1"`` (see :func:`parse_box`).
    Everything else (None, dicts, strings or bools as coordinates, nested or
    ragged lists, wrong lengths, NaN/inf, integers beyond float range) raises
    :class:`BoxError` naming the value.
    """
    if boxes is None:
        raise BoxError("no box given (got None): a box is (x0, y0, x1, y1)")
    if isinstance(boxes, str):
        return np.array([parse_box(boxes)], dtype=np.float64)
    if isinstance(boxes, (bytes, bytearray, Mapping, set, frozenset)):
        raise BoxError(
            f"a box is four numbers (x0, y0, x1, y1) or the text 'x0,y0,x1,y1'; got a {type(boxes).__name__}: "
            f"{_show(boxes)}"
        )
    arr: np.ndarray
    if isinstance(boxes, np.ndarray) and boxes.dtype.kind in "iuf":
        arr = boxes.astype(np.float64)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2 or arr.shape[1] != 4:
            raise BoxError(f"a box is (x0, y0, x1, y1); got an array of shape {boxes.shape}")
    else:
        if isinstance(boxes, np.ndarray):
            if boxes.dtype.kind in "bc":
                raise BoxError(f"box coordinates must be real numbers, got dtype {boxes.dtype}: {_show(boxes)}")
            items: Any = boxes.tolist()
        elif isinstance(boxes, Sequence):
            items = list(boxes)
        elif hasattr(boxes, "__array__"):  # a tensor or another array type
            return box_array(np.asarray(boxes))
        else:
            raise BoxError(
                f"a box is four numbers (x0, y0, x1, y1) or the text 'x0,y0,x1,y1'; got a {type(boxes).__name__}: "
                f"{_show(boxes)}"
            )
        if not isinstance(items, list | tuple) or len(items) == 0:
            raise BoxError(f"no box given: {_show(boxes)}" if not items else f"cannot read box {_show(boxes)}")
        nested = [isinstance(v, Sequence | np.ndarray) and not isinstance(v, str) for v in items]
        texts = [isinstance(v, str) and bool(_BOX_TEXT_SPLIT.search(v.strip())) for v in items]
        if any(nested) or all(texts):
            rows = [_box_row(v, boxes) for v in items]
        else:
            rows = [_box_row(items, boxes)]
        arr = np.array(rows, dtype=np.float64)
    if arr.shape[0] == 0:
        raise BoxError("no box given")
    if not np.isfinite(arr).all():
        raise BoxError(f"box has NaN or infinite coordinates: {arr.tolist()}")
    return arr


def normalize_boxes(boxes: Any, shape: tuple[int, int]) -> np.ndarray:
    """Boxes (x0, y0, x1, y1) in pixels -> (N, 4) float64, ordered and clipped to the image.

    x is the column, y the row; bounds are inclusive pixel indices, so
    ``x0 == x1`` is one pixel wide. Inverted boxes are reordered; boxes reaching
    outside are clipped. Anything :func:`box_array` refuses, or a box wholly
    outside the image, raises :class:`BoxError`.
    """
    arr = box_array(boxes)
    h, w = shape
    x0, x1 = np.minimum(arr[:, 0], arr[:, 2]), np.maximum(arr[:, 0], arr[:, 2])
    y0, y1 = np.minimum(arr[:, 1], arr[:, 3]), np.maximum(arr[:, 1], arr[:, 3])
    outside = (x1 < 0) | (x0 > w - 1) | (y1 < 0) | (y0 > h - 1)
    if outside.any():
        i = int(np.argmax(outside))
        raise BoxError(
            f"box {arr[i].tolist()} has no area inside the {w} x {h} image (x = column 0..{w - 1}, y = row 0..{h - 1})"
        )
    return np.stack(
        [np.clip(x0, 0, w - 1), np.clip(y0, 0, h - 1), np.clip(x1, 0, w - 1), np.clip(y1, 0, h - 1)], axis=1
    )


def check_box(box: Any, shape: tuple[int, int], what: str = "box") -> np.ndarray:
    """Exactly one box -> (4,) float64, ordered and clipped; :class:`BoxError` naming ``what`` otherwise."""
    try:
        arr = box_array(box)
    except BoxError as exc:
        raise BoxError(f"{what} must be one box (x0, y0, x1, y1), got {_show(box)}: {exc}") from None
    if arr.shape != (1, 4):
        raise BoxError(f"{what} must be one box (x0, y0, x1, y1), got {arr.shape[0]} boxes: {_show(box)}")
    return normalize_boxes(arr, shape)[0]


def parse_box(text: Any) -> Box:
    """``"x0,y0,x1,y1"`` (commas or spaces, optional brackets) or a 4-sequence -> four finite floats.

    The command line's and the prompts CSV's box form. Raises :class:`BoxError`.
    """
    if text is None or (isinstance(text, str) and not text.strip()):
        raise BoxError("box is empty: give 'x0,y0,x1,y1'")
    if isinstance(text, str):
        parts = [p for p in _BOX_TEXT_SPLIT.split(text.strip().strip("()[]").strip()) if p]
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            raise BoxError(f"box {text!r} is not 'x0,y0,x1,y1' (four numbers)") from None
        if len(vals) != 4:
            raise BoxError(f"box {text!r} has {len(vals)} values; a box is 'x0,y0,x1,y1'")
    else:
        arr = box_array(text)
        if arr.shape[0] != 1:
            raise BoxError(f"expected one box, got {arr.shape[0]}: {_show(text)}")
        vals = arr[0].tolist()
    if not all(math.isfinite(v) for v in vals):
        raise BoxError(f"box {text!r} has NaN or infinite coordinates")
    return (vals[0], vals[1], vals[2], vals[3])


# -- slice indices and ranges -----------------------------------------------------
def _integer(v: Any, what: str) -> int:
    if isinstance(v, (bool, np.bool_)):
        raise BoxError(f"{what} must be an integer slice index, got {v!r}")
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
        return int(v)
    if isinstance(v, str):
        try:
            f = float(v.strip())
        except ValueError:
            f = math.nan
        if math.isfinite(f) and f.is_integer():
            return int(f)
    raise BoxError(f"{what} must be an integer slice index, got {_show(v)}")


def check_index(z: Any, depth: int, what: str = "slice") -> int:
    """A slice index within ``0..depth-1`` (integral floats accepted); :class:`BoxError` otherwise."""
    if isinstance(z, str):
        raise BoxError(f"{what} must be an integer slice index, got {z!r}")
    zi = _integer(z, what)
    if not 0 <= zi < depth:
        raise BoxError(f"{what} {zi} is outside the volume: it has {depth} slices (0..{depth - 1}) along axis 0")
    return zi


def parse_z_range(value: Any, depth: int | None = None, what: str = "z_range") -> tuple[int, int]:
    """``"first,last"`` or a (first, last) pair -> (min, max) slice indices; :class:`BoxError` otherwise.

    With ``depth``, both ends must lie in the volume (``0..depth-1``).
    """
    items: Any = value
    if isinstance(value, str):
        items = [p for p in re.split(r"[,\s]+", value.strip().strip("()[]").strip()) if p]
    elif isinstance(value, np.ndarray):
        items = value.tolist()
    if not isinstance(items, Sequence) or isinstance(items, str) or len(items) != 2:
        raise BoxError(f"{what} must be 'first,last' (two slice indices), got {_show(value)}")
    first, last = (_integer(v, what) for v in items)
    first, last = min(first, last), max(first, last)
    if depth is not None and (first < 0 or last >= depth):
        raise BoxError(f"{what} {first}..{last} reaches outside the volume's {depth} slices (0..{depth - 1})")
    return first, last


__all__ = [
    "MIN_SIDE",
    "RGB_MIN_SIDE",
    "box_array",
    "check_box",
    "check_image",
    "check_index",
    "check_planes",
    "check_volume",
    "normalize_boxes",
    "parse_box",
    "parse_z_range",
]
