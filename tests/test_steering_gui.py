"""3D steering in a real viewer: z-range keys and key-slice boxes, real keys and mouse drags, real model.

Run under an X server with OpenGL (``xvfb-run -a pytest``).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from qtpy.QtCore import Qt

from _gui import drag, go_to_slice, open_mr_viewer, press, slices_of
from napari_medsam._annotator.steering import text_overlay
from napari_medsam.engine.evaluation import dice

pytestmark = pytest.mark.gui


@pytest.fixture
def mr_viewer(make_napari_viewer, qtbot, samples):
    return open_mr_viewer(make_napari_viewer, qtbot, samples)


def _draw(qtbot, viewer, widget, box) -> None:
    """Drag a new rectangle over ``box`` = (x0, y0, x1, y1) and wait for its accept."""
    c = widget.controller
    n = c.stats["accepts"]
    c.boxes.mode = "add_rectangle"
    x0, y0, x1, y1 = box
    drag(viewer, c.image, (y0, x0), (y1, x1), steps=8)
    qtbot.waitUntil(lambda: c.stats["accepts"] > n, timeout=60_000)


def _propagate(qtbot, viewer, widget) -> np.ndarray:
    c = widget.controller
    before = c.propagation
    viewer.layers.selection.active = c.boxes
    press(qtbot, viewer, Qt.Key.Key_P, Qt.KeyboardModifier.ShiftModifier)
    qtbot.waitUntil(lambda: c.propagation is not before and c.propagation.done.is_set(), timeout=600_000)
    assert c.propagation.error is None
    return c.labels.data


def _gt_box(gt: np.ndarray, z: int, pad: int = 4) -> tuple[float, float, float, float]:
    rows, cols = np.nonzero(gt[z])
    h, w = gt.shape[1:]
    return (
        max(cols.min() - pad, 0),
        max(rows.min() - pad, 0),
        min(cols.max() + pad, w - 1),
        min(rows.max() + pad, h - 1),
    )


def test_z_range_in_two_keystrokes_bounds_propagation(mr_viewer, qtbot):
    """'[' on slice 15, ']' on slice 17: propagation from slice 16 writes no label outside 15..17; '\\' clears."""
    viewer, widget, case, vol = mr_viewer
    steer = widget.steering
    said: list[str] = []  # what steering told the status line (the encoder's state may overwrite it since)
    tell = steer.report
    steer.report = lambda text: (said.append(text), tell(text))[-1]
    go_to_slice(qtbot, viewer, widget.controller, 17)
    press(qtbot, viewer, Qt.Key.Key_BracketRight)
    go_to_slice(qtbot, viewer, widget.controller, 15)
    press(qtbot, viewer, Qt.Key.Key_BracketLeft)
    assert steer.z_range == (15, 17)
    assert "15..17" in said[-1]
    overlay = text_overlay(viewer)
    assert overlay.visible and "15..17" in overlay.text

    go_to_slice(qtbot, viewer, widget.controller, case.key_slice)
    _draw(qtbot, viewer, widget, case.box)
    labels = _propagate(qtbot, viewer, widget)
    zs = slices_of(labels == 1)
    assert zs and min(zs) >= 15 and max(zs) <= 17, f"labels only inside the z-range, got slices {zs}"
    assert 15 in zs and 17 in zs, "the object reaches both ends of its range"
    free = widget.controller.model.segment_volume(
        vol.array, case.box, case.key_slice, modality=widget.controller.modality
    )
    assert any(z < 15 for z in slices_of(free)), "without the range the propagation goes below 15 (the test can fail)"

    press(qtbot, viewer, Qt.Key.Key_Backslash)
    assert steer.z_range is None and not overlay.visible
    # a range that does not hold the box is refused with a message, nothing propagated
    go_to_slice(qtbot, viewer, widget.controller, 20)
    press(qtbot, viewer, Qt.Key.Key_BracketLeft)
    before = widget.controller.propagation
    viewer.layers.selection.active = widget.controller.boxes
    press(qtbot, viewer, Qt.Key.Key_P, Qt.KeyboardModifier.ShiftModifier)
    assert widget.controller.propagation is before
    assert any("does not hold" in t for t in said)
    widget.zclear_btn.click()
    assert steer.z_range is None


def test_two_key_slices_cover_both_and_match_ground_truth(mr_viewer, qtbot):
    """A box on slice 16 and, after K, one on slice 12 of the same object: both key slices labelled,
    Dice vs ground truth at least that of the one-box propagation (within 0.01); undo takes the propagation back."""
    viewer, widget, case, vol = mr_viewer
    c = widget.controller
    gt = case.ground_truth()
    go_to_slice(qtbot, viewer, widget.controller, case.key_slice)
    _draw(qtbot, viewer, widget, case.box)
    go_to_slice(qtbot, viewer, widget.controller, 12)
    press(qtbot, viewer, Qt.Key.Key_K)
    _draw(qtbot, viewer, widget, _gt_box(gt, 12))
    ids = c.boxes.features["label"].to_numpy().tolist()
    assert ids == [1, 1], "the box drawn after K joins the object"
    assert c.next_label == 2, "new boxes after the joining one are new objects again"
    assert sorted(widget.steering.key_boxes(1)) == [12, case.key_slice]
    key_only = c.labels.data.copy()

    labels = _propagate(qtbot, viewer, widget)
    zs = slices_of(labels == 1)
    assert 12 in zs and case.key_slice in zs and all(z in zs for z in range(12, case.key_slice + 1))
    two = dice(labels == 1, gt)
    one = dice(c.model.segment_volume(vol.array, case.box, case.key_slice, modality=c.modality), gt)
    print(f"Dice vs ground truth: one box {one:.3f}, two key slices {two:.3f}")
    # on this tumour both are near 0.71 and which is ahead moves with the 2D accept's details (the
    # zoom rule's settings); across datasets two key boxes are far ahead (docs/accuracy_3d.md)
    assert two >= one - 0.01, (two, one)
    c.undo()
    np.testing.assert_array_equal(c.labels.data, key_only)
