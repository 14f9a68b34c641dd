"""3D steering, step 3: propagated boxes on the boxes layer, dragging one re-propagates outward, undo.

The GUI test runs a real viewer (``xvfb-run -a pytest``), the real LiteMedSAM weights, the bundled
pyradiomics brain MR and real mouse and key events; the other tests check the pure parts.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from qtpy.QtCore import Qt

from _gui import drag, go_to_slice, open_mr_viewer, press, pump, slices_of
from napari_medsam._annotator.history import Edit, History, LabelPatch
from napari_medsam._annotator.layers import KEY_COLOR, PROPAGATED_COLOR, box_kinds, boxes_state
from napari_medsam._annotator.steer_boxes import (
    box_vertices,
    changed_box,
    propagated_boxes,
    same_state,
    with_propagated,
)
from napari_medsam.engine.labels import box_from_vertices


def _state(rows):
    """A boxes_state from (z, box, label, kind) rows."""
    return (
        [box_vertices(z, b) for z, b, _, _ in rows],
        ["rectangle"] * len(rows),
        np.array([lab for _, _, lab, _ in rows], np.int64),
        np.array([k for _, _, _, k in rows], object),
    )


def test_with_propagated_replaces_only_that_objects_propagated_boxes():
    box = (10.0, 20.0, 30.0, 40.0)
    state = _state(
        [(5, box, 1, "key"), (6, box, 1, "propagated"), (7, box, 1, "propagated"), (6, box, 2, "propagated")]
    )
    new = with_propagated(state, 1, {7: (11.0, 21.0, 31.0, 41.0), 8: box}, owned=lambda z: False)
    # label 1's box on 6 stays (not written, not owned), the one on 7 is replaced, 8 is new; label 2 untouched
    assert [int(v[0, 0]) for v in new[0]] == [5, 6, 6, 7, 8]
    assert new[2].tolist() == [1, 1, 2, 1, 1]
    assert new[3].tolist() == ["key", "propagated", "propagated", "propagated", "propagated"]
    np.testing.assert_allclose(new[0][3][:, 1:].min(axis=0), [21.0, 11.0])  # (row, col) of the new box on 7
    owned = with_propagated(state, 1, {}, owned=lambda z: z >= 6)
    assert [int(v[0, 0]) for v in owned[0]] == [5, 6] and owned[2].tolist() == [1, 2]
    assert same_state(state, with_propagated(state, 3, {}, owned=lambda z: True))
    assert changed_box(state, new) is None  # other lengths
    moved = _state([(5, box, 1, "key"), (6, (0, 0, 9, 9), 1, "propagated"), (7, box, 1, "propagated")])
    assert changed_box(_state([(5, box, 1, "key"), (6, box, 1, "propagated"), (7, box, 1, "propagated")]), moved) == 1


def test_propagated_boxes_skip_the_users_slices_and_dropped_ones():
    recs = [
        {"z": 5, "prompt": "key", "box": (1, 2, 3, 4), "kept": True, "area": 9},
        {"z": 6, "prompt": "chained", "box": (1, 2, 3, 5), "kept": True, "area": 9},
        {"z": 7, "prompt": "chained", "box": (1, 2, 3, 6), "kept": False, "area": 9, "reason": "area"},
        {"z": 4, "prompt": "interpolated", "box": (1, 2, 3, 7), "kept": True, "area": 0},
        {"z": 3, "prompt": "chained", "box": (1, 2, 3, 8), "kept": True, "area": 3},
    ]
    assert propagated_boxes(recs, skip={3}) == {6: (1.0, 2.0, 3.0, 5.0)}


def test_history_merges_an_edit_and_its_repropagation_into_one_step():
    labels = np.zeros((3, 4, 4), np.uint32)
    h = History()
    h.push(Edit("accept", [], "b0", "b1"))
    edit = Edit("edit", [LabelPatch((slice(0, 1),), labels[:1].copy(), labels[:1] + 1)], "b1", "b2")
    h.push(edit)
    h.merge_next(edit)
    h.push(Edit("steer", [LabelPatch((slice(1, 2),), labels[1:2].copy(), labels[1:2] + 2)], "b2", "b3"))
    step = h.undo()
    assert step.name == "steer" and len(step.patches) == 2
    assert (step.boxes_before, step.boxes_after) == ("b1", "b3")
    assert h.last.name == "accept"
    # a merge asked for an edit that is no longer the last one: two steps
    h2 = History()
    old = Edit("edit", [], "a", "b")
    h2.push(old)
    h2.push(Edit("accept", [], "b", "c"))
    h2.merge_next(old)
    h2.push(Edit("steer", [], "c", "d"))
    assert h2.undo().name == "steer" and h2.undo().name == "accept"


# -- the viewer ---------------------------------------------------------------------------------
@pytest.fixture
def mr_viewer(make_napari_viewer, qtbot, samples):
    viewer, widget, case, vol = open_mr_viewer(make_napari_viewer, qtbot, samples)
    return viewer, widget, case


def _boxes(c, kind: str) -> dict[int, tuple[int, tuple[float, ...]]]:
    """{slice: (row, box)} of label 1's boxes of ``kind``."""
    out = {}
    for i, (v, k, lab) in enumerate(zip(c.boxes.data, box_kinds(c.boxes), c.boxes.features["label"], strict=True)):
        if k == kind and int(lab) == 1:
            plane, box = box_from_vertices(v)
            assert plane[0] not in out, f"one {kind} box per slice, slice {plane[0]} has two"
            out[int(plane[0])] = (i, box)
    return out


def _done(c, before):
    return c.propagation is not None and c.propagation is not before and c.propagation.done.is_set()


@pytest.mark.gui
def test_propagated_boxes_show_and_dragging_one_repropagates_outward(mr_viewer, qtbot):
    """Box on slice 16, Shift+P: each propagated slice shows its box (kind "propagated", cyan, on its
    own slice), streamed while the run goes on. Resizing the second-lowest propagated box (real drag,
    live preview) re-segments its slice and re-propagates downwards only: the slices up to the key
    slice keep their labels, those below change; one Ctrl+Z restores labels and boxes, Ctrl+Shift+Z
    redoes. Deleting a propagated box erases only its slice."""
    viewer, widget, case = mr_viewer
    c = widget.controller
    go_to_slice(qtbot, viewer, c, case.key_slice)
    n = c.stats["accepts"]
    x0, y0, x1, y1 = case.box
    drag(viewer, c.image, (y0, x0), (y1, x1), steps=8)
    qtbot.waitUntil(lambda: c.stats["accepts"] > n, timeout=60_000)
    viewer.layers.selection.active = c.boxes
    streamed: list[int] = []  # propagated boxes on the layer each time a slice's mask is written
    report = c.report

    def spy(text: str) -> None:
        if text.startswith("propagating label"):
            streamed.append(len(_boxes(c, "propagated")))
        report(text)

    c.report = spy
    press(qtbot, viewer, Qt.Key.Key_P, Qt.KeyboardModifier.ShiftModifier)
    qtbot.waitUntil(lambda: _done(c, None), timeout=600_000)
    c.report = report
    assert c.propagation.error is None
    labels = c.labels.data
    zs = slices_of(labels == 1)
    prop = _boxes(c, "propagated")
    assert sorted(prop) == [z for z in zs if z != case.key_slice], (sorted(prop), zs)
    # streamed: the first written slice shows its box at once, the rest follow while the run goes on
    assert streamed and streamed[0] >= 1 and streamed[0] < len(prop), streamed
    assert streamed == sorted(streamed), streamed
    assert sorted(_boxes(c, "key")) == [case.key_slice]
    trace = {r["z"]: r["box"] for r in c.propagation.stats["slices"]}
    for z, (i, box) in prop.items():
        np.testing.assert_allclose(box, trace[z], atol=1e-3)  # the box that prompted that slice
        bx0, by0, bx1, by1 = (round(v) for v in box)
        inside = (labels[z, by0 : by1 + 1, bx0 : bx1 + 1] == 1).sum()
        assert inside >= 0.9 * (labels[z] == 1).sum(), f"slice {z}'s mask lies in its box"
        np.testing.assert_allclose(c.boxes.edge_color[i], PROPAGATED_COLOR, atol=1e-6)
    np.testing.assert_allclose(c.boxes.edge_color[_boxes(c, "key")[case.key_slice][0]], KEY_COLOR, atol=1e-6)

    down = [z for z in prop if z < case.key_slice]
    z_edit = min(down) + 1  # one propagated slice beyond it, the others between it and the key slice
    assert set(range(z_edit - 1, case.key_slice)) <= set(prop) and case.key_slice - z_edit >= 2, sorted(prop)
    go_to_slice(qtbot, viewer, c, z_edit)
    i, box = prop[z_edit]
    shown = set(np.flatnonzero(c.boxes._data_view._displayed).tolist())
    assert shown == {i}, f"on slice {z_edit} only its own box shows, got rows {shown}"

    labels_before, boxes_before = labels.copy(), boxes_state(c.boxes)
    old = c.propagation
    previews, accepts = c.stats["preview_updates"], c.stats["accepts"]
    c.boxes.mode = "select"
    c.boxes.selected_data = {i}
    bx0, by0, bx1, by1 = box
    shrink = 0.3 * (bx1 - bx0), 0.3 * (by1 - by0)
    drag(viewer, c.image, (by1, bx1), (by1 - shrink[1], bx1 - shrink[0]), steps=6)  # bottom-right corner in
    qtbot.waitUntil(lambda: c.stats["accepts"] > accepts, timeout=60_000)
    assert c.stats["preview_updates"] > previews, "the mask follows the box during the drag"
    qtbot.waitUntil(lambda: _done(c, old), timeout=600_000)
    assert c.propagation.error is None and c.propagation.name == "steer"
    after = labels.copy()

    changed = [z for z in range(labels.shape[0]) if not np.array_equal(after[z], labels_before[z])]
    assert z_edit in changed, "the edited slice is re-segmented"
    assert all(z <= z_edit for z in changed), f"only the slices from z_edit down change, got {changed}"
    assert any(z < z_edit for z in changed), f"the re-propagation reaches below z_edit, got {changed}"
    for z in range(z_edit + 1, labels.shape[0]):
        np.testing.assert_array_equal(after[z], labels_before[z])  # between it and the key slice, and above
    keys = _boxes(c, "key")
    assert sorted(keys) == [z_edit, case.key_slice], "the edited box is a key box now"
    new_prop = _boxes(c, "propagated")
    for z in range(z_edit + 1, case.key_slice):
        np.testing.assert_allclose(new_prop[z][1], prop[z][1])  # the boxes between are left alone
    assert sorted(z for z in new_prop if z < z_edit) == [z for z in slices_of(after == 1) if z < z_edit]

    viewer.layers.selection.active = c.boxes
    press(qtbot, viewer, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    np.testing.assert_array_equal(c.labels.data, labels_before)
    assert same_state(boxes_state(c.boxes), boxes_before), "one undo restores the boxes too"
    press(qtbot, viewer, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier)
    np.testing.assert_array_equal(c.labels.data, after)

    # deleting a propagated box takes only its slice's label with it; undo brings it back
    z_del = z_edit + 1
    c.boxes.selected_data = {_boxes(c, "propagated")[z_del][0]}
    press(qtbot, viewer, Qt.Key.Key_Delete)
    assert z_del not in _boxes(c, "propagated")
    gone = [z for z in range(labels.shape[0]) if not np.array_equal(c.labels.data[z], after[z])]
    assert gone == [z_del] and not (c.labels.data[z_del] == 1).any(), gone
    c.undo()
    np.testing.assert_array_equal(c.labels.data, after)
    pump(10)


class _FakeSteering:
    """What SteerBoxes.options reads of a Steering: the object's key boxes and the z-range."""

    def __init__(self, keys, z_range=None):
        self.keys, self.z_range = keys, z_range

    def key_boxes(self, label_id):
        return dict(self.keys)


def test_repropagation_goes_away_from_the_key_slices():
    from napari_medsam._annotator.steer_boxes import SteerBoxes

    b = (1.0, 2.0, 3.0, 4.0)
    above = SteerBoxes(_FakeSteering({10: b, 14: b})).options(1, 14, 30)  # edited box on 14, key on 10
    assert above == {"z_range": (14, 29), "owned": (15, 29), "skip": {14}}
    below = SteerBoxes(_FakeSteering({10: b, 6: b}, z_range=(3, 20))).options(1, 6, 30)
    assert below == {"z_range": (3, 6), "owned": (3, 5), "skip": {6}}
    between = SteerBoxes(_FakeSteering({10: b, 13: b, 20: b})).options(1, 13, 30)
    assert between["z_range"] == (10, 20) and between["owned"] == (11, 19) and between["skip"] == {10, 13, 20}
    assert sorted(between["key_boxes"]) == [10, 13, 20]
    alone = SteerBoxes(_FakeSteering({13: b}, z_range=(20, 25))).options(1, 13, 30)  # range not holding it
    assert alone == {"z_range": (0, 29), "owned": (0, 29), "skip": {13}}


@pytest.mark.gui
def test_dragging_a_box_between_two_key_slices_redoes_only_its_neighbours_span(mr_viewer, qtbot):
    """Key boxes on slices 16 and 12 (K), Shift+P; resizing the interpolated box on 14 makes it a third
    key: only slices 13..15 are redone, every other slice keeps its labels."""
    viewer, widget, case = mr_viewer
    c = widget.controller
    gt = case.ground_truth()

    def draw(box):
        n = c.stats["accepts"]
        c.boxes.mode = "add_rectangle"
        x0, y0, x1, y1 = box
        drag(viewer, c.image, (y0, x0), (y1, x1), steps=8)
        qtbot.waitUntil(lambda: c.stats["accepts"] > n, timeout=60_000)

    go_to_slice(qtbot, viewer, c, case.key_slice)
    draw(case.box)
    go_to_slice(qtbot, viewer, c, 12)
    press(qtbot, viewer, Qt.Key.Key_K)
    rows, cols = np.nonzero(gt[12])
    draw((cols.min() - 4, rows.min() - 4, cols.max() + 4, rows.max() + 4))
    viewer.layers.selection.active = c.boxes
    press(qtbot, viewer, Qt.Key.Key_P, Qt.KeyboardModifier.ShiftModifier)
    qtbot.waitUntil(lambda: _done(c, None), timeout=600_000)
    assert sorted(_boxes(c, "key")) == [12, case.key_slice]
    prop = _boxes(c, "propagated")
    assert {13, 14, 15} <= set(prop), sorted(prop)

    go_to_slice(qtbot, viewer, c, 14)
    before = c.labels.data.copy()
    old, accepts = c.propagation, c.stats["accepts"]
    i, (bx0, by0, bx1, by1) = prop[14]
    c.boxes.mode = "select"
    c.boxes.selected_data = {i}
    drag(viewer, c.image, (by1, bx1), (by1 - 0.3 * (by1 - by0), bx1 - 0.3 * (bx1 - bx0)), steps=6)
    qtbot.waitUntil(lambda: c.stats["accepts"] > accepts, timeout=60_000)
    qtbot.waitUntil(lambda: _done(c, old), timeout=600_000)
    after = c.labels.data
    changed = [z for z in range(after.shape[0]) if not np.array_equal(after[z], before[z])]
    assert 14 in changed and set(changed) <= {13, 14, 15}, changed
    assert set(changed) & {13, 15}, f"the slices between its neighbouring key slices are redone, got {changed}"
    assert sorted(_boxes(c, "key")) == [12, 14, case.key_slice]
    c.undo()
    np.testing.assert_array_equal(c.labels.data, before)
