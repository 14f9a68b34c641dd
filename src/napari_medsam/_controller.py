"""Binds one image layer to MedSAM: box layer, label layer, preview, accept/edit/delete, undo.

The controller lives in the GUI thread. Heavy work runs in the encoder and
decoder threads (``_encoder``, ``_live``); their results come back through the
Qt signals of :class:`_Bridge` so that layers are only touched in the GUI thread.
"""

from __future__ import annotations

import atexit
import os
import time
import weakref
from typing import List, Optional, Tuple

import numpy as np
from napari.layers import Image, Labels, Shapes
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Signal

from ._encoder import NOW, SOON, EncoderService, Source
from ._history import Edit, History, apply_mask, bounding_region
from ._live import PREVIEW_FAST, BoxJob, BoxResult, LatestBoxDecoder
from .engine.decoder_process import DecoderProcess
from .engine.predictor import MedSAM

BOXES = "MedSAM boxes"
LABELS = "MedSAM labels"
PREVIEW = "MedSAM preview"


class _Bridge(QObject):
    result = Signal(object)
    state = Signal(str, float)
    busy = Signal(bool)
    slice_done = Signal(object)
    propagation_done = Signal(object)


def _use_process(model: MedSAM) -> bool:
    """Previews decode in a child process unless NAPARI_MEDSAM_DECODER_PROCESS=0 (see engine/decoder_process.py)."""
    return os.environ.get("NAPARI_MEDSAM_DECODER_PROCESS", "1") != "0" and DecoderProcess.supported(model)


def box_of(vertices: np.ndarray) -> Tuple[Tuple[int, ...], Tuple[float, float, float, float]]:
    """Rectangle vertices (in image data coords) -> (leading plane index, (x0, y0, x1, y1))."""
    v = np.asarray(vertices, dtype=float)
    lead = tuple(int(round(c)) for c in v[0, :-2])
    v = np.round(v, 3)  # float32 vertices: 293.99988 is the 294 the user drew
    rows, cols = v[:, -2], v[:, -1]
    return lead, (float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max()))


class Controller:
    """Everything between the user's boxes on ``image`` and the labels.

    Args:
        viewer: the napari viewer.
        model: a loaded :class:`MedSAM`.
        report: callable(text) for the widget's status line.
    """

    def __init__(self, viewer, model: MedSAM, report=lambda text: None):
        self.viewer = viewer
        self.model = model
        self.report = report
        self.bridge = _Bridge()
        self.bridge.result.connect(self._on_result)
        self.bridge.state.connect(self._on_state)
        self.bridge.busy.connect(lambda b: self.report("waiting for the encoder..." if b else "ready"))
        self.encoder = EncoderService(model, on_state=self.bridge.state.emit)
        self.remote = DecoderProcess(model, fast=PREVIEW_FAST, start=False) if _use_process(model) else None
        self.decoder = LatestBoxDecoder(model, self.bridge.result.emit, self.bridge.busy.emit, self.remote)
        self.history = History()
        self.image: Optional[Image] = None
        self.boxes: Optional[Shapes] = None
        self.labels: Optional[Labels] = None
        self.preview: Optional[Labels] = None
        self.modality, self.window = "auto", None
        self.channels = None
        self.spatial: Tuple[int, ...] = ()
        self.next_label = 1
        self._generation = 0
        self._shown_generation = -1
        self._preview_mask: Optional[np.ndarray] = None
        self._restoring = False
        self.stats = {"preview_updates": 0, "latencies": [], "accepts": 0, "last_encode_s": 0.0, "last_decode_s": 0.0}
        self.propagation = None
        self._hooked: Optional[Shapes] = None
        ref = weakref.ref(self)
        atexit.register(lambda: ref() is not None and ref().close())
        #: callables run (GUI thread) after every accept, edit, delete, propagation, undo and redo
        self.on_change: List = []

    # -- set-up ---------------------------------------------------------------
    def attach(self, image: Image, modality: str = "auto", window=None, channels=None) -> None:
        """Use ``image``: make or reuse the MedSAM layers and start encoding the plane on screen.

        ``channels`` (e.g. ``"0,2"``): ``image``'s first axis is a channel axis; the
        picked channels are combined into the model's RGB input
        (:func:`~napari_medsam.engine.intensity.compose_channels`) and the labels
        drop that axis, so they show over every channel.
        """
        if image.rgb and image.data.shape[-1] not in (3, 4):
            raise ValueError(f"RGB layer {image.name!r} has {image.data.shape[-1]} channels")
        if channels is not None and (image.rgb or image.ndim < 3):
            raise ValueError(f"channels need a multichannel layer (channel axis first), {image.name!r} has shape {image.data.shape}")
        lead0 = 0 if channels is None else 1  # image axes before the labels' first axis
        spatial = tuple(image.data.shape[:-1] if image.rgb else image.data.shape[lead0:])
        if LABELS in self.viewer.layers:
            old = self.viewer.layers[LABELS]
            if old.data.shape != spatial and old.data.any():
                raise ValueError(
                    f"{LABELS!r} holds annotations of shape {old.data.shape}, not {spatial}: "
                    "save or rename that layer first (nothing was changed)"
                )
        if self.propagation is not None:
            self.propagation.cancel()  # it writes into the labels it started on
        self.image = image
        self.channels = channels
        self.spatial = spatial
        scale, translate = image.scale[lead0:], image.translate[lead0:]
        self.labels = self._layer(LABELS, lambda: Labels(np.zeros(spatial, np.uint32), name=LABELS))
        if self.labels.data.shape != tuple(spatial):
            self.labels.data = np.zeros(spatial, np.uint32)
            self.history = History()  # its patches belong to the old shape
        self.labels.scale, self.labels.translate = scale, translate
        plane = spatial[-2:]
        self.preview = self._layer(PREVIEW, lambda: Labels(np.zeros(plane, np.uint8), name=PREVIEW, opacity=0.6))
        if self.preview.data.shape != tuple(plane):
            self.preview.data = np.zeros(plane, np.uint8)
        self.preview.scale, self.preview.translate = image.scale[-2:], image.translate[-2:]
        self._preview_mask = np.zeros(plane, bool)
        if BOXES in self.viewer.layers and self.viewer.layers[BOXES].ndim != len(spatial):
            self.viewer.layers.remove(BOXES)  # boxes of an image with other dimensions
        self.boxes = self._layer(BOXES, lambda: self._make_boxes(len(spatial)))
        self.boxes.scale, self.boxes.translate = scale, translate
        self._hook_boxes()
        self.next_label = max(self.next_label, int(self.labels.data.max()) + 1)
        self._committed = self._snapshot()
        self.set_intensity(modality, window)
        self.viewer.layers.selection.active = self.boxes
        self.boxes.mode = "add_rectangle"

    def set_intensity(self, modality: str, window=None) -> None:
        """Change the intensity rule: re-encode, the plane on screen first."""
        self.modality, self.window = modality, window
        self.encoder.set_source(Source(self.image.data, bool(self.image.rgb), modality, window, self.channels))
        self.request_current()

    def current_index(self) -> Tuple[int, ...]:
        """Leading (non-displayed) indices of the plane the viewer shows, in image data coords."""
        nlead = len(self.spatial) - 2
        if nlead == 0:
            return ()
        point = self.labels.world_to_data(self.viewer.dims.point)
        return tuple(int(np.clip(round(point[i]), 0, self.spatial[i] - 1)) for i in range(nlead))

    def request_current(self) -> None:
        if self.image is None:
            return
        idx = self.current_index()
        self.encoder.request(idx, NOW)
        if idx:  # prefetch the neighbours in the background
            for step in (1, -1):
                nb = (*idx[:-1], idx[-1] + step)
                if 0 <= nb[-1] < self.spatial[len(idx) - 1]:
                    self.encoder.request(nb, SOON)

    def _layer(self, name, make):
        if name in self.viewer.layers:
            return self.viewer.layers[name]
        return self.viewer.add_layer(make())

    def _make_boxes(self, ndim: int) -> Shapes:
        layer = Shapes(
            ndim=ndim, name=BOXES, edge_color="yellow", face_color="transparent", edge_width=2,
            features={"label": np.zeros(0, np.int64)},
        )
        layer.feature_defaults = {"label": 0}
        return layer

    def _hook_boxes(self) -> None:
        if self._hooked is self.boxes:
            return
        self._unhook()
        self._hooked = self.boxes
        self.boxes.mouse_drag_callbacks.append(self._drag)
        self.boxes.events.mode.connect(self._keep_drag_last)
        self.boxes.events.data.connect(self._on_boxes_data)
        self.viewer.dims.events.current_step.connect(self._on_step)
        self.boxes.bind_key("Control-Z", lambda layer: self.undo(), overwrite=True)
        self.boxes.bind_key("Control-Shift-Z", lambda layer: self.redo(), overwrite=True)
        self.boxes.bind_key("Shift-P", lambda layer: self.propagate_selected(), overwrite=True)

    def _unhook(self) -> None:
        """Detach from the box layer (a new controller, e.g. after a model change, takes over)."""
        layer, self._hooked = self._hooked, None
        if layer is None:
            return
        if self._drag in layer.mouse_drag_callbacks:
            layer.mouse_drag_callbacks.remove(self._drag)
        layer.events.mode.disconnect(self._keep_drag_last)
        layer.events.data.disconnect(self._on_boxes_data)
        self.viewer.dims.events.current_step.disconnect(self._on_step)

    def _on_step(self, event=None) -> None:
        self.request_current()

    def _keep_drag_last(self, event=None) -> None:
        """napari re-appends its mode callback on a mode change; ours must run after it."""
        cbs = self.boxes.mouse_drag_callbacks
        if self._drag in cbs:
            cbs.remove(self._drag)
        cbs.append(self._drag)

    # -- live drag --------------------------------------------------------------
    def _active_shape(self) -> Optional[int]:
        """The box being drawn (the newest one) or the single selected box being edited."""
        if self.boxes.mode == "add_rectangle":
            return len(self.boxes.data) - 1 if len(self.boxes.data) else None
        sel = list(self.boxes.selected_data)
        return sel[0] if len(sel) == 1 else None

    def _drag(self, layer, event):
        """Mouse drag on the box layer: preview on every move, accept on release."""
        if self.image is None or self.boxes.mode not in ("add_rectangle", "select", "direct"):
            return
        yield
        moved = False
        while event.type == "mouse_move":
            idx = self._active_shape()
            if idx is not None and self.boxes.shape_type[idx] == "rectangle":
                moved = True
                self._submit_preview(idx, time.perf_counter())
            yield
        idx = self._active_shape()
        if moved and idx is not None:
            self.accept_shape(idx)

    def _job(self, shape_index: int, kind: str, t_event: float) -> Optional[BoxJob]:
        lead, box = box_of(self.boxes.data[shape_index])
        if (box[2] - box[0]) < 1 or (box[3] - box[1]) < 1:
            return None
        self._generation += 1
        fut = self.encoder.request(lead, NOW)
        return BoxJob(self._generation, lead, box, fut, kind, shape_index, t_event)

    def _submit_preview(self, shape_index: int, t_event: float) -> None:
        job = self._job(shape_index, "preview", t_event)
        if job is not None:
            self.decoder.preview(job)

    def accept_shape(self, shape_index: int) -> None:
        """Segment box ``shape_index`` at full resolution and write it as its object's label."""
        job = self._job(shape_index, "accept", time.perf_counter())
        if job is None:
            return
        self.decoder.accept(job)

    def _on_result(self, res: BoxResult) -> None:
        if res.error is not None:
            show_error(f"MedSAM: {res.error}")
            self.report(f"error: {res.error}")
            return
        self.stats["last_decode_s"] = res.decode_s
        if res.job.kind == "accept":
            self._clear_preview()
            self._write_object(res)
            return
        if res.job.generation <= self._shown_generation:
            return  # a slow answer never overwrites a newer one
        self._shown_generation = res.job.generation
        self._show_preview(res)
        self.stats["preview_updates"] += 1
        self.stats["latencies"].append(time.perf_counter() - res.job.t_event)
        self.report(f"preview: decode {res.decode_s * 1000:.0f} ms, encode {self.stats['last_encode_s']:.2f} s")

    def _on_state(self, text: str, seconds: float) -> None:
        if text == "ready":
            if self.remote is not None:
                self.remote.start()  # after the first encode, so the two do not share the CPU
            self.stats["last_encode_s"] = seconds
            self.report(f"ready (last encode {seconds:.2f} s)")
        elif text.startswith("error"):
            show_error(f"MedSAM: {text[7:]}")
            self.report(text)
        else:
            self.report(text)

    def _show_preview(self, res: BoxResult) -> None:
        """Update only the preview pixels that changed (one partial texture upload)."""
        y0, y1, x0, x1 = res.region
        new = np.zeros_like(self._preview_mask)
        new[y0:y1, x0:x1] = res.prediction.masks[0]
        self._set_preview(new)

    def _set_preview(self, new: np.ndarray) -> None:
        changed = np.nonzero(new != self._preview_mask)
        if changed[0].size:
            self.preview.data_setitem(changed, new[changed].astype(np.uint8))
        self._preview_mask = new

    def _clear_preview(self) -> None:
        self._set_preview(np.zeros_like(self._preview_mask))
        self._shown_generation = self._generation

    # -- objects ----------------------------------------------------------------
    def _snapshot(self):
        return ([np.array(d) for d in self.boxes.data], list(self.boxes.shape_type), self.boxes.features["label"].to_numpy().copy())

    def _restore(self, snap) -> None:
        data, types, labels = snap
        self._restoring = True
        try:
            self.boxes.selected_data = set()
            self.boxes.data = []
            if data:
                self.boxes.add(data, shape_type=types)
            self._set_box_labels(labels)
        finally:
            self._restoring = False

    def _commit(self, edit: Edit) -> None:
        """Record ``edit`` (its ``boxes_after`` = now) and make now the committed state."""
        edit.boxes_after = self._committed = self._snapshot()
        self.history.push(edit)
        self._changed(edit.name)

    def _changed(self, what: str) -> None:
        for callback in list(self.on_change):
            try:
                callback(what)
            except Exception as exc:  # e.g. a failing autosave must not break annotation
                show_error(f"MedSAM: {exc}")

    def _set_box_labels(self, labels, idx: Optional[int] = None, label_id: int = 0) -> None:
        """Replace the boxes' label column (optionally setting one row); new boxes default to 0 = new object."""
        labels = np.asarray(labels, np.int64)
        if idx is not None:
            labels[idx] = label_id
        self.boxes.features = {"label": labels}
        self.boxes.feature_defaults = {"label": 0}

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
        old = labels[lead] == label_id
        region = bounding_region(mask | old, lead)
        if region is None:
            self.report("empty mask: box kept, nothing labeled")
            show_info("MedSAM found nothing in this box")
            return
        sub = tuple(slice(r.start, r.stop) for r in region[len(lead):])
        patch = apply_mask(labels, region, mask[sub][None] if lead else mask[sub], label_id)
        self.labels.refresh()
        self._set_box_labels(self.boxes.features["label"].to_numpy().copy(), idx, label_id)
        if new_object:
            self.next_label = max(self.next_label, label_id) + 1
        self._commit(Edit("accept" if new_object else "edit", [patch], before))
        self.stats["accepts"] += 1
        iou = float(res.prediction.iou[0])
        self.report(f"label {label_id}: {int(mask.sum())} px, predicted IoU {iou:.2f}, decode {res.decode_s * 1000:.0f} ms")

    def _on_boxes_data(self, event) -> None:
        if self._restoring or getattr(event, "action", None) != "removing":
            return
        before = self._committed
        now = self._snapshot()[2]
        ids = [int(now[i]) for i in event.data_indices if i < len(now)]
        patches = [self._erase(i) for i in ids if i > 0]
        if patches:
            self._pending_delete = Edit("delete", [p for p in patches if p], before, None)
            self.boxes.events.data.connect(self._finish_delete)

    def _finish_delete(self, event) -> None:
        if getattr(event, "action", None) != "removed":
            return
        self.boxes.events.data.disconnect(self._finish_delete)
        self._commit(self._pending_delete)
        self.labels.refresh()

    def _erase(self, label_id: int):
        mask = self.labels.data == label_id
        region = bounding_region(mask)
        if region is None:
            return None
        return apply_mask(self.labels.data, region, np.zeros(mask[region].shape, bool), label_id)

    def delete_selected(self) -> None:
        if self.boxes is not None and self.boxes.selected_data:
            self.boxes.remove_selected()

    def undo(self) -> None:
        self._step(self.history.undo(), undo=True)

    def redo(self) -> None:
        self._step(self.history.redo(), undo=False)

    def _step(self, edit: Optional[Edit], undo: bool) -> None:
        """Put labels and boxes back to the state before (undo) or after (redo) ``edit``."""
        word = "undo" if undo else "redo"
        if edit is None:
            self.report(f"nothing to {word}")
            return
        for p in (reversed(edit.patches) if undo else edit.patches):
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
        from ._propagation import start_propagation

        if self.image is None or len(self.spatial) < 3:
            show_error("MedSAM: propagation needs a 3D image")
            return
        sel = sorted(self.boxes.selected_data) or ([len(self.boxes.data) - 1] if len(self.boxes.data) else [])
        if not sel:
            show_error("MedSAM: draw and accept a box first")
            return
        self.propagation = start_propagation(self, sel[0], **options)

    def close(self) -> None:
        """Stop the worker threads (waiting for a running forward pass) and let go of the layers."""
        if self.propagation is not None:
            self.propagation.cancel()
        try:
            self._unhook()
        except Exception:  # layers or viewer already gone
            pass
        self.encoder.shutdown()
        self.decoder.shutdown()
