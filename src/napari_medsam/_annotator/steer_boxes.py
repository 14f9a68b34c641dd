"""3D steering, step 3: every propagated slice shows its box; dragging one re-propagates from it.

After a propagation, each slice it wrote gets the box that prompted it on the boxes layer
(``kind`` = ``propagated``: thin and cyan, on its own slice only; the user's boxes are
``key``). Dragging (moving, resizing) a propagated box re-segments that slice as any box
edit does (live preview during the drag); then :class:`SteerBoxes` makes it a key box and
re-propagates *away from the object's key slices*: the slices between it and the nearest
key slice keep their labels, those on the far side are cleared and segmented again from
the edited box (inside the z-range if one is set). Between two key slices, the edited box
becomes a third key and only the slices between its two neighbours are redone. The edit
and its re-propagation are one undo step (:meth:`~.history.History.merge_next`).

No model and no Qt here: the functions work on :func:`~.layers.boxes_state` tuples; the
propagation (:mod:`.propagation`) and the steering (:mod:`.steering`) call them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from napari_medsam.engine.labels import box_from_vertices

from .history import LabelPatch, apply_mask, bounding_region
from .layers import KEY, PROPAGATED, set_box_labels

log = logging.getLogger(__name__)
#: name of the undo step of a box edit plus its re-propagation
STEER = "steer"


def box_vertices(z: int, box) -> np.ndarray:
    """The (4, 3) rectangle vertices (z, row, col) of ``box`` = (x0, y0, x1, y1) on slice ``z``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    return np.array([[z, y0, x0], [z, y0, x1], [z, y1, x1], [z, y1, x0]], float)


def box_slice(vertices) -> int | None:
    plane = box_from_vertices(vertices).plane
    return int(plane[0]) if len(plane) == 1 else None


def _kinds(state) -> np.ndarray:
    return np.asarray(state[3], object) if len(state) > 3 else np.full(len(state[0]), KEY, object)


def propagated_boxes(records: Iterable[dict], skip: Iterable[int]) -> dict[int, tuple[float, ...]]:
    """``{slice: box}`` of a propagation's trace (``stats["slices"]``): every kept, non-empty slice
    whose box was not the user's (``skip``: the slices not written, such as the key slice)."""
    skip = set(skip)
    return {
        int(r["z"]): tuple(float(v) for v in r["box"])
        for r in records
        if r["kept"] and r["area"] > 0 and r["prompt"] != "key" and int(r["z"]) not in skip
    }


def with_propagated(state, label_id: int, boxes: dict[int, tuple[float, ...]], owned: Callable[[int], bool]):
    """``state`` (a boxes_state) with object ``label_id``'s propagated boxes replaced.

    Its propagated boxes on the slices in ``boxes`` or where ``owned(z)`` go; one propagated
    box per slice of ``boxes`` comes in (appended, so the other boxes keep their rows' order).
    """
    data, types, labels, kinds = list(state[0]), list(state[1]), np.asarray(state[2]), _kinds(state)
    keep = []
    for i, vertices in enumerate(data):
        z = box_slice(vertices)
        mine = int(labels[i]) == label_id and kinds[i] == PROPAGATED and z is not None
        keep.append(not (mine and (z in boxes or owned(z))))
    rows = [i for i, k in enumerate(keep) if k]
    new_z = sorted(boxes)
    return (
        [data[i] for i in rows] + [box_vertices(z, boxes[z]) for z in new_z],
        [types[i] for i in rows] + ["rectangle"] * len(new_z),
        np.concatenate([labels[rows].astype(np.int64), np.full(len(new_z), label_id, np.int64)]),
        np.concatenate([kinds[rows], np.full(len(new_z), PROPAGATED, object)]),
    )


def same_state(a, b) -> bool:
    if len(a[0]) != len(b[0]) or list(a[1]) != list(b[1]):
        return False
    if not np.array_equal(a[2], b[2]) or list(_kinds(a)) != list(_kinds(b)):
        return False
    return all(np.array_equal(x, y) for x, y in zip(a[0], b[0], strict=True))


def changed_box(before, after) -> int | None:
    """The one row whose vertices differ between two boxes states of the same boxes (else None)."""
    if before is None or after is None or len(before[0]) != len(after[0]):
        return None
    rows = [i for i, (x, y) in enumerate(zip(before[0], after[0], strict=True)) if not np.array_equal(x, y)]
    return rows[0] if len(rows) == 1 else None


def clear_slices(labels: np.ndarray, label_id: int, slices: Iterable[int]) -> list[LabelPatch]:
    """Erase ``label_id`` on ``slices`` of a (D, H, W) label array; the patches for undo."""
    patches = []
    for z in slices:
        region = bounding_region(labels[z] == label_id, (z,))
        if region is not None:
            shape = tuple(r.stop - r.start for r in region)
            patches.append(apply_mask(labels, region, np.zeros(shape, bool), label_id))
    return patches


class SteerBoxes:
    """Re-propagation from a dragged propagated box (GUI thread; see the module docstring).

    Args:
        steering: the :class:`~.steering.Steering` (its ``controller``, ``z_range``, ``depth()``
            and ``key_boxes(label_id)``).
    """

    def __init__(self, steering: Any):
        self.steering = steering

    def on_edit(self) -> bool:
        """Called after an ``edit`` commit: re-propagate if the edited box was a propagated one."""
        c = self.steering.controller
        edit = c.history.last
        if edit is None or edit.name != "edit":
            return False
        i = changed_box(edit.boxes_before, edit.boxes_after)
        if i is None or _kinds(edit.boxes_before)[i] != PROPAGATED:
            return False
        label_id = int(edit.boxes_after[2][i])
        z = box_slice(edit.boxes_after[0][i])
        depth = self.steering.depth()
        if label_id <= 0 or z is None or depth is None:
            return False
        if c.propagation is not None and not c.propagation.done.is_set():  # the box stays a propagated one
            c.report(f"slice {z} re-segmented; a propagation is running, so nothing was re-propagated")
            return False
        kinds = _kinds(edit.boxes_after).copy()
        kinds[i] = KEY  # the edited box is the user's now (committed with the re-propagation)
        set_box_labels(c.boxes, c.boxes.features["label"].to_numpy(), kinds=kinds)
        opts = self.options(label_id, z, depth)
        clear = [s for s in range(opts["owned"][0], opts["owned"][1] + 1) if s not in opts["skip"]]
        patches = clear_slices(c.labels.data, label_id, clear)
        c.labels.refresh()
        c.boxes.selected_data = {i}  # propagate_selected starts from the selected box
        log.debug("steering label %d from slice %d: %s", label_id, z, opts)
        c.propagate_selected(patches=patches, merge=edit, name=STEER, **opts)
        return True

    def options(self, label_id: int, z: int, depth: int) -> dict[str, Any]:
        """Propagation options for a re-propagation of ``label_id`` from its edited box on slice ``z``."""
        keys = {k: b for k, b in self.steering.key_boxes(label_id).items() if k != z}
        rng = self.steering.z_range
        lo, hi = rng if rng is not None and rng[0] <= z <= rng[1] else (0, depth - 1)
        below, above = [k for k in keys if k < z], [k for k in keys if k > z]
        opts: dict[str, Any] = {}
        if below and above:  # between two key slices: only the slices between its neighbours
            k0, k1 = max(below), min(above)
            first, last = k0, k1
            opts["key_boxes"] = {k0: keys[k0], z: self.steering.key_boxes(label_id)[z], k1: keys[k1]}
            owned, skip = (k0 + 1, k1 - 1), {k0, z, k1}
        elif below:  # above the key slices: upward only
            first, last, owned, skip = z, hi, (z + 1, hi), {z}
        elif above:
            first, last, owned, skip = lo, z, (lo, z - 1), {z}
        else:  # no other key box: the whole object again
            first, last, owned, skip = lo, hi, (lo, hi), {z}
        opts.update(z_range=(first, last), owned=owned, skip=skip)
        return opts


def erase_removed(labels: np.ndarray, state, rows: Iterable[int]) -> list[LabelPatch]:
    """Label patches for removing boxes ``rows`` of ``state``: a propagated box takes only its
    slice's label with it, a key box its whole object."""
    data, ids, kinds = state[0], state[2], _kinds(state)
    patches: list[LabelPatch] = []
    for i in rows:
        label_id = int(ids[i]) if i < len(ids) else 0
        if label_id <= 0:
            continue
        z = box_slice(data[i]) if kinds[i] == PROPAGATED and labels.ndim == 3 else None
        if z is not None:
            patches += clear_slices(labels, label_id, [z])
            continue
        region = bounding_region(labels == label_id)
        if region is not None:
            patches.append(apply_mask(labels, region, np.zeros(labels[region].shape, bool), label_id))
    return patches
