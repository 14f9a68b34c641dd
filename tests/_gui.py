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
