"""Helpers for driving a real napari canvas with mouse events (tests and benchmarks)."""

from __future__ import annotations

import time

import numpy as np
from vispy.app.canvas import MouseEvent


def canvas_of(viewer):
    return viewer.window._qt_viewer.canvas


def data_to_canvas(viewer, layer, row: float, col: float):
    """Canvas pixel (x, y) of image data coordinate (row, col) on the displayed plane."""
    canvas = canvas_of(viewer)
    world = np.asarray(layer.data_to_world([*([0] * (layer.ndim - 2)), row, col]))[-2:]
    tr = canvas.view.transform * canvas.view.scene.transform
    mapped = tr.map([world[1], world[0]])
    return (float(mapped[0]), float(mapped[1]))


def pump(ms: float) -> None:
    """Run the Qt event loop for ``ms`` milliseconds."""
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    end = time.perf_counter() + ms / 1000
    while True:
        app.processEvents()
        if time.perf_counter() >= end:
            return
        time.sleep(0.001)


def drag(viewer, layer, start, end, steps: int = 10, wait_ms: float = 16, path=None, on_move=None):
    """Press at ``start`` (row, col), move in ``steps`` to ``end``, release; real vispy events.

    napari throttles mouse moves (one per few ms), so the Qt event loop runs for
    ``wait_ms`` between moves, as it would between a real mouse's events.

    ``path`` overrides the straight line with a list of (row, col) points.
    ``on_move(i, t_event)`` is called after each move event is dispatched.
    """
    scene = canvas_of(viewer)._scene_canvas
    p0 = data_to_canvas(viewer, layer, *start)
    scene.events.mouse_press(pos=p0, modifiers=(), button=1)
    press = MouseEvent(pos=p0, type="mouse_press", button=1)
    points = (
        path
        if path is not None
        else [
            (start[0] + (end[0] - start[0]) * t, start[1] + (end[1] - start[1]) * t)
            for t in np.linspace(0, 1, steps + 1)[1:]
        ]
    )
    pos = p0
    for i, (r, c) in enumerate(points):
        pos = data_to_canvas(viewer, layer, r, c)
        t = time.perf_counter()
        scene.events.mouse_move(pos=pos, modifiers=(), button=1, buttons=[1], press_event=press)
        pump(wait_ms)
        if on_move is not None:
            on_move(i, t)
    scene.events.mouse_release(pos=pos, modifiers=(), button=1)
    pump(1)


def wait_until(qtbot, predicate, timeout_s: float = 60.0):
    qtbot.waitUntil(predicate, timeout=int(timeout_s * 1000))


# -- a 3D MR volume in a viewer with the MedSAM widget (steering tests) ------------------------
MR = "pyradiomics_brain1.nii.gz"  # 25 x 256 x 256 MR, a tumour on slices 11..17, key slice 16


def open_mr_viewer(make_napari_viewer, qtbot, samples):
    """(viewer, widget, case, volume): the bundled MR with the widget attached to it."""
    from napari_medsam._widget import MedSAMWidget
    from napari_medsam.engine.evaluation import load_cases
    from napari_medsam.engine.io import read_image

    case = next(c for c in load_cases(samples) if c.image.name == MR)
    vol = read_image(case.image)
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    viewer.add_image(vol.array, name="MR", scale=vol.spacing)
    widget = MedSAMWidget(viewer)
    viewer.window.add_dock_widget(widget, name="MedSAM")
    qtbot.waitUntil(lambda: widget.controller is not None and widget.controller.image is not None, timeout=180_000)
    viewer.reset_view()
    pump(50)
    return viewer, widget, case, vol


def go_to_slice(qtbot, viewer, c, z: int) -> None:
    """Scroll the annotator ``c``'s viewer to slice ``z`` and wait for its embedding."""
    viewer.dims.set_point(0, z * c.image.scale[0])
    pump(30)
    assert c.current_index() == (z,)
    qtbot.waitUntil(c.encoder.request((z,)).done, timeout=120_000)


def press(qtbot, viewer, key, modifier=None) -> None:
    """A real key press on the canvas (napari's key bindings: boxes layer first, then the viewer)."""
    from qtpy.QtCore import Qt

    canvas = viewer.window._qt_viewer.canvas.native
    canvas.setFocus()
    qtbot.keyClick(canvas, key, Qt.KeyboardModifier.NoModifier if modifier is None else modifier)
    pump(30)


def slices_of(mask: np.ndarray) -> list[int]:
    """The slice indices where a (Z, Y, X) mask has any pixel."""
    return [int(z) for z in np.flatnonzero(mask.any(axis=(1, 2)))]


def open_slide(viewer, qtbot, data, **add_kwargs):
    """Add a slide-sized image to ``viewer`` with the MedSAM widget docked; wait until the annotator
    has it and check its full view is never encoded. Returns (layer, controller)."""
    from napari_medsam._widget import MedSAMWidget

    layer = viewer.add_image(data, **add_kwargs)
    widget = MedSAMWidget(viewer)
    viewer.window.add_dock_widget(widget, name="MedSAM")
    qtbot.waitUntil(lambda: widget.controller is not None and widget.controller.image is layer, timeout=180_000)
    ctl = widget.controller
    fut = ctl.encoder.request(ctl.current_index())
    qtbot.waitUntil(fut.done, timeout=180_000)
    assert fut.result() is None and ctl.encoder.encoded == 0, "the full view is never encoded"
    return layer, ctl
