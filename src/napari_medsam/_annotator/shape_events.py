"""Step 1, shape events: mouse drags and keys on the boxes layer become preview / accept calls.

:class:`ShapeEvents` hooks one napari ``Shapes`` layer: every mouse move of a drag
on a rectangle calls ``on_preview(shape_index, t_event)``, the release calls
``on_accept(shape_index)``; removing boxes calls ``on_removing(event)``; a change of
the plane on screen calls ``on_step()``. It holds no model and no labels.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)
DRAG_MODES = ("add_rectangle", "select", "direct")


class ShapeEvents:
    """Mouse and key bindings of one boxes layer (GUI thread).

    Args:
        viewer: the napari viewer (its dims tell the plane on screen).
        enabled: the drag is ignored while this returns False (no image attached).
        on_preview: ``(shape_index, t_event)`` on every move of a drag on a rectangle.
        on_accept: ``(shape_index)`` on the release of a drag that moved.
        on_removing: the ``data`` event of boxes about to be removed.
        on_step: the plane on screen changed.
        keys: napari key name -> callable(), bound on the boxes layer.
    """

    def __init__(
        self,
        viewer,
        *,
        enabled: Callable[[], bool],
        on_preview: Callable[[int, float], None],
        on_accept: Callable[[int], None],
        on_removing: Callable[[object], None],
        on_step: Callable[[], None],
        keys: dict[str, Callable[[], None]] | None = None,
    ):
        self.viewer = viewer
        self.enabled = enabled
        self.on_preview = on_preview
        self.on_accept = on_accept
        self.on_removing = on_removing
        self.on_step = on_step
        self.keys = dict(keys or {})
        self.layer = None

    def hook(self, layer) -> None:
        """Listen to ``layer`` (and stop listening to the previous one)."""
        if self.layer is layer:
            return
        self.unhook()
        self.layer = layer
        layer.mouse_drag_callbacks.append(self._drag)
        layer.events.mode.connect(self._keep_drag_last)
        layer.events.data.connect(self._on_data)
        self.viewer.dims.events.current_step.connect(self._on_step)
        for key, action in self.keys.items():
            layer.bind_key(key, lambda _layer, action=action: action(), overwrite=True)

    def unhook(self) -> None:
        """Detach from the layer (a new annotator, e.g. after a model change, takes over)."""
        layer, self.layer = self.layer, None
        if layer is None:
            return
        if self._drag in layer.mouse_drag_callbacks:
            layer.mouse_drag_callbacks.remove(self._drag)
        layer.events.mode.disconnect(self._keep_drag_last)
        layer.events.data.disconnect(self._on_data)
        self.viewer.dims.events.current_step.disconnect(self._on_step)

    def active_shape(self) -> int | None:
        """The box being drawn (the newest one) or the single selected box being edited."""
        layer = self.layer
        if layer.mode == "add_rectangle":
            return len(layer.data) - 1 if len(layer.data) else None
        sel = list(layer.selected_data)
        return sel[0] if len(sel) == 1 else None

    def _on_step(self, event=None) -> None:
        self.on_step()

    def _on_data(self, event) -> None:
        if getattr(event, "action", None) == "removing":
            self.on_removing(event)

    def _keep_drag_last(self, event=None) -> None:
        """napari re-appends its mode callback on a mode change; ours must run after it."""
        cbs = self.layer.mouse_drag_callbacks
        if self._drag in cbs:
            cbs.remove(self._drag)
        cbs.append(self._drag)

    def _drag(self, layer, event):
        """Mouse drag on the box layer: preview on every move, accept on release."""
        if not self.enabled() or layer.mode not in DRAG_MODES:
            return
        yield
        moved = False
        while event.type == "mouse_move":
            idx = self.active_shape()
            if idx is not None and layer.shape_type[idx] == "rectangle":
                moved = True
                self.on_preview(idx, time.perf_counter())
            yield
        idx = self.active_shape()
        if moved and idx is not None:
            self.on_accept(idx)
