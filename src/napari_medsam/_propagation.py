"""Propagating an accepted box through a volume from the viewer, in a worker thread.

Each slice's mask is pasted into the labels as soon as it is done (via a Qt
signal, so the GUI thread does the writing); the whole run is one undo step;
``cancel()`` stops it between slices.
"""

from __future__ import annotations

import threading

import numpy as np
from napari.utils.notifications import show_error

from ._history import Edit, apply_mask, bounding_region
from ._controller import box_of


class Propagation:
    """One running propagation; created by :func:`start_propagation`."""

    def __init__(self, controller, shape_index: int, **options):
        self.c = controller
        self.cancel_event = threading.Event()
        lead, self.box = box_of(controller.boxes.data[shape_index])
        if len(lead) != 1:
            raise ValueError("propagation works on 3D (z, y, x) images")
        self.z = lead[0]
        self.label_id = int(controller.boxes.features["label"].iloc[shape_index])
        if self.label_id <= 0:
            raise ValueError("accept the box (release it) before propagating")
        self.options = options
        self.target = controller.labels.data  # a re-attach that replaces the labels ends our writing
        self.patches = []
        self.done = threading.Event()
        self.slices = 0
        self.error = None
        controller.bridge.slice_done.connect(self._paste)
        controller.bridge.propagation_done.connect(self._finish)
        self.thread = threading.Thread(target=self._run, name="medsam-propagation", daemon=True)
        self.thread.start()

    def cancel(self) -> None:
        self.cancel_event.set()

    def _run(self) -> None:
        c = self.c
        src = c.encoder.source
        try:
            if src.channels is None:
                volume, modality, window = np.asarray(src.data), src.modality, src.window
            else:  # the composed RGB volume the encoder sees
                volume, modality, window = c.encoder.prepared(), "uint8", None
            c.model.segment_volume(
                volume, self.box, self.z,
                modality=modality, window=window,
                on_slice=lambda z, m: c.bridge.slice_done.emit((self, z, m)),
                cancel=self.cancel_event, **self.options,
            )
        except Exception as exc:  # reported in the GUI thread
            self.error = exc
        c.bridge.propagation_done.emit(self)

    def _paste(self, item) -> None:
        owner, z, mask = item
        if owner is not self or z == self.z or self.c.labels.data is not self.target:
            return
        region = bounding_region(mask | (self.c.labels.data[z] == self.label_id), (z,))
        if region is None:
            return
        sub = region[1:]
        self.patches.append(apply_mask(self.c.labels.data, region, mask[sub][None], self.label_id))
        self.slices += 1
        self.c.labels.refresh()
        self.c.report(f"propagating label {self.label_id}: slice {z} ({self.slices} done)")

    def _finish(self, owner) -> None:
        if owner is not self:
            return
        c = self.c
        c.bridge.slice_done.disconnect(self._paste)
        c.bridge.propagation_done.disconnect(self._finish)
        if self.error is not None:
            show_error(f"MedSAM propagation: {self.error}")
            c.report(f"propagation failed: {self.error}")
        else:
            state = "cancelled" if self.cancel_event.is_set() else "done"
            c.report(f"propagation {state}: label {self.label_id} on {self.slices + 1} slices")
        if self.patches and c.labels.data is self.target:
            c._commit(Edit("propagate", self.patches, c._committed))
        self.done.set()


def start_propagation(controller, shape_index: int, **options) -> Propagation:
    return Propagation(controller, shape_index, **options)
