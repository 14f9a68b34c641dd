"""Steps 2 and 5: :class:`BoxAnnotator` binds one image layer to MedSAM and writes boxes' masks as labels.

It lives in the GUI thread. A box's road: :mod:`.shape_events` (the drag) ->
:meth:`BoxAnnotator.preview` / :meth:`~BoxAnnotator.accept` (a :class:`BoxJob`
holding the plane's embedding future) -> :mod:`.encoding` (worker) ->
:mod:`.decoding` (worker) -> :meth:`BoxAnnotator._on_result` (GUI thread, via
the Qt signals of :class:`_Signals`), which writes the labels and the history.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np
from napari.layers import Image, Labels, Shapes
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Qt, Signal

from napari_medsam.engine.decoder_process import DecoderProcess
from napari_medsam.engine.labels import box_from_vertices

from .constants import BOXES, LABELS, PREVIEW, EncoderState, JobKind
from .decoding import BoxJob, BoxResult, LatestBoxDecoder
from .encoding import NOW, EncoderService, Snapshot, Source
from .history import Edit, History, LabelPatch, apply_mask, bounding_region
from .layers import (
    boxes_state,
    labels_shape,
    make_boxes_layer,
    make_labels_layer,
    make_preview_layer,
    reuse_layer,
    set_box_labels,
    set_boxes_state,
)
from .options import PREVIEW_FAST, use_decoder_process
from .prefetch import Prefetch
from .propagation import Propagation
from .shape_events import ShapeEvents
from .steer_boxes import erase_removed

log = logging.getLogger(__name__)


class _Signals(QObject):
    result = Signal(object)
    state = Signal(object, float, str)
    busy = Signal(bool)
    settled = Signal(object)  # a Future to resolve in the GUI thread
    prefetch = Signal(int, int)  # background planes encoded, asked


class BoxAnnotator:
    """Everything between the user's boxes on ``image`` and the labels.

    Args:
        viewer: the napari viewer.
        model: a loaded :class:`~napari_medsam.engine.predictor.MedSAM`.
        report: callable(text) for the widget's status line.
    """

    def __init__(self, viewer, model, report: Callable[[str], None] = lambda text: None):
        self.viewer = viewer
        self.model = model
        self.report = report
        self.signals = _Signals()
        self.signals.result.connect(self._on_result)
        self.signals.state.connect(self._on_state)
        self.signals.busy.connect(lambda b: self.report("waiting for the encoder..." if b else "ready"))
        self.signals.settled.connect(self._check_settled, Qt.QueuedConnection)  # after results already posted
        sig = self.signals  # the workers' callbacks hold the QObject itself: it outlives any late emit
        self.encoder = EncoderService(model, on_state=lambda *a: sig.state.emit(*a))
        self.remote = DecoderProcess(model, fast=PREVIEW_FAST, start=False) if use_decoder_process(model) else None
        self.decoder = LatestBoxDecoder(model, lambda r: sig.result.emit(r), lambda b: sig.busy.emit(b), self.remote)
        running = lambda: self.propagation is not None and not self.propagation.done.is_set()  # noqa: E731
        self.prefetch = Prefetch(self.encoder, self.decoder, lambda d, t: sig.prefetch.emit(d, t), running)
        self.events = ShapeEvents(
            viewer,
            enabled=lambda: self.image is not None,
            on_preview=self.preview_shape,
            on_accept=self.accept_shape,
            on_removing=self._on_removing,
            on_step=self.request_current,
            keys={"Control-Z": self.undo, "Control-Shift-Z": self.redo, "Shift-P": self.propagate_selected},
        )
        self.history = History()
        self.image: Image | None = None
        self.boxes: Shapes | None = None
        self.labels: Labels | None = None
        self.preview: Labels | None = None
        self.modality, self.window = "auto", None
        self.channels = None
        self.spatial: tuple[int, ...] = ()
        self.next_label = 1
        self._generation, self._shown_generation = 0, -1
        self._preview_mask: np.ndarray | None = None
        self._restoring = self._closed = False
        self.stats = {"preview_updates": 0, "latencies": [], "accepts": 0, "last_encode_s": 0.0, "last_decode_s": 0.0}
        self.propagation: Propagation | None = None
        #: callables run (GUI thread) after every accept, edit, delete, propagation, undo and redo
        self.on_change: list[Callable[[str], None]] = []

    # -- set-up ---------------------------------------------------------------
    def attach(self, image: Image, modality: str = "auto", window=None, channels=None) -> None:
        """Use ``image``: make or reuse the MedSAM layers and start encoding the plane on screen.

        ``channels`` (e.g. ``(0, 2)``): ``image``'s first axis is a channel axis; the
        picked channels are combined into the model's RGB input
        (:func:`~napari_medsam.engine.intensity.compose_channels`) and the labels
        drop that axis, so they show over every channel.
        """
        spatial, lead0 = labels_shape(self.viewer, image, channels)
        if self.propagation is not None:
            self.propagation.cancel()  # it writes into the labels it started on
        self.image, self.channels, self.spatial = image, channels, spatial
        scale, translate = image.scale[lead0:], image.translate[lead0:]
        self.labels = reuse_layer(self.viewer, LABELS, lambda: make_labels_layer(np.zeros(spatial, np.uint32)))
        if self.labels.data.shape != tuple(spatial):
            self.labels.data = np.zeros(spatial, np.uint32)
            self.history = History()  # its patches belong to the old shape
        self.labels.scale, self.labels.translate = scale, translate
        plane = spatial[-2:]
        self.preview = reuse_layer(self.viewer, PREVIEW, lambda: make_preview_layer(plane))
        if self.preview.data.shape != tuple(plane):
            self.preview.data = np.zeros(plane, np.uint8)
        self.preview.scale, self.preview.translate = image.scale[-2:], image.translate[-2:]
        self._preview_mask = np.zeros(plane, bool)
        if BOXES in self.viewer.layers and self.viewer.layers[BOXES].ndim != len(spatial):
            self.viewer.layers.remove(BOXES)  # boxes of an image with other dimensions
        self.boxes = reuse_layer(self.viewer, BOXES, lambda: make_boxes_layer(len(spatial)))
        self.boxes.scale, self.boxes.translate = scale, translate
        self.events.hook(self.boxes)
        self.next_label = max(self.next_label, int(self.labels.data.max()) + 1)
        self._committed = boxes_state(self.boxes)
        self.set_intensity(modality, window)
        self.viewer.layers.selection.active = self.boxes
        self.boxes.mode = "add_rectangle"

    def set_intensity(self, modality: str, window=None) -> None:
        """Change the intensity rule: re-encode, the plane on screen first."""
        self.modality, self.window = modality, window
        self.encoder.set_source(Source(self.image.data, bool(self.image.rgb), modality, window, self.channels))
        self.request_current()

    def current_index(self) -> tuple[int, ...]:
        """Leading (non-displayed) indices of the plane the viewer shows, in image data coords."""
        nlead = len(self.spatial) - 2
        if nlead == 0:
            return ()
        point = self.labels.world_to_data(self.viewer.dims.point)
        return tuple(int(np.clip(round(point[i]), 0, self.spatial[i] - 1)) for i in range(nlead))

    def request_current(self) -> None:
        if self.image is not None:
            idx = self.current_index()
            self.encoder.request(idx, NOW)
            self.prefetch.around(idx, self.spatial, self.model)  # neighbours, then the rest of the volume

    # -- boxes -> jobs ----------------------------------------------------------
    def _job(self, shape_index: int, kind: JobKind, t_event: float) -> BoxJob | None:
        lead, box = box_from_vertices(self.boxes.data[shape_index])
        if (box[2] - box[0]) < 1 or (box[3] - box[1]) < 1:
            return None
        self._generation += 1
        self.prefetch.box_event()
        fut, snap = self.encoder.request(lead, NOW), self.encoder.snapshot()  # one version: set_source is GUI-only
        plane = lambda: self.encoder.plane(lead, snap)  # noqa: E731 - the encoded pixels (accepts, slide previews)
        return BoxJob(self._generation, lead, box, fut, kind, shape_index, t_event, plane)

    def preview_shape(self, shape_index: int, t_event: float | None = None) -> None:
        """Show box ``shape_index``'s mask in the preview layer (the newest box wins)."""
        job = self._job(shape_index, JobKind.PREVIEW, time.perf_counter() if t_event is None else t_event)
        if job is not None:
            self.decoder.preview(job)

    def accept_shape(self, shape_index: int) -> None:
        """Segment box ``shape_index`` as ``model.segment(plane, box=...)`` would; write it as its label."""
        job = self._job(shape_index, JobKind.ACCEPT, time.perf_counter())
        if job is not None:
            self.decoder.accept(job)

    def _on_result(self, res: BoxResult) -> None:
        if self._closed:
            return
        if res.error is not None:
            show_error(f"MedSAM: {res.error}")
            self.report(f"error: {res.error}")
            return
        self.stats["last_decode_s"] = res.decode_s
        gen = res.job.generation
        if res.job.kind is JobKind.ACCEPT:
            if self._shown_generation < gen:  # the shown preview belongs to the drag this accept ends
                self._set_preview(np.zeros_like(self._preview_mask))
                self._shown_generation = gen
            self._write_object(res)
            return
        if gen <= self._shown_generation:
            return  # a slow answer never overwrites a newer one
        self._shown_generation = gen
        self._show_preview(res)
        self.stats["preview_updates"] += 1
        self.stats["latencies"].append(time.perf_counter() - res.job.t_event)
        self.report(f"preview: decode {res.decode_s * 1000:.0f} ms, encode {self.stats['last_encode_s']:.2f} s")

    def _on_state(self, state: EncoderState, seconds: float, detail: str) -> None:
        if self._closed:
            return
        if state is EncoderState.READY:
            if self.remote is not None:
                self.remote.start()  # after the first encode, so the two do not share the CPU
            self.stats["last_encode_s"] = seconds
            self.report(f"ready (last encode {seconds:.2f} s)")
        elif state is EncoderState.ERROR:
            show_error(f"MedSAM: {detail}")
            self.report(f"error: {detail}")
        else:
            self.report(state.value)

    def _show_preview(self, res: BoxResult) -> None:
        y0, y1, x0, x1 = res.region
        new = np.zeros_like(self._preview_mask)
        new[y0:y1, x0:x1] = res.prediction.masks[0]
        self._set_preview(new)

    def _set_preview(self, new: np.ndarray) -> None:
        """Update only the preview pixels that changed (one partial texture upload)."""
        changed = np.nonzero(new != self._preview_mask)
        if changed[0].size:
            self.preview.data_setitem(changed, new[changed].astype(np.uint8))
        self._preview_mask = new

    # -- objects ----------------------------------------------------------------
    def _restore(self, state) -> None:
        self._restoring = True
        try:
            set_boxes_state(self.boxes, state)
        finally:
            self._restoring = False

    def _commit(self, edit: Edit) -> None:
        """Record ``edit`` (its ``boxes_after`` = now) and make now the committed state."""
        edit.boxes_after = self._committed = boxes_state(self.boxes)
        self.history.push(edit)
        self._changed(edit.name)

    def commit_patches(self, name: str, patches: list[LabelPatch]) -> None:
        """One undo step for label patches written since the last commit (propagation)."""
        self._commit(Edit(name, patches, self._committed))

    def _changed(self, what: str) -> None:
        for callback in list(self.on_change):
            try:
                callback(what)
            except Exception as exc:  # e.g. a failing autosave must not break annotation
                log.exception("on_change callback failed")
                show_error(f"MedSAM: {exc}")

    def _write_object(self, res: BoxResult) -> None:
        idx = res.job.shape_index
        if idx >= len(self.boxes.data):
            return
        before = self._committed
        label_id = int(self.boxes.features["label"].iloc[idx])
        new_object = label_id <= 0
        if new_object:
            label_id = self.next_label
        mask = res.prediction.masks[0]
        lead = res.job.index
        labels = self.labels.data
        region = bounding_region(mask | (labels[lead] == label_id), lead)
        if region is None:
            self.report("empty mask: box kept, nothing labeled")
            show_info("MedSAM found nothing in this box")
            return
        sub = tuple(slice(r.start, r.stop) for r in region[len(lead) :])
        patch = apply_mask(labels, region, mask[sub][None] if lead else mask[sub], label_id)
        self.labels.refresh()
        set_box_labels(self.boxes, self.boxes.features["label"].to_numpy(), idx, label_id)
        if new_object:
            self.next_label = max(self.next_label, label_id) + 1
        self._commit(Edit("accept" if new_object else "edit", [patch], before))
        self.stats["accepts"] += 1
        iou, z = float(res.prediction.iou[0]), res.zoom
        how = f", zoom {z.zoom:.1f}x ({z.encodes} encodes)" if z is not None and z.path != "full" else ""
        self.report(
            f"label {label_id}: {int(mask.sum())} px, predicted IoU {iou:.2f}, {res.decode_s * 1000:.0f} ms{how}"
        )

    def _on_removing(self, event) -> None:
        if self._restoring:
            return
        before = self._committed
        patches = erase_removed(self.labels.data, boxes_state(self.boxes), event.data_indices)  # steer_boxes
        if patches:
            self._pending_delete = Edit("delete", patches, before, None)
            self.boxes.events.data.connect(self._finish_delete)

    def _finish_delete(self, event) -> None:
        if getattr(event, "action", None) != "removed":
            return
        self.boxes.events.data.disconnect(self._finish_delete)
        self._commit(self._pending_delete)
        self.labels.refresh()

    def delete_selected(self) -> None:
        if self.boxes is not None and self.boxes.selected_data:
            self.boxes.remove_selected()

    def undo(self) -> None:
        self._step(self.history.undo(), undo=True)

    def redo(self) -> None:
        self._step(self.history.redo(), undo=False)

    def _step(self, edit: Edit | None, undo: bool) -> None:
        """Put labels and boxes back to the state before (undo) or after (redo) ``edit``."""
        word = "undo" if undo else "redo"
        if edit is None:
            self.report(f"nothing to {word}")
            return
        for p in reversed(edit.patches) if undo else edit.patches:
            self.labels.data[p.region] = p.before if undo else p.after
        state = edit.boxes_before if undo else edit.boxes_after
        self._restore(state)
        self._committed = state
        self.labels.refresh()
        self.report(f"{'undid' if undo else 'redid'} {edit.name}")
        self._changed(word)

    # -- 3D ---------------------------------------------------------------------
    def propagate_selected(self, **options) -> None:
        """Propagate the selected (or last) accepted box through the volume in a worker."""
        if self.image is None or len(self.spatial) < 3:
            show_error("MedSAM: propagation needs a 3D image")
            return
        sel = sorted(self.boxes.selected_data) or ([len(self.boxes.data) - 1] if len(self.boxes.data) else [])
        if not sel:
            show_error("MedSAM: draw and accept a box first")
            return
        lead, box = box_from_vertices(self.boxes.data[sel[0]])
        if len(lead) != 1:
            raise ValueError("propagation works on 3D (z, y, x) images")
        label_id = int(self.boxes.features["label"].iloc[sel[0]])
        snap = self.encoder.snapshot()  # taken now, in the GUI thread
        self.propagation = Propagation(self, box, lead[0], label_id, lambda: self._volume(snap), **options).start()

    def _volume(self, snap: Snapshot):
        """(volume, modality, window) of ``snap`` for ``segment_volume`` (propagation's worker thread)."""
        src = snap.source
        if src.channels is None:
            return np.asarray(src.data), src.modality, src.window
        return self.encoder.model_input(snap), "uint8", None  # the composed RGB volume the encoder sees

    # -- settling and closing -----------------------------------------------------------
    def settled(self) -> Future:
        """Future resolved (GUI thread) once every box so far is applied and no propagation runs."""
        out: Future = Future()
        out.set_running_or_notify_cancel()
        self.decoder.when_idle().add_done_callback(lambda _: self.signals.settled.emit(out))
        return out

    def _check_settled(self, out: Future) -> None:
        prop = self.propagation
        if prop is not None and not prop.done.is_set():
            prop.when_done(lambda: self.signals.settled.emit(out))
            return
        if not self.decoder.idle():  # new boxes came meanwhile
            self.decoder.when_idle().add_done_callback(lambda _: self.signals.settled.emit(out))
            return
        out.set_result(None)

    def cancel_work(self) -> None:
        """Stop a running propagation (between slices); boxes in flight are still answered."""
        if self.propagation is not None:
            self.propagation.cancel()

    def close(self) -> None:
        """Stop the worker threads without waiting for them and let go of the layers."""
        if self._closed:
            return
        self._closed = True
        self.cancel_work()
        try:
            self.events.unhook()
        except (RuntimeError, ValueError, KeyError):  # the layer or viewer is already gone
            log.debug("unhooking the boxes layer failed", exc_info=True)
        self.encoder.shutdown()
        self.decoder.shutdown()
