"""Image and box validation: everything a user can pass wrong, caught with a clear message."""

from __future__ import annotations

from typing import Iterable, Tuple

import numpy as np

from .errors import BoxError, ImageError

MIN_SIDE = 2


def check_image(image) -> Tuple[np.ndarray, bool]:
    """Validate a 2D image; returns (array, is_rgb) with any alpha channel dropped.

    Accepts (H, W), (H, W, 1), (H, W, 3) and (H, W, 4) arrays of integer or float
    type. Raises :class:`ImageError` for anything else.
    """
    arr = np.asarray(image)
    if arr.dtype == bool:
        raise ImageError("image is boolean (a mask?): pass the intensity image")
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise ImageError(f"image dtype {arr.dtype} is not a number type")
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
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise ImageError(f"image has {bad} NaN or infinite pixels: fill or mask them first")
    if arr.min() == arr.max():
        raise ImageError(f"image is constant (every pixel = {arr.flat[0]}): nothing to segment")
    return arr, rgb


def normalize_boxes(boxes: Iterable, shape: Tuple[int, int]) -> np.ndarray:
    """Boxes (x0, y0, x1, y1) in pixels -> (N, 4) float64, ordered and clipped to the image.

    x is the column, y the row; bounds are inclusive pixel indices. Inverted boxes
    are reordered; boxes reaching outside are clipped. NaN, wrong length, or no
    area left inside the image raise :class:`BoxError`.
    """
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise BoxError(f"a box is (x0, y0, x1, y1); got an array of shape {np.shape(boxes)}")
    if arr.shape[0] == 0:
        raise BoxError("no box given")
    if not np.isfinite(arr).all():
        raise BoxError(f"box has NaN or infinite coordinates: {arr.tolist()}")
    h, w = shape
    x0, x1 = np.minimum(arr[:, 0], arr[:, 2]), np.maximum(arr[:, 0], arr[:, 2])
    y0, y1 = np.minimum(arr[:, 1], arr[:, 3]), np.maximum(arr[:, 1], arr[:, 3])
    out = np.stack([np.clip(x0, 0, w - 1), np.clip(y0, 0, h - 1), np.clip(x1, 0, w - 1), np.clip(y1, 0, h - 1)], axis=1)
    empty = (out[:, 2] <= out[:, 0]) | (out[:, 3] <= out[:, 1])
    if empty.any():
        i = int(np.argmax(empty))
        raise BoxError(
            f"box {arr[i].tolist()} has no area inside the {w} x {h} image (x = column, y = row)"
        )
    return out
