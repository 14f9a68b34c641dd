"""The autosave queue and the undo history on their own (no viewer, no Qt, no model)."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from napari_medsam._annotator.history import Edit, History, apply_mask, bounding_region
from napari_medsam._annotator.saver import Saver


class Done:
    def __init__(self):
        self.items = []

    def __call__(self, index, result):
        self.items.append((index, result))


def _blocker():
    gate, entered = threading.Event(), threading.Event()

    def job():
        entered.set()
        assert gate.wait(30)
        return "first"

    return job, gate, entered


def test_only_the_latest_pending_save_of_an_image_runs():
    done = Done()
    saver = Saver(done)
    job, gate, entered = _blocker()
    saver.submit(0, job)
    assert entered.wait(30)  # the writer is busy with image 0
    ran = []
    for k in range(5):
        saver.submit(1, lambda k=k: ran.append(k) or k)
    saver.submit(2, lambda: "two")
    assert saver.pending() == 3  # the running one, image 1 (latest only), image 2
    gate.set()
    assert saver.flush(30)
    assert ran == [4], "older pending saves of the same image are replaced"
    assert done.items == [(0, "first"), (1, 4), (2, "two")]
    saver.stop()
    assert saver.join(30)


def test_a_failing_save_is_reported_and_the_writer_goes_on():
    done = Done()
    saver = Saver(done)

    def bad():
        raise OSError("disk full")

    saver.submit(0, bad)
    saver.submit(1, lambda: "ok")
    assert saver.flush(30)
    deadline = time.monotonic() + 5
    while len(done.items) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    (i0, r0), (i1, r1) = done.items
    assert i0 == 0 and isinstance(r0, OSError) and "disk full" in str(r0)
    assert (i1, r1) == (1, "ok")
    saver.stop()
    assert saver.join(30)


def test_stop_returns_at_once_and_pending_saves_are_still_written():
    done = Done()
    saver = Saver(done)
    job, gate, entered = _blocker()
    saver.submit(0, job)
    saver.submit(1, lambda: "last")
    assert entered.wait(30)
    t0 = time.perf_counter()
    saver.stop()
    assert time.perf_counter() - t0 < 0.1, "stop() does not wait for the writer"
    assert saver.stopped
    with pytest.raises(RuntimeError, match="stopped"):
        saver.submit(2, lambda: None)
    gate.set()
    assert saver.join(30), "the thread ends once everything pending is written"
    assert done.items == [(0, "first"), (1, "last")]


def test_flush_times_out_while_a_save_hangs():
    saver = Saver(Done())
    job, gate, entered = _blocker()
    saver.submit(0, job)
    assert entered.wait(30)
    assert saver.flush(0.05) is False
    gate.set()
    assert saver.flush(30) is True
    saver.stop()
    assert saver.join(30)


def _edit(labels, region, mask, label_id, name="accept"):
    return Edit(name, [apply_mask(labels, region, mask, label_id)])


def test_history_undo_redo_restore_labels_exactly():
    rng = np.random.default_rng(0)
    labels = np.zeros((2, 40, 50), np.uint32)
    h = History()
    states = [labels.copy()]
    for label_id in (1, 2, 1, 3):  # the third one re-segments object 1
        mask = rng.random((2, 40, 50)) > 0.7
        region = bounding_region(mask)
        h.push(_edit(labels, region, mask[region], label_id))
        states.append(labels.copy())
    for k in range(4, 0, -1):
        edit = h.undo()
        for p in reversed(edit.patches):
            p.undo(labels)
        np.testing.assert_array_equal(labels, states[k - 1])
    assert h.undo() is None and not h.can_undo and h.can_redo
    for k in range(1, 5):
        for p in h.redo().patches:
            p.redo(labels)
        np.testing.assert_array_equal(labels, states[k])
    assert h.redo() is None


def test_history_new_edit_clears_redo_and_keeps_the_limit():
    h = History(limit=3)
    edits = [Edit(f"e{i}") for i in range(5)]
    for e in edits:
        h.push(e)
    assert [h.undo().name for _ in range(3)] == ["e4", "e3", "e2"]
    assert h.undo() is None, "only the last 3 edits are kept"
    h.redo()
    h.push(Edit("new"))
    assert not h.can_redo and h.redo() is None
    assert h.undo().name == "new" and h.undo().name == "e2"
