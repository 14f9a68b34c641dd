"""Mask metrics: Dice and normalised surface Dice (NSD)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two masks; 1.0 when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def nsd(a: np.ndarray, b: np.ndarray, tolerance: float = 2.0, spacing: Sequence[float] | None = None) -> float:
    """Normalised surface Dice at ``tolerance`` (in units of ``spacing``, default pixels)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if not a.any() and not b.any():
        return 1.0
    if not a.any() or not b.any():
        return 0.0
    sa, sb = _surface(a), _surface(b)
    da = ndimage.distance_transform_edt(~sa, sampling=spacing)
    db = ndimage.distance_transform_edt(~sb, sampling=spacing)
    close = (db[sa] <= tolerance).sum() + (da[sb] <= tolerance).sum()
    return float(close / (sa.sum() + sb.sum()))


__all__ = ["dice", "nsd"]
