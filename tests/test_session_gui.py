"""The "MedSAM session" dock widget with a real viewer, the real model and real mouse events.

Run under an X server with OpenGL:
``xvfb-run -a -s "-screen 0 1600x1000x24" python -m pytest tests/test_session_gui.py``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from _gui import drag, pump
from napari_medsam._annotator.constants import BOXES, LABELS
from napari_medsam._session_widget import SessionWidget
from napari_medsam._widget import MedSAMWidget
from napari_medsam.engine.evaluation import load_cases
from napari_medsam.engine.session import DONE, IN_PROGRESS, NOT_STARTED

pytestmark = pytest.mark.gui
IMAGES = ["amos_0004_75.png", "amos_0006_90.png", "s0114_111.png"]  # CT slices, sorted as the session lists them


def _open(make_napari_viewer, qtbot, input_dir, out_dir):
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    _, sw = viewer.window.add_plugin_dock_widget("napari-medsam", "MedSAM session")  # as from the Plugins menu
    assert isinstance(sw, SessionWidget)
    if input_dir is not None:
        sw.input_edit.setText(str(input_dir))
    sw.output_edit.setText(str(out_dir))
    sw.open_btn.click()
    assert sw.session is not None, sw.last_error
    return viewer, sw


def _ready(qtbot, sw, timeout=180):
    """Wait until the controller is attached to the session's image and its plane is encoded."""
    qtbot.waitUntil(lambda: sw._attached() is not None, timeout=timeout * 1000)
    c = sw.controller
    qtbot.waitUntil(c.encoder.request(c.current_index()).done, timeout=timeout * 1000)
    pump(50)
    return c


def _draw(qtbot, viewer, sw, box, steps=8):
    c = sw.controller
    n = c.stats["accepts"]
    x0, y0, x1, y1 = box
    drag(viewer, viewer.layers[sw.image_layer.name], (y0, x0), (y1, x1), steps=steps)
    qtbot.waitUntil(lambda: c.stats["accepts"] > n, timeout=60_000)


def _state(viewer):
    boxes = viewer.layers[BOXES]
    return (
        np.array(viewer.layers[LABELS].data),
        [np.array(d) for d in boxes.data],
        list(boxes.shape_type),
        boxes.features["label"].to_numpy().tolist(),
    )


def _same(a, b):
    np.testing.assert_array_equal(a[0], b[0])
    assert len(a[1]) == len(b[1])
    for u, v in zip(a[1], b[1], strict=True):
        np.testing.assert_array_equal(u, v)
        assert u.dtype == v.dtype
    assert a[2:] == b[2:]


def test_session_widget_navigate_autosave_resume(make_napari_viewer, qtbot, shared_data, tmp_path):
    cases = [c for c in load_cases(shared_data, dims=2) if c.case.startswith("ct2d_sammed2d_demo/")]
    box = {name: [c.box for c in cases if c.image.name == name] for name in IMAGES}
    src = tmp_path / "in"
    src.mkdir()
    for name in IMAGES:
        shutil.copy(shared_data / "ct2d_sammed2d_demo" / "images" / name, src / name)
    out = tmp_path / "out"

    viewer, sw = _open(make_napari_viewer, qtbot, src, out)
    main = sw.main
    assert isinstance(main, MedSAMWidget), "the session widget opens the main MedSAM dock"
    assert sw.list.count() == 3 and sw.progress.text() == "0/3 done"
    assert sw.index == 0 and sw.image_layer.name == IMAGES[0]
    c = _ready(qtbot, sw)

    # image 1: two objects drawn with real mouse drags, autosaved after each accept
    _draw(qtbot, viewer, sw, box[IMAGES[0]][0])
    _draw(qtbot, viewer, sw, box[IMAGES[0]][1])
    sw._saver.flush()
    pump(50)
    rec = json.loads((out / "records" / "amos_0004_75.json").read_text())
    assert [o["label"] for o in rec["objects"]] == [1, 2]
    assert rec["model"]["name"] == "litemedsam" and len(rec["model"]["checkpoint_sha256"]) == 64
    assert sw.status_of(0) == IN_PROGRESS
    first = _state(viewer)
    assert set(np.unique(first[0])) == {0, 1, 2} and first[3] == [1, 2]

    # next: a fresh image with empty layers; one object there
    sw.next_btn.click()
    assert sw.index == 1 and sw.image_layer.name == IMAGES[1]
    assert not viewer.layers[LABELS].data.any() and len(viewer.layers[BOXES].data) == 0
    c = _ready(qtbot, sw)
    assert c.next_label == 1, "label ids start at 1 on every image"
    _draw(qtbot, viewer, sw, box[IMAGES[1]][0])
    second = _state(viewer)
    assert second[3] == [1]
    assert c.history.can_undo

    # back: labels and boxes exactly as left; undo cannot reach into the other image
    sw.prev_btn.click()
    assert sw.index == 0
    _same(_state(viewer), first)
    c = _ready(qtbot, sw)
    assert not c.history.can_undo
    assert c.next_label == 3

    # jump by number
    sw.jump_spin.setValue(2)
    sw.jump_btn.click()
    assert sw.index == 1
    _same(_state(viewer), second)
    sw.done_btn.click()  # done -> saved and on to the third image
    assert sw.index == 2 and sw.progress.text() == "1/3 done"
    assert "done" in sw.list.item(1).text()
    assert list((out / ".embeddings").glob("*.npz")), "the session's embeddings are cached on disk"
    sw.list.itemClicked.emit(sw.list.item(0))
    assert sw.index == 0
    _same(_state(viewer), first)
    sw.close()  # closing saves and lets go of the controller
    assert sw._on_change not in c.on_change

    # a fresh viewer and widget on the same output folder: everything is back
    viewer2, sw2 = _open(make_napari_viewer, qtbot, None, out)
    assert sw2.session.input == src.resolve()
    assert sw2.index == 0, "position restored"
    assert [sw2.status_of(i) for i in range(3)] == [IN_PROGRESS, DONE, NOT_STARTED]
    assert sw2.progress.text() == "1/3 done"
    _same(_state(viewer2), first)
    c2 = _ready(qtbot, sw2)
    assert c2.next_label == 3
    assert c2.model.cache.disk_hits >= 1, "embeddings come back from OUT/.embeddings"
    sw2.next_btn.click()
    _same(_state(viewer2), second)


def _click_later(button):
    """Post a real press/release pair on ``button`` (handled whenever the event loop runs)."""
    from qtpy.QtCore import QEvent, QPointF, Qt
    from qtpy.QtGui import QMouseEvent
    from qtpy.QtWidgets import QApplication

    p = QPointF(button.width() / 2, button.height() / 2)
    g = QPointF(button.mapToGlobal(p.toPoint()))
    for kind in (QEvent.Type.MouseButtonPress, QEvent.Type.MouseButtonRelease):
        event = QMouseEvent(
            kind, p, g, Qt.MouseButton.LeftButton, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
        )
        QApplication.postEvent(button, event)


def test_settle_lands_the_accept_and_handles_no_click_meanwhile(make_napari_viewer, qtbot, shared_data, tmp_path):
    """Hazard: _settle spun processEvents, so a click arriving while an accept was in flight ran in the
    middle of the image switch. Now the wait delivers the workers' results only; the click runs after."""
    cases = [c for c in load_cases(shared_data, dims=2) if c.case.startswith("ct2d_sammed2d_demo/")]
    src = tmp_path / "in"
    src.mkdir()
    for name in IMAGES[:2]:
        shutil.copy(shared_data / "ct2d_sammed2d_demo" / "images" / name, src / name)
    viewer, sw = _open(make_napari_viewer, qtbot, src, tmp_path / "out")
    c = _ready(qtbot, sw)
    box = next(x.box for x in cases if x.image.name == IMAGES[0])
    x0, y0, x1, y1 = box
    n = c.stats["accepts"]
    drag(viewer, viewer.layers[sw.image_layer.name], (y0, x0), (y1, x1), steps=6)  # released: accept in flight
    _click_later(sw.next_btn)
    assert sw._settle()
    assert c.stats["accepts"] == n + 1, "the accept in flight landed during the wait"
    assert sw.index == 0, "the click was not handled in the middle of the wait"
    qtbot.waitUntil(lambda: sw.index == 1, timeout=60_000)  # it is handled afterwards
    rec = json.loads((tmp_path / "out" / "records" / "amos_0004_75.json").read_text())
    assert [o["label"] for o in rec["objects"]] == [1], "the accepted object was saved before the switch"


def test_next_image_is_encoded_ahead_so_its_first_mask_needs_no_encode(
    make_napari_viewer, qtbot, shared_data, tmp_path
):
    """While the user works on an image, the next one is encoded in the background; after Next its
    plane is a cache hit and the first box is answered without the encoder."""
    cases = [c for c in load_cases(shared_data, dims=2) if c.case.startswith("ct2d_sammed2d_demo/")]
    src = tmp_path / "in"
    src.mkdir()
    for name in IMAGES[:2]:
        shutil.copy(shared_data / "ct2d_sammed2d_demo" / "images" / name, src / name)
    viewer, sw = _open(make_napari_viewer, qtbot, src, tmp_path / "out")
    c = _ready(qtbot, sw)
    qtbot.waitUntil(lambda: 1 in sw.prefetched, timeout=60_000)
    qtbot.waitUntil(sw.prefetched[1].done, timeout=180_000)
    assert sw.prefetched[1].exception() is None
    encoded = c.encoder.encoded
    sw.next_btn.click()
    assert sw.index == 1
    fut = c.encoder.request(c.current_index())
    qtbot.waitUntil(fut.done, timeout=60_000)
    assert fut.result().key == sw.prefetched[1].result().key, "the prefetched embedding is the one used"
    box = next(x.box for x in cases if x.image.name == IMAGES[1])
    _draw(qtbot, viewer, sw, box)
    assert c.encoder.encoded == encoded, "after Next, no encode on the way to the first mask"
    assert viewer.layers[LABELS].data.any()


def test_damaged_record_is_set_aside_and_the_user_is_told(make_napari_viewer, qtbot, samples, tmp_path):
    """Issue 12, defect 2, in the GUI: a record of the wrong shape is moved aside, a warning names the
    copy, the saved labels still load, and the boxes layer starts empty (nothing invented)."""
    from napari.utils.notifications import notification_manager

    from napari_medsam.engine.session import LabelingSession

    src = tmp_path / "in"
    src.mkdir()
    names = ["busi_malignant_1.png", "isic_0014270.png"]
    for name in names:
        shutil.copy(samples / name, src / name)
    out = tmp_path / "out"
    s = LabelingSession(src, out)
    lab = np.zeros(s.info(0).shape, np.uint8)
    lab[40:90, 60:140] = 1
    s.save(0, lab, {"boxes": []})
    record = s.record_path(0)
    bad = json.dumps({"format": "napari-medsam-record", "boxes": "8,133,439,403"})
    record.write_text(bad)

    seen = len(notification_manager.records)
    viewer, sw = _open(make_napari_viewer, qtbot, src, out)
    assert sw.index == 0
    aside = [p for p in record.parent.iterdir() if p.name.startswith(record.name + ".corrupt-")]
    assert len(aside) == 1 and aside[0].read_text() == bad, "the unreadable record is kept, byte for byte"
    told = [str(n.message) for n in notification_manager.records[seen:]]
    assert any(names[0] in m and aside[0].name in m for m in told), told
    np.testing.assert_array_equal(viewer.layers[LABELS].data, lab)
    assert len(viewer.layers[BOXES].data) == 0
    _ready(qtbot, sw)  # the model attaches to the image as usual


def test_propagated_boxes_stay_propagated_across_next_and_resume(make_napari_viewer, qtbot, samples, tmp_path):
    """The session widget saves each box's kind (key / propagated, the viewer's 3D steering) and
    gives it back on Previous and after a restart: a propagated box never comes back as a key box."""
    from napari_medsam._annotator.layers import box_kinds, set_box_labels

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(samples / "pyradiomics_brain1.nii.gz", src / "a_brain.nii.gz")
    shutil.copy(samples / "busi_malignant_1.png", src / "b_us.png")
    out = tmp_path / "out"
    viewer, sw = _open(make_napari_viewer, qtbot, src, out)
    assert sw.index == 0
    boxes = viewer.layers[BOXES]
    z0 = int(viewer.dims.point[0])
    for dz in (0, 1, 2):
        boxes.add_rectangles(np.array([[z0 + dz, 40, 50], [z0 + dz, 40, 90], [z0 + dz, 80, 90], [z0 + dz, 80, 50]]))
    kinds = ["key", "propagated", "propagated"]
    set_box_labels(boxes, [1, 1, 1], kinds=kinds)
    sw.save_current(force=True)
    sw.next()
    qtbot.waitUntil(lambda: sw.index == 1, timeout=60_000)
    sw.previous()
    qtbot.waitUntil(lambda: sw.index == 0, timeout=60_000)
    assert list(box_kinds(viewer.layers[BOXES])) == kinds
    sw.close_session()
    viewer2, sw2 = _open(make_napari_viewer, qtbot, None, out)  # resume from the output folder alone
    qtbot.waitUntil(lambda: BOXES in viewer2.layers and len(viewer2.layers[BOXES].data) == 3, timeout=60_000)
    assert list(box_kinds(viewer2.layers[BOXES])) == kinds
