"""Undo/redo of label edits as exact patches (pure numpy; no Qt, no napari).

The patches themselves (:class:`LabelPatch`, :func:`apply_mask`, :func:`bounding_region`) live in
:mod:`napari_medsam.engine.labels`, shared with sessions and 3D propagation; this module holds
the user's actions and the stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from napari_medsam.engine.labels import LabelPatch, apply_mask, bounding_region

__all__ = ["Edit", "History", "LabelPatch", "apply_mask", "bounding_region"]


@dataclass
class Edit:
    """One user action: label patches plus the box-layer state before and after."""

    name: str
    patches: list[LabelPatch] = field(default_factory=list)
    boxes_before: Any = None
    boxes_after: Any = None


class History:
    """Linear undo/redo stack of :class:`Edit` objects."""

    def __init__(self, limit: int = 200):
        self.limit = limit
        self._undo: list[Edit] = []
        self._redo: list[Edit] = []
        self._merge: Edit | None = None

    def push(self, edit: Edit) -> None:
        merge, self._merge = self._merge, None
        if merge is not None and self._undo and self._undo[-1] is merge:  # one step: undo restores both
            self._undo.pop()
            edit = Edit(edit.name, merge.patches + edit.patches, merge.boxes_before, edit.boxes_after)
        self._undo.append(edit)
        del self._undo[: -self.limit]
        self._redo.clear()

    def merge_next(self, edit: Edit) -> None:
        """The next :meth:`push` joins ``edit`` into one step, if ``edit`` is still the last one done
        (a box edit and the re-propagation it started, :mod:`.steer_boxes`)."""
        self._merge = edit

    @property
    def last(self) -> Edit | None:
        """The edit an undo would take back."""
        return self._undo[-1] if self._undo else None

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def undo(self) -> Edit | None:
        if not self._undo:
            return None
        edit = self._undo.pop()
        self._redo.append(edit)
        return edit

    def redo(self) -> Edit | None:
        if not self._redo:
            return None
        edit = self._redo.pop()
        self._undo.append(edit)
        return edit
