"""Undo/redo of label edits as exact patches (pure numpy; no Qt, no napari)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import numpy as np


@dataclass
class LabelPatch:
    """The values of a rectangular region of a label array before and after an edit."""

    region: Tuple[slice, ...]
    before: np.ndarray
    after: np.ndarray


@dataclass
class Edit:
    """One user action: label patches plus the box-layer state before and after."""

    name: str
    patches: List[LabelPatch] = field(default_factory=list)
    boxes_before: Any = None
    boxes_after: Any = None


def bounding_region(mask: np.ndarray, leading: Tuple[int, ...] = ()) -> Optional[Tuple[slice, ...]]:
    """Smallest slice tuple covering ``mask`` (prefixed by fixed ``leading`` indices)."""
    if not mask.any():
        return None
    region = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        region.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(slice(i, i + 1) for i in leading) + tuple(region)


def apply_mask(labels: np.ndarray, region: Tuple[slice, ...], new: np.ndarray, label_id: int, clear_id: bool = True, overwrite: bool = False) -> LabelPatch:
    """Write ``label_id`` where ``new`` is set inside ``region``; return the patch for undo.

    Args:
        labels: the label array, edited in place.
        region: where ``new`` lies (same shape as ``labels[region]``).
        new: bool mask of the object within the region.
        label_id: id to write.
        clear_id: first clear pixels of ``label_id`` inside the region (re-segmentation).
        overwrite: paint over other objects; by default they are kept.
    """
    view = labels[region]
    before = view.copy()
    after = before.copy()
    if clear_id:
        after[after == label_id] = 0
    paint = new.reshape(after.shape)
    if not overwrite:
        paint = paint & (after == 0)
    after[paint] = label_id
    labels[region] = after
    return LabelPatch(region, before, after)


class History:
    """Linear undo/redo stack of :class:`Edit` objects."""

    def __init__(self, limit: int = 200):
        self.limit = limit
        self._undo: List[Edit] = []
        self._redo: List[Edit] = []

    def push(self, edit: Edit) -> None:
        self._undo.append(edit)
        del self._undo[: -self.limit]
        self._redo.clear()

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def undo(self) -> Optional[Edit]:
        if not self._undo:
            return None
        edit = self._undo.pop()
        self._redo.append(edit)
        return edit

    def redo(self) -> Optional[Edit]:
        if not self._redo:
            return None
        edit = self._redo.pop()
        self._undo.append(edit)
        return edit
