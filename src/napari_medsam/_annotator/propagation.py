"""3D: propagating an accepted box through a volume from the viewer, in a worker thread.

Each slice's mask is pasted into the labels as soon as it is done (via a Qt
signal, so the GUI thread does the writing); the whole run is one undo step;
``cancel()`` stops it between slices. A :class:`Propagation` talks to the
annotator only through :class:`AnnotatorPort` (it never imports the annotator),
and it reads the volume from a snapshot taken in the GUI thread when it was
made: switching the image or its intensity meanwhile cannot change what it
segments, and a re-attach that replaces the labels ends its writing. Every slice
it writes shows its box on the boxes layer as it comes (:mod:`.steer_boxes`; the
layer is redrawn at most every :data:`BOX_REFRESH_S` and once more at the end), all
in the same undo step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, Protocol

import numpy as np
from napari.utils.notifications import show_error
from qtpy.QtCore import QObject, Signal

from .history import LabelPatch, apply_mask, bounding_region
from .layers import boxes_state
from .steer_boxes import propagated_boxes, same_state, with_propagated
from .threads import start_worker

log = logging.getLogger(__name__)
#: the volume to segment, its modality and window: called once, in the worker thread
VolumeSource = Callable[[], tuple[np.ndarray, str, tuple[float, float] | None]]
#: the boxes layer takes the streamed propagated boxes at most this often (seconds)
BOX_REFRESH_S = 0.25


class AnnotatorPort(Protocol):
    """What a propagation needs of the annotator (GUI thread only)."""

    model: Any  # the loaded MedSAM (``segment_volume``)
    labels: Any  # the napari Labels layer
    boxes: Any  # the napari Shapes layer of the boxes
    history: Any  # the :class:`~.history.History`

    def report(self, text: str) -> None: ...

    def _restore(self, state) -> None: ...  # put a boxes state back (no label erased)

    def commit_patches(self, name: str, patches: list[LabelPatch]) -> None: ...


class _Signals(QObject):
    slice_done = Signal(object)  # (z, mask)
    finished = Signal()


class Propagation:
    """One propagation of ``label_id``'s box on slice ``z`` (call :meth:`start`).

    Args:
        port: the annotator.
        box: (x0, y0, x1, y1) on slice ``z``.
        z: the slice of the accepted box.
        label_id: the object's id in the labels.
        volume: :data:`VolumeSource` bound to the source as it was when the user asked.
        skip: slices whose masks are not written (default: ``z``, the user's box was accepted there).
        owned: (first, last) slices whose old propagated boxes of ``label_id`` go, also where this
            run writes nothing (default: only the slices it writes).
        patches: label patches already made for this run (the same undo step), e.g. cleared slices.
        merge: an :class:`~.history.Edit` to join into this run's undo step, if still the last one.
        name: the undo step's name.
        options: passed to ``segment_volume`` (stop rules, margins).
    """

    def __init__(
        self,
        port: AnnotatorPort,
        box,
        z: int,
        label_id: int,
        volume: VolumeSource,
        *,
        skip=None,
        owned: tuple[int, int] | None = None,
        patches: list[LabelPatch] | None = None,
        merge=None,
        name: str = "propagate",
        **options,
    ):
        if label_id <= 0:
            raise ValueError("accept the box (release it) before propagating")
        self.port = port
        self.box = box
        self.z = int(z)
        self.label_id = int(label_id)
        self.volume = volume
        self.options = options
        self.cancel_event = threading.Event()
        self.target = port.labels.data  # a re-attach that replaces the labels ends our writing
        self.patches: list[LabelPatch] = list(patches or [])
        self.skip = {self.z} if skip is None else {int(k) for k in skip}
        self.owned, self.merge, self.name = owned, merge, name
        self.stats: dict[str, Any] = {}  # segment_volume's trace: each slice's box
        self._records: list[dict] = []  # the same trace as it comes (appended by the worker)
        self._boxes_shown = -1.0  # when the boxes layer last took the streamed boxes
        self.done = threading.Event()
        self.slices = 0
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        self._when_done: list[Callable[[], None]] = []
        self._signals = _Signals()
        self._signals.slice_done.connect(self._paste)
        self._signals.finished.connect(self._finish)

    def start(self) -> Propagation:
        self.thread = start_worker(self._run, "medsam-propagation", self.cancel)
        return self

    def cancel(self) -> None:
        self.cancel_event.set()

    def when_done(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` in the GUI thread once the run has finished (at once if it has)."""
        if self.done.is_set():
            callback()
        else:
            self._when_done.append(callback)

    def _run(self) -> None:
        try:
            volume, modality, window = self.volume()
            self.port.model.segment_volume(
                volume,
                self.box,
                self.z,
                modality=modality,
                window=window,
                on_slice=lambda z, m: self._signals.slice_done.emit((z, m)),
                on_record=lambda r: self._records.append(asdict(r)),
                cancel=self.cancel_event,
                stats=self.stats,
                **self.options,
            )
        except Exception as exc:  # reported in the GUI thread
            log.debug("propagation failed", exc_info=True)
            self.error = exc
        finally:
            self._signals.finished.emit()

    def _writing(self) -> bool:
        return self.port.labels is not None and self.port.labels.data is self.target

    def _paste(self, item) -> None:
        z, mask = item
        if z in self.skip or not self._writing():
            return
        labels = self.port.labels.data
        region = bounding_region(mask | (labels[z] == self.label_id), (z,))
        if region is None:
            return
        sub = region[1:]
        self.patches.append(apply_mask(labels, region, mask[sub][None], self.label_id))
        self.slices += 1
        self.port.labels.refresh()
        now = time.monotonic()
        if now - self._boxes_shown >= BOX_REFRESH_S:  # the first at once, then throttled
            self._boxes_shown = now
            self._show_boxes(list(self._records))
        self.port.report(f"propagating label {self.label_id}: slice {z} ({self.slices} done)")

    def _show_boxes(self, records: list[dict]) -> bool:
        """Each slice written gets its box (kind ``propagated``); True if the boxes changed."""
        boxes = self.port.boxes
        if boxes is None or boxes.ndim != 3:
            return False
        written = propagated_boxes(records, self.skip)
        lo, hi = self.owned if self.owned is not None else (1, 0)
        before = boxes_state(boxes)
        after = with_propagated(before, self.label_id, written, lambda z: lo <= z <= hi)
        if same_state(before, after):
            return False
        self.port._restore(after)
        return True

    def _finish(self) -> None:
        self._signals.slice_done.disconnect(self._paste)
        self._signals.finished.disconnect(self._finish)
        if self.error is not None:
            show_error(f"MedSAM propagation: {self.error}")
            self.port.report(f"propagation failed: {self.error}")
        else:
            state = "cancelled" if self.cancel_event.is_set() else "done"
            self.port.report(f"propagation {state}: label {self.label_id} on {self.slices + 1} slices")
        boxes_changed = self._writing() and self.error is None and self._show_boxes(self.stats.get("slices", []))
        boxes_changed = boxes_changed or self._boxes_shown >= 0  # streamed boxes are in this step too
        if (self.patches or boxes_changed or self.merge is not None) and self._writing():
            if self.merge is not None:
                self.port.history.merge_next(self.merge)
            self.port.commit_patches(self.name, self.patches)
        self.done.set()
        callbacks, self._when_done = self._when_done, []
        for callback in callbacks:
            callback()
