"""3D steering in the viewer: the object's z-range in two keystrokes, and boxes on several key slices.

The user tells propagation where the object ends and what it looks like on other slices:

- ``[`` on a slice sets the first slice of the object's z-range there, ``]`` the last;
  ``\\`` (or the widget's button) clears it. The range is shown in the widget's status
  and as text in the viewer; propagation never leaves it (``z_range`` of
  :func:`~napari_medsam.engine.volume.propagate`).
- Key slices: every box holding the same label id is a box of one object. ``K``
  makes the next box drawn join the object of the selected (or last) box, on any
  slice; propagating then runs between the key slices from both sides with
  interpolated boxes and beyond the outermost ones (``key_boxes``).
- Propagated boxes: after a propagation every slice it wrote shows its box (cyan,
  ``kind`` = ``propagated``); dragging one re-segments that slice and re-propagates
  outward from it, away from the key slices (:mod:`.steer_boxes`), in one undo step.

:class:`Steering` holds no model and no labels: it reads the boxes of a
:class:`~.annotator.BoxAnnotator` and hands the engine's options to its
``propagate_selected``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from napari.utils.notifications import show_error

from napari_medsam.engine.labels import box_from_vertices

from .layers import PROPAGATED, box_kinds
from .steer_boxes import SteerBoxes

log = logging.getLogger(__name__)

#: napari key names of the steering actions (bound on the viewer and on the boxes layer)
KEY_FIRST = "["
KEY_LAST = "]"
KEY_CLEAR = "\\"
KEY_JOIN = "K"
KEY_PROPAGATE = "Shift-P"
HELP = (
    f"3D: '{KEY_FIRST}' / '{KEY_LAST}' set the first / last slice of the object's z-range at the slice on "
    f"screen ('{KEY_CLEAR}' clears it); propagation stays inside it. Boxes with the same label id are one "
    f"object's key slices: '{KEY_JOIN}' makes the next box you draw join the selected (or last) box's object; "
    f"propagation ({KEY_PROPAGATE}) then runs between key slices from both sides and beyond the outermost ones. "
    "Each propagated slice shows its box (cyan): drag one to re-segment that slice and re-propagate outward from it"
)


def text_overlay(viewer):
    """The viewer's text overlay (napari >= 0.9: ``viewer.canvas.overlays``), or None."""
    overlays = getattr(getattr(viewer, "canvas", None), "overlays", None)
    if overlays is not None and "text" in overlays:
        return overlays["text"]
    return getattr(viewer, "text_overlay", None)


class Steering:
    """Z-range and key slices of the annotator's objects (GUI thread).

    Args:
        viewer: the napari viewer.
        report: callable(text) for the widget's status line.
    """

    def __init__(self, viewer, report: Callable[[str], None] = lambda text: None):
        self.viewer = viewer
        self.report = report
        self.controller: Any = None
        self.first: int | None = None
        self.last: int | None = None
        self._join: tuple[int, int] | None = None  # (object id, next_label to restore) for the next box
        self._overlay = False
        self.steer_boxes = SteerBoxes(self)
        actions = {
            KEY_FIRST: self.set_first,
            KEY_LAST: self.set_last,
            KEY_CLEAR: self.clear,
            KEY_JOIN: self.join_selected,
        }
        self.keys: dict[str, Callable[[], Any]] = dict(actions)
        for key, action in actions.items():
            viewer.bind_key(key, lambda _viewer, action=action: action(), overwrite=True)

    # -- set-up -------------------------------------------------------------------
    def attach(self, controller) -> None:
        """Steer ``controller`` (a BoxAnnotator just attached to an image)."""
        if self.controller is not controller:
            if self.controller is not None and self._on_change in self.controller.on_change:
                self.controller.on_change.remove(self._on_change)
            controller.on_change.append(self._on_change)
            self.controller = controller
            self._join = None
        depth = self.depth()
        if depth is None or (self.last is not None and self.last >= depth):
            self.first = self.last = None  # the range of another volume
        boxes = controller.boxes
        if boxes is not None:
            keys = dict(self.keys, **{KEY_PROPAGATE: self.propagate})  # the layer's keys win over the viewer's
            for key, action in keys.items():
                boxes.bind_key(key, lambda _layer, action=action: action(), overwrite=True)
        self._show()

    def depth(self) -> int | None:
        """Number of slices of the attached volume (None: no 3D image)."""
        c = self.controller
        if c is None or c.image is None or len(c.spatial) != 3:
            return None
        return int(c.spatial[0])

    # -- z-range --------------------------------------------------------------------
    @property
    def z_range(self) -> tuple[int, int] | None:
        """The inclusive (first, last) slices the user set; an unset end is the volume's."""
        depth = self.depth()
        if depth is None or (self.first is None and self.last is None):
            return None
        first = 0 if self.first is None else self.first
        last = depth - 1 if self.last is None else self.last
        return (min(first, last), max(first, last))

    def _current(self) -> int | None:
        if self.depth() is None:
            show_error("MedSAM: a z-range needs a 3D image")
            return None
        return int(self.controller.current_index()[0])

    def set_first(self) -> None:
        """The slice on screen is the object's first slice."""
        z = self._current()
        if z is not None:
            self.first = z
            if self.last is not None and self.last < z:
                self.first, self.last = self.last, z
            self._show()

    def set_last(self) -> None:
        """The slice on screen is the object's last slice."""
        z = self._current()
        if z is not None:
            self.last = z
            if self.first is not None and self.first > z:
                self.first, self.last = z, self.first
            self._show()

    def clear(self) -> None:
        """Forget the z-range: propagation runs until its stop rule."""
        self.first = self.last = None
        self._show()

    def describe(self) -> str:
        rng = self.z_range
        return "z-range: none" if rng is None else f"z-range: slices {rng[0]}..{rng[1]}"

    def _show(self) -> None:
        rng = self.z_range
        text = self.describe()
        self.report(text)
        overlay = text_overlay(self.viewer)
        if overlay is None:
            return
        if rng is not None:
            overlay.text = f"MedSAM {text}"
            overlay.visible = self._overlay = True
        elif self._overlay:
            overlay.text = ""
            overlay.visible = self._overlay = False

    # -- key slices -------------------------------------------------------------------
    def _pick(self) -> int | None:
        """The selected box, else the last one the user drew."""
        boxes = self.controller.boxes if self.controller is not None else None
        if boxes is None or not len(boxes.data):
            return None
        sel = sorted(boxes.selected_data)
        drawn = [i for i, k in enumerate(box_kinds(boxes)) if k != PROPAGATED]
        return sel[0] if sel else (drawn[-1] if drawn else len(boxes.data) - 1)

    def key_boxes(self, label_id: int) -> dict[int, tuple[float, ...]]:
        """``{slice: box}`` of every key box (not propagated) of object ``label_id`` (the latest box
        of a slice wins)."""
        boxes = self.controller.boxes
        ids = boxes.features["label"].to_numpy()
        kinds = box_kinds(boxes)
        out: dict[int, tuple[float, ...]] = {}
        for i, vertices in enumerate(boxes.data):
            if int(ids[i]) == label_id and boxes.shape_type[i] == "rectangle" and kinds[i] != PROPAGATED:
                lead, box = box_from_vertices(vertices)
                if len(lead) == 1:
                    out[int(lead[0])] = tuple(float(v) for v in box)
        return out

    def join_selected(self) -> None:
        """The next box drawn becomes a key slice of the selected (or last) box's object."""
        idx = self._pick()
        c = self.controller
        label_id = int(c.boxes.features["label"].iloc[idx]) if idx is not None else 0
        if label_id <= 0:
            show_error("MedSAM: draw and accept a box of the object first")
            return
        restore = self._join[1] if self._join is not None else c.next_label
        self._join = (label_id, max(restore, int(c.labels.data.max()) + 1))
        c.next_label = label_id
        self.report(f"next box: a key slice of label {label_id}")

    def _on_change(self, what: str) -> None:
        if what == "edit" and self.depth() is not None:
            self.steer_boxes.on_edit()
        if self._join is not None and what == "accept":  # the joining box is in: new boxes are new objects
            self.controller.next_label = self._join[1]
            self._join = None

    # -- propagation ------------------------------------------------------------------
    def options(self, label_id: int, z: int) -> dict[str, Any] | None:
        """Engine options for propagating object ``label_id`` from its box on slice ``z`` (None: refused)."""
        opts: dict[str, Any] = {}
        keys = self.key_boxes(label_id) if label_id > 0 else {}
        if len(keys) > 1:
            opts["key_boxes"] = keys
        rng = self.z_range
        if rng is not None:
            outside = sorted(k for k in {z, *keys} if not rng[0] <= k <= rng[1])
            if outside:
                show_error(f"MedSAM: the {self.describe()} does not hold the box on slice(s) {outside}")
                self.report(f"{self.describe()} does not hold the box on slice(s) {outside}: widen or clear it")
                return None
            opts["z_range"] = rng
        return opts

    def propagate(self, **options) -> None:
        """Propagate the selected (or last) box's object inside the z-range, through its key slices."""
        c = self.controller
        idx = self._pick() if c is not None and c.image is not None and self.depth() is not None else None
        if idx is None:
            if c is not None:
                c.propagate_selected(**options)  # it says what is missing
            return
        lead, _ = box_from_vertices(c.boxes.data[idx])
        label_id = int(c.boxes.features["label"].iloc[idx])
        opts = self.options(label_id, int(lead[0]))
        if opts is None:
            return
        keys = opts.get("key_boxes", {})
        log.debug("propagating label %d, %s, key slices %s", label_id, self.describe(), sorted(keys))
        unselected = not c.boxes.selected_data
        if unselected:
            c.boxes.selected_data = {idx}  # propagate_selected starts from the selected box
        c.propagate_selected(**{**opts, **options})
        if unselected:
            c.boxes.selected_data = set()
