"""What a browser edits on one image: its label map, its boxes, undo and redo.

The boxes are kept in the session record's format (``engine.session.boxes_from_layer``:
``order``, ``label``, ``type``, ``slice``, ``box``, ``vertices``), so the napari
session opens what the browser saved and the other way round.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from napari_medsam.engine.errors import MedSAMError
from napari_medsam.engine.labels import vertices_from_box

HISTORY = 50


class EditError(MedSAMError, ValueError):
    """An edit names an object or slice the image does not have."""


def box_entry(order: int, label: int, box: Sequence[float], z: int | None) -> dict[str, Any]:
    """A record box: x0, y0, x1, y1 (inclusive pixels) as napari rectangle vertices too."""
    x0, y0, x1, y1 = (float(v) for v in box)
    verts = vertices_from_box((x0, y0, x1, y1), () if z is None else (z,))
    return {
        "order": order,
        "label": int(label),
        "type": "rectangle",
        "slice": z,
        "box": [x0, y0, x1, y1],
        "vertices": verts,
    }


@dataclass
class ImageWork:
    labels: np.ndarray  # spatial shape: (H, W) or (D, H, W)
    boxes: list[dict[str, Any]] = field(default_factory=list)
    undo_stack: list[tuple[np.ndarray, list[dict[str, Any]], str]] = field(default_factory=list)
    redo_stack: list[tuple[np.ndarray, list[dict[str, Any]], str]] = field(default_factory=list)
    version: int = 0

    @classmethod
    def empty(cls, shape: tuple[int, ...]) -> ImageWork:
        return cls(np.zeros(shape, np.uint16))

    @property
    def volume(self) -> bool:
        return self.labels.ndim == 3

    def next_label(self) -> int:
        top = int(self.labels.max()) if self.labels.size else 0
        return max([top] + [int(b["label"]) for b in self.boxes]) + 1

    def _plane(self, z: int | None) -> np.ndarray:
        if not self.volume:
            return self.labels
        if z is None or not 0 <= int(z) < self.labels.shape[0]:
            raise EditError(f"slice {z} is not in 0..{self.labels.shape[0] - 1}")
        return self.labels[int(z)]

    def _push(self, what: str) -> None:
        self.undo_stack.append((self.labels.copy(), [dict(b) for b in self.boxes], what))
        del self.undo_stack[:-HISTORY]
        self.redo_stack.clear()
        self.version += 1

    def _fit(self, label: int) -> None:
        if label > np.iinfo(self.labels.dtype).max:
            self.labels = self.labels.astype(np.uint32)

    def _renumber(self) -> None:
        for i, b in enumerate(self.boxes):
            b["order"] = i

    def add(self, box: Sequence[float], z: int | None, mask: np.ndarray) -> int:
        """A new object from ``box`` and its mask (drawn over what is there); returns its label id."""
        plane = self._plane(z)
        label = self.next_label()
        self._push("add")
        self._fit(label)
        plane = self._plane(z)
        plane[mask] = label
        self.boxes.append(box_entry(len(self.boxes), label, box, z))
        return label

    def find(self, label: int, z: int | None) -> int:
        for i, b in enumerate(self.boxes):
            if int(b["label"]) == int(label) and (not self.volume or b.get("slice") == z):
                return i
        raise EditError(f"no box of object {label}" + (f" on slice {z}" if self.volume else ""))

    def edit(self, label: int, box: Sequence[float], z: int | None, mask: np.ndarray) -> None:
        """Re-segment object ``label`` from a moved box: its pixels on that slice are replaced."""
        i = self.find(label, z)
        self._push("edit")
        plane = self._plane(z)
        plane[plane == label] = 0
        plane[mask] = label
        self.boxes[i] = box_entry(i, label, box, z)

    def delete(self, label: int) -> None:
        if not any(int(b["label"]) == int(label) for b in self.boxes) and not (self.labels == label).any():
            raise EditError(f"no object {label}")
        self._push("delete")
        self.labels[self.labels == label] = 0
        self.boxes = [b for b in self.boxes if int(b["label"]) != int(label)]
        self._renumber()

    def undo(self) -> str | None:
        if not self.undo_stack:
            return None
        labels, boxes, what = self.undo_stack.pop()
        self.redo_stack.append((self.labels, self.boxes, what))
        self.labels, self.boxes = labels, boxes
        self.version += 1
        return what

    def redo(self) -> str | None:
        if not self.redo_stack:
            return None
        labels, boxes, what = self.redo_stack.pop()
        self.undo_stack.append((self.labels, self.boxes, what))
        self.labels, self.boxes = labels, boxes
        self.version += 1
        return what

    def objects(self) -> list[dict[str, Any]]:
        ids, counts = np.unique(self.labels, return_counts=True)
        pixels = {int(i): int(c) for i, c in zip(ids, counts, strict=True) if i > 0}
        out = {}
        for b in self.boxes:
            out.setdefault(
                int(b["label"]), {"label": int(b["label"]), "pixels": pixels.get(int(b["label"]), 0), "boxes": []}
            )
            out[int(b["label"])]["boxes"].append({"box": b["box"], "slice": b.get("slice")})
        for i, c in pixels.items():
            out.setdefault(i, {"label": i, "pixels": c, "boxes": []})
        return [out[k] for k in sorted(out)]
