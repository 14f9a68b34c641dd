"""The "MedSAM session" dock widget: annotate a folder of images one after the other.

It drives a :class:`~napari_medsam.engine.session.LabelingSession` and the main
MedSAM dock widget (found in the window or opened there): on every image change
the current image's labels, boxes and record are saved, the next image is loaded
into a layer, the controller is attached to it, and its saved labels and boxes
(with their label ids) are put back. Every accept / edit / delete / propagation /
undo / redo is autosaved in a background thread (latest state wins); paint-brush
edits are saved a second after the last stroke and on every image change.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from pathlib import Path

import numpy as np
from napari.utils.notifications import show_error, show_warning
from qtpy.QtCore import QObject, Qt, QTimer, Signal

from ._annotator.constants import BOXES, LABELS, PREVIEW, SETTLE_TIMEOUT_S
from ._annotator.encoding import Source
from ._annotator.history import History
from ._annotator.layers import box_kinds, make_boxes_layer, make_labels_layer
from ._annotator.saver import Saver
from ._session_ui import STATUS_COLORS, STATUS_MARKS, SessionControls, find_main_widget, wait_without_input  # noqa: F401
from ._widget import widget_deleted
from .engine.session import DONE, NOT_STARTED, SKIPPED, LabelingSession, box_kinds_of, boxes_from_layer

log = logging.getLogger(__name__)


def _unwrap(obj):
    """The napari object behind a plugin-facing ``PublicOnlyProxy`` (or ``obj`` itself)."""
    return getattr(obj, "__wrapped__", obj)


class _Signals(QObject):
    saved = Signal(object)  # (index, record) or (index, exception)


class SessionWidget(SessionControls):
    """Dock widget: open a folder, go through its images, mark them done or skipped."""

    def __init__(self, napari_viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.session: LabelingSession | None = None
        self.index: int | None = None  # image on screen
        self.image_layer = None
        self.main = None
        self.last_error: str | None = None
        self._dirty = False
        self._switching = False
        #: image index -> future of its background encode (the next image of the session)
        self.prefetched: dict = {}
        self._signals = _Signals()
        self._signals.saved.connect(self._on_saved)
        self._saver = self._new_saver()
        self._paint_timer = QTimer(self, singleShot=True, interval=1000)
        self._paint_timer.timeout.connect(lambda: self.save_current(background=True))
        self.build_controls()
        self.open_btn.clicked.connect(lambda: self.open_session())
        self.prev_btn.clicked.connect(self.previous)
        self.next_btn.clicked.connect(self.next)
        self.jump_btn.clicked.connect(lambda: self.go(self.jump_spin.value() - 1))
        self.done_btn.clicked.connect(self.mark_done)
        self.skip_btn.clicked.connect(self.skip)
        self.list.itemClicked.connect(lambda item: self.go(self.list.row(item)))
        self._enable(False)

    def _new_saver(self) -> Saver:
        return Saver(lambda i, r: self._signals.saved.emit((i, r)))

    def _error(self, text: str) -> None:
        self.last_error = text
        log.warning("MedSAM session: %s", text, exc_info=sys.exc_info()[0] is not None)
        if not widget_deleted(self.status):
            self.status.setText(f"error: {text}")
        show_error(f"MedSAM session: {text}")

    @property
    def controller(self):
        return None if self.main is None else self.main.controller

    def _attached(self):
        """The controller if it is attached to the session's image, else None."""
        c = self.controller
        if c is not None and self.image_layer is not None and _unwrap(c.image) is _unwrap(self.image_layer):
            return c
        return None

    # -- session --------------------------------------------------------------------
    def open_session(self, images: str | None = None, output: str | None = None) -> LabelingSession | None:
        """Open (or resume) a session from the line edits (or the arguments) and show its current image."""
        images = (images if images is not None else self.input_edit.text()).strip() or None
        output = (output if output is not None else self.output_edit.text()).strip() or None
        if output is None:
            if images is None:
                self._error("choose an image folder (or an output folder holding a session)")
                return None
            p = Path(images).expanduser()
            output = str(p.parent / f"{p.stem if p.is_file() else p.name}-medsam")
            self.output_edit.setText(output)
        self.close_session()
        if self._saver.stopped:
            self._saver = self._new_saver()
        try:
            session = LabelingSession(images, output)
        except Exception as exc:  # noqa: BLE001 (shown to the user; traceback logged by _error)
            self._error(str(exc))
            return None
        self.session = session
        self._warned = 0  # session.warnings already shown
        self.input_edit.setText(str(session.input))
        self.main = find_main_widget(self.viewer)
        # in the loader thread, before the model encodes anything: the session's cache
        self.main._loader.loaded.connect(self._use_session_cache, Qt.DirectConnection)
        self.main._loader.loaded.connect(self._on_model_loaded)  # GUI thread, after the main widget's own slot
        self._hook_controller()
        self.jump_spin.setMaximum(len(session))
        self._enable(True)
        self._refresh()
        self._show(session.position)
        return session

    def close_session(self) -> None:
        """Save the image on screen, wait for pending writes, let go of the controller."""
        if self.session is None:
            return
        try:
            self._settle()
            self.save_current()
        except Exception as exc:  # noqa: BLE001 (e.g. the viewer is already gone; shown and logged)
            self._error(f"could not save on close: {exc}")
        self._saver.flush()
        c = self.controller
        if c is not None and self._on_change in c.on_change:
            c.on_change.remove(self._on_change)
        if self.main is not None:
            for slot in (self._on_model_loaded, self._use_session_cache):
                with contextlib.suppress(TypeError, RuntimeError):  # not connected, or the widget is gone
                    self.main._loader.loaded.disconnect(slot)
        self.session = None
        self.index = None
        self.prefetched = {}
        self._enable(False)

    def _use_session_cache(self, model, error) -> None:
        """Give a freshly loaded model the session's embedding cache (no Qt here: loader thread)."""
        session = self.session
        if model is not None and session is not None:
            model.cache = session.embedding_cache(max_bytes=getattr(model.cache, "max_bytes", 1 << 30))

    def _on_model_loaded(self, model, error) -> None:
        if error is None:
            self._hook_controller()
            self._prefetch_next()

    def _hook_controller(self) -> None:
        c = self.controller
        if c is None or self.session is None:
            return
        if self._on_change not in c.on_change:
            c.on_change.append(self._on_change)
        cache = self.session.embedding_cache(max_bytes=getattr(c.model.cache, "max_bytes", 1 << 30))
        c.model.cache = cache  # embeddings of the session persist in OUT/.embeddings

    # -- navigation -------------------------------------------------------------------
    def go(self, index: int) -> None:
        """Save the image on screen, then show image ``index``."""
        if self.session is None or not 0 <= index < len(self.session) or index == self.index or self._switching:
            return
        self._switching = True
        try:
            self._settle()
            self.save_current()
            self._saver.flush()
            self.session.jump(index)
            self._show(index)
        finally:
            self._switching = False

    def _settle(self, timeout: float = SETTLE_TIMEOUT_S) -> bool:
        """Let an accept in flight land and stop a running propagation before the layers go.

        Waits in a local event loop that delivers the workers' results but no user
        input (a click during the wait is handled after it), until the annotator's
        :meth:`~napari_medsam._annotator.annotator.BoxAnnotator.settled` future resolves.
        False if it timed out.
        """
        c = self._attached()
        if c is None:
            return True
        c.cancel_work()
        if not wait_without_input(c.settled(), timeout):
            log.warning("boxes still in flight after %.0f s: saving what is on screen", timeout)
            return False
        return True

    def next(self) -> None:
        if self.session is not None:
            self.go(min(self.index + 1, len(self.session) - 1))

    def previous(self) -> None:
        if self.session is not None:
            self.go(max(self.index - 1, 0))

    def mark_done(self) -> None:
        self._mark(DONE)

    def skip(self) -> None:
        self._mark(SKIPPED)

    def _mark(self, status: str) -> None:
        if self.session is None or self.index is None:
            return
        self._settle()
        if status == DONE or self._dirty:  # a done image always has a labels file (maybe empty)
            self.save_current(force=True, status=status)
            self._saver.flush()
        else:
            self.session.set_status(self.index, status)
        self._refresh()
        if self.index < len(self.session) - 1:
            self.go(self.index + 1)

    # -- showing an image ---------------------------------------------------------------
    def _show(self, index: int) -> None:
        s = self.session
        try:
            img = s.read(index)
        except Exception as exc:  # noqa: BLE001 (an unreadable image is shown, the session goes on)
            self._error(f"{s.items[index].name}: {exc}")
            return
        labels = s.load_labels(index)
        record = s.load_record(index) or {}
        data, types, ids = s.layer_state(index)
        for message in s.warnings[self._warned :]:  # damaged records set aside, saves repaired
            show_warning(f"napari-medsam session: {message}")
        self._warned = len(s.warnings)
        info = s.info(index)
        for name in (LABELS, BOXES, PREVIEW):
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
        if self.image_layer is not None and self.image_layer.name in self.viewer.layers:
            self.viewer.layers.remove(self.image_layer.name)
        kwargs = {"name": s.items[index].name, "metadata": {"medsam_source": str(s.items[index].path), **img.meta}}
        if img.affine is not None:
            kwargs["metadata"]["affine"] = img.affine
        if img.spacing is not None:
            kwargs["scale"] = tuple(img.spacing)
        self.image_layer = self.viewer.add_image(img.array, rgb=img.kind == "rgb", **kwargs)
        lab = np.zeros(info.shape, np.uint32) if labels is None else labels
        place = {"scale": self.image_layer.scale, "translate": self.image_layer.translate}
        labels_layer = self.viewer.add_layer(make_labels_layer(lab, **place))
        labels_layer.events.paint.connect(self._on_paint)
        kinds = box_kinds_of(record.get("boxes", []))  # which boxes a propagation made (steering)
        self.viewer.add_layer(make_boxes_layer(len(info.shape), data, types, ids, kinds=kinds, **place))
        self.index = index
        self._dirty = False
        if img.kind == "volume":
            z = next(
                (int(b["slice"]) for b in record.get("boxes", []) if b.get("slice") is not None),
                img.array.shape[0] // 2,
            )
            self.viewer.dims.set_point(0, self.image_layer.data_to_world([z, 0, 0])[0])
        self._attach(record)
        self.viewer.reset_view()
        self._refresh()
        self._prefetch_next()

    def _prefetch_next(self) -> None:
        """Encode the next (2D) image in the background while the user works on this one."""
        c, s = self._attached(), self.session
        if (
            c is None
            or s is None
            or self.index is None
            or self.index + 1 >= len(s)
            or self.index + 1 in self.prefetched
        ):
            return
        nxt = self.index + 1
        inten = (s.load_record(nxt) or {}).get("intensity") or {}
        modality, window = inten.get("modality"), inten.get("window")
        if modality is None:
            if self.main.intensity_combo.currentText() == "layer contrast limits":
                return  # the rule depends on the layer, which does not exist yet
            modality, window = c.modality, c.window
        try:
            img = s.read(nxt)
        except Exception as exc:  # noqa: BLE001 (shown when the user gets there; logged now)
            log.info("not prefetching %s: %s", s.items[nxt].name, exc)
            return
        if img.kind == "volume":
            return  # its slices are encoded ahead once it is on screen
        source = Source(img.array, img.kind == "rgb", modality, tuple(window) if window else None)
        self.prefetched[nxt] = c.prefetch.image(source)[0]

    def _attach(self, record: dict) -> None:
        """Point the main widget at the new image (loading the model the first time)."""
        m = self.main
        inten = record.get("intensity") or {}
        choice = inten.get("choice")
        if choice and m.intensity_combo.findText(choice) >= 0:
            m.intensity_combo.setCurrentText(choice)
            if choice == "CT level/width" and inten.get("window"):
                m.level.setValue(float(inten["window"][0]))
                m.width.setValue(float(inten["window"][1]))
        m._refresh_images()
        m.image_combo.setCurrentText(self.image_layer.name)
        m.label_spin.blockSignals(True)
        m.label_spin.setValue(1)
        m.label_spin.blockSignals(False)
        c = m.controller
        if c is not None:
            c.next_label = 1  # attach raises it past the restored ids
            c.history = History()  # undo never reaches into another image
        elif m._model_key is not None:
            return  # the model is loading: the main widget attaches the chosen image when it is ready
        m.start()
        self._hook_controller()

    # -- saving ---------------------------------------------------------------------
    def _on_change(self, what: str) -> None:
        if self._attached() is not None:
            self._dirty = True
            self.save_current(background=True)

    def _on_paint(self, event=None) -> None:
        self._dirty = True
        self._paint_timer.start()

    def _snapshot(self):
        """(labels copy, record) of the image on screen, taken in the GUI thread."""
        labels = np.array(self.viewer.layers[LABELS].data, copy=True)
        boxes_layer = self.viewer.layers[BOXES]
        ids, kinds = boxes_layer.features["label"].to_numpy(), box_kinds(boxes_layer)
        boxes = boxes_from_layer(boxes_layer.data, boxes_layer.shape_type, ids, kinds)
        record = {"boxes": boxes}
        c = self._attached()
        if c is not None:
            m = self.main
            record["model"] = {"name": c.model.name, "checkpoint": c.model.checkpoint}
            record["intensity"] = {
                "modality": c.modality,
                "window": c.window,
                "choice": m.intensity_combo.currentText(),
            }
        else:  # the model never ran on this image: keep what the record said
            old = self.session.load_record(self.index) or {}
            for key in ("model", "intensity"):
                if old.get(key):
                    record[key] = old[key]
        return labels, record

    def save_current(self, background: bool = False, force: bool = False, status: str | None = None) -> None:
        """Save the image on screen if it changed since it was shown (``force``: always)."""
        if self.session is None or self.index is None or not (self._dirty or force):
            return
        if LABELS not in self.viewer.layers or BOXES not in self.viewer.layers:
            return
        self._paint_timer.stop()
        session, index = self.session, self.index
        try:
            labels, record = self._snapshot()
        except Exception as exc:  # noqa: BLE001 (shown to the user; traceback logged by _error)
            self._error(f"cannot read the layers to save: {exc}")
            return
        self._dirty = False
        self._saver.submit(index, lambda: session.save(index, labels, record, status=status))
        if not background:
            self._saver.flush()

    def _on_saved(self, item) -> None:
        index, result = item
        if isinstance(result, Exception):
            self._dirty = True  # try again on the next change
            self._error(f"saving failed: {result}")
            return
        if widget_deleted(self) or widget_deleted(self.status):
            log.debug("image %d saved after the widget was closed", index)
            return
        name = self.session.items[index].name if self.session else str(index)
        self.status.setText(f"saved {name} ({len(result.get('objects', []))} objects)")
        self._refresh()

    def status_of(self, index: int) -> str:
        return self.session.status(index) if self.session else NOT_STARTED

    def closeEvent(self, event) -> None:
        try:
            self.close_session()
        finally:
            self._saver.stop()  # pending saves are still written; the thread then ends
            super().closeEvent(event)
