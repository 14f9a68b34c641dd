"""The "MedSAM session" dock widget with a real viewer, the real model and real mouse events.

Run under an X server with OpenGL: ``xvfb-run -a -s "-screen 0 1600x1000x24" python -m pytest tests/test_session_gui.py``.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from _gui import drag, pump  # noqa: E402

from napari_medsam._controller import BOXES, LABELS  # noqa: E402
from napari_medsam._session_widget import SessionWidget  # noqa: E402
from napari_medsam._widget import MedSAMWidget  # noqa: E402
from napari_medsam.engine.evaluation import load_cases  # noqa: E402
from napari_medsam.engine.session import DONE, IN_PROGRESS, NOT_STARTED  # noqa: E402

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
    for u, v in zip(a[1], b[1]):
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
