"""The web labeling service: one LabelingSession, one model, many browsers.

Everything a browser does goes through :class:`WebService`; the FastAPI layer
(``app.py``) only maps HTTP to these methods. Images are addressed by their index
in the session (never by a path from the browser); labels, records, autosave,
resume and export are the engine's :class:`LabelingSession`.
"""

from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_medsam.engine.errors import MedSAMError
from napari_medsam.engine.intensity import CT_PRESETS, gray_to_rgb, parse_window, resolve_modality
from napari_medsam.engine.session import DONE, IN_PROGRESS, NOT_STARTED, SKIPPED, LabelingSession, SessionError

from .encoder import NOW, PREFETCH, SOON, EncoderQueue, InFlight, close_at_exit
from .locks import ImageLocks
from .work import ImageWork

log = logging.getLogger(__name__)


class LockedError(MedSAMError, PermissionError):
    """Another labeler holds this image."""


class WebService:
    """Serve ``session`` with ``model`` (a :class:`MedSAM`) to several browsers."""

    def __init__(self, session: LabelingSession, model, lease_s: float = 20.0, prefetch: bool = True):
        self.session = session
        self.model = model
        self.queue = EncoderQueue()
        self.locks = ImageLocks(lease_s)
        self.prefetch = prefetch
        self._mu = threading.RLock()
        self._works: dict[int, ImageWork] = {}
        self._images: OrderedDict[int, Any] = OrderedDict()
        self._prepared: OrderedDict[tuple[int, str | None], np.ndarray] = OrderedDict()
        self.stats = {"encodes": 0, "encode_s": 0.0, "accepts": 0, "accept_s": 0.0, "server_previews": 0}
        self._model_calls = InFlight()  # decodes in request threads: close() waits for them
        close_at_exit(self)

    # -- images -------------------------------------------------------------------
    def check_index(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self.session):
            raise SessionError(f"image index {index} out of range 0..{len(self.session) - 1}")
        return index

    def index_of(self, name: str) -> int | None:
        """The index of the session image called ``name`` (its path relative to IMAGES), or None."""
        return next((i for i, it in enumerate(self.session.items) if it.name == name), None)

    def image(self, index: int):
        index = self.check_index(index)
        with self._mu:
            if index in self._images:
                self._images.move_to_end(index)
                return self._images[index]
        img = self.session.read(index)
        with self._mu:
            self._images[index] = img
            while len(self._images) > 3:
                self._images.popitem(last=False)
        return img

    @staticmethod
    def window_text(window: str | None) -> str | None:
        """None / '' (the image's own rule), a CT preset name or 'level,width' -> canonical text."""
        if window in (None, "", "auto"):
            return None
        if window in CT_PRESETS:
            return str(window)
        level, width = parse_window(window)  # raises ImageError naming the problem
        return f"{level:g},{width:g}"

    def prepared(self, index: int, window: str | None) -> np.ndarray:
        """The uint8 pixels the model sees: 2D (H, W, 3), volume (D, H, W)."""
        from napari_medsam.engine.export import model_input

        key = (self.check_index(index), self.window_text(window))
        with self._mu:
            if key in self._prepared:
                self._prepared.move_to_end(key)
                return self._prepared[key]
        img = self.image(index)
        u8 = model_input(img.array, img.kind, "ct" if key[1] else "auto", key[1])
        with self._mu:
            self._prepared[key] = u8
            while len(self._prepared) > 4:
                self._prepared.popitem(last=False)
        return u8

    def slice_rgb(self, index: int, z: int | None, window: str | None) -> np.ndarray:
        u8 = self.prepared(index, window)
        if u8.ndim == 3 and u8.shape[-1] == 3 and self.image(index).kind != "volume":
            return u8
        z = self._check_z(u8.shape[0], z)
        return gray_to_rgb(u8[z])

    @staticmethod
    def _check_z(depth: int, z: int | None) -> int:
        if z is None or not 0 <= int(z) < depth:
            raise SessionError(f"slice {z} is not in 0..{depth - 1}")
        return int(z)

    def info(self, index: int) -> dict[str, Any]:
        img = self.image(index)
        arr = img.array
        volume = img.kind == "volume"
        shape = arr.shape[:2] if img.kind == "rgb" else arr.shape
        ct = img.meta.get("modality_hint") == "ct" or (img.kind != "rgb" and resolve_modality(arr).rule == "ct")
        return {"kind": img.kind, "shape": list(shape), "depth": int(arr.shape[0]) if volume else 0, "ct": bool(ct)}

    # -- embeddings (one queue, one cache) ------------------------------------------
    def _encode_job(self, index: int, z: int | None, window: str | None):
        def job():
            rgb = self.slice_rgb(index, z, window)
            emb, ran = self.model.embed_rgb_status(rgb)
            if ran:
                self.stats["encodes"] += 1
                self.stats["encode_s"] += self.model.last_encode_s
            return emb

        return job

    def embedding(self, index: int, z: int | None, window: str | None, priority: int = NOW, timeout: float = 600):
        index, window = self.check_index(index), self.window_text(window)
        key = (index, z if self.image(index).kind == "volume" else None, window)
        fut = self.queue.submit(key, self._encode_job(*key), priority)
        return fut if priority == PREFETCH else fut.result(timeout)

    def embedding_bytes(self, index: int, z: int | None, window: str | None) -> tuple[bytes, dict[str, str]]:
        """The embedding as float16 bytes (about 2 MB) and what the browser's postprocessing needs."""
        emb = self.embedding(index, z, window)
        feats = emb.features.detach().cpu().float().numpy().astype("<f2")
        head = {
            "X-Medsam-Shape": ",".join(str(s) for s in feats.shape),
            "X-Medsam-Original": ",".join(str(s) for s in emb.original_size),
            "X-Medsam-Resized": ",".join(str(s) for s in emb.resized),
            "X-Medsam-Input-Size": str(self.model.recipe.input_size),
        }
        self._prefetch_around(index, z)
        return feats.tobytes(), head

    def _prefetch_around(self, index: int, z: int | None) -> None:
        if not self.prefetch:
            return
        if self.image(index).kind == "volume" and z is not None:
            depth = self.image(index).array.shape[0]
            for dz in (1, -1, 2, -2):
                if 0 <= z + dz < depth:
                    self.queue.submit((index, z + dz, None), self._encode_job(index, z + dz, None), PREFETCH)
        elif index + 1 < len(self.session):
            try:
                if self.image(index + 1).kind != "volume":
                    self.queue.submit((index + 1, None, None), self._encode_job(index + 1, None, None), SOON + 1)
            except MedSAMError as exc:  # an unreadable next image is reported when it is opened
                log.debug("no prefetch of image %d: %s", index + 1, exc)

    # -- decoding on the server -----------------------------------------------------
    def _mask(self, index: int, z: int | None, window: str | None, box: Sequence[float]) -> np.ndarray:
        emb = self.embedding(index, z, window)
        with self._model_calls():
            return self.model.predict(emb, box).masks[0]

    def accept_mask(self, index: int, z: int | None, window: str | None, box: Sequence[float]) -> np.ndarray:
        """The engine's default path for an accepted box ("better masks": zoomed re-encode of small boxes)."""
        emb = self.embedding(index, z, window)
        try:
            from napari_medsam.engine.zoom import segment_box
        except ImportError:  # an engine without the zoom strategy: the full-view decode
            segment_box = None
        with self._model_calls():
            if segment_box is None or getattr(self.model, "exact", False):
                return self.model.predict(emb, box).masks[0]
            return segment_box(self.model, self.slice_rgb(index, z, window), box, full_embedding=emb)[0]

    def preview_bits(self, index: int, z: int | None, window: str | None, box: Sequence[float]) -> bytes:
        """Fallback preview when the browser cannot decode: the mask, one bit per pixel, row-major."""
        self.stats["server_previews"] += 1
        return np.packbits(self._mask(index, z, window, box), axis=None).tobytes()

    # -- the edited state -----------------------------------------------------------
    def work(self, index: int) -> ImageWork:
        index = self.check_index(index)
        with self._mu:
            w = self._works.get(index)
            if w is not None:
                return w
            shape = tuple(self.info(index)["shape"])
            saved = self.session.load_labels(index)
            rec = self.session.load_record(index) or {}
            if saved is not None and tuple(saved.shape) == shape:
                w = ImageWork(
                    saved.astype(np.uint32 if saved.max() > 65535 else np.uint16),
                    [dict(b) for b in rec.get("boxes", [])],
                )
            else:
                w = ImageWork.empty(shape)
            self._works[index] = w
            while len(self._works) > 16:  # keep undo history of the recently edited ones
                old = next(i for i in self._works if i != index)
                del self._works[old]
            return w

    def labels_bytes(self, index: int, z: int | None) -> tuple[bytes, str]:
        w = self.work(index)
        plane = w.labels[self._check_z(w.labels.shape[0], z)] if w.volume else w.labels
        dt = "uint16" if plane.max(initial=0) <= 65535 else "uint32"
        return zlib.compress(np.ascontiguousarray(plane.astype("<u2" if dt == "uint16" else "<u4")).tobytes(), 1), dt

    def _writable(self, index: int, client: str) -> None:
        if not self.locks.holds(index, client) and not self.locks.acquire(index, client):
            raise LockedError(
                f"image {self.session.items[index].name} is being labeled by someone else (read-only here)"
            )

    def _save(self, index: int, w: ImageWork, window: str | None, status: str | None = None) -> None:
        intensity = {"modality": "ct" if window else "auto", "window": window}
        self.session.save(
            index,
            w.labels,
            {"boxes": w.boxes, "model": self.model, "intensity": intensity, "source": "web"},
            status=status,
        )

    def check_box(self, index: int, box: Sequence[float]) -> list[float]:
        """The box ordered and clipped to the image (the engine's rule); BoxError when it misses the image."""
        from napari_medsam.engine.validate import normalize_boxes

        shape = self.info(index)["shape"][-2:]
        return [float(v) for v in normalize_boxes(box, (int(shape[0]), int(shape[1])))[0]]

    def accept(
        self, index: int, client: str, box: Sequence[float], z: int | None = None, window: str | None = None
    ) -> int:
        """Decode ``box`` with the engine's default path and save it as a new object; returns its id."""
        index, window = self.check_index(index), self.window_text(window)
        box = self.check_box(index, box)
        self._writable(index, client)
        t0 = time.perf_counter()
        mask = self.accept_mask(index, z, window, box)
        with self._mu:
            w = self.work(index)
            label = w.add([float(v) for v in box], z if w.volume else None, mask)
            self._save(index, w, window)
        self.stats["accepts"] += 1
        self.stats["accept_s"] += time.perf_counter() - t0
        return label

    def edit(
        self, index: int, client: str, label: int, box: Sequence[float], z: int | None = None, window: str | None = None
    ) -> None:
        index, window = self.check_index(index), self.window_text(window)
        box = self.check_box(index, box)
        self._writable(index, client)
        mask = self.accept_mask(index, z, window, box)
        with self._mu:
            w = self.work(index)
            w.edit(label, [float(v) for v in box], z if w.volume else None, mask)
            self._save(index, w, window)

    def delete(self, index: int, client: str, label: int) -> None:
        index = self.check_index(index)
        self._writable(index, client)
        with self._mu:
            w = self.work(index)
            w.delete(label)
            self._save(index, w, self._record_window(index))

    def undo(self, index: int, client: str, redo: bool = False) -> str | None:
        index = self.check_index(index)
        self._writable(index, client)
        with self._mu:
            w = self.work(index)
            what = w.redo() if redo else w.undo()
            if what is not None:
                self._save(index, w, self._record_window(index))
            return what

    def _record_window(self, index: int) -> str | None:
        rec = self.session.load_record(index) or {}
        win = (rec.get("intensity") or {}).get("window")
        return None if not win else f"{win[0]:g},{win[1]:g}"

    def set_status(self, index: int, client: str, status: str) -> None:
        index = self.check_index(index)
        if status not in (DONE, IN_PROGRESS, SKIPPED, NOT_STARTED):
            raise SessionError(f"unknown status {status!r}")
        self._writable(index, client)
        self.session.set_status(index, status)

    # -- the session ----------------------------------------------------------------
    def open(self, index: int, client: str) -> dict[str, Any]:
        index = self.check_index(index)
        if self.locks.acquire(index, client):
            with self._mu:
                self.session.jump(index)
        return self.state(index, client)

    def start_index(self, client: str) -> int:
        """Where a new browser starts: the session's position if free, else the first free pending image."""
        held = self.locks.held()
        pos = self.session.position
        if held.get(pos, client) == client:
            return pos
        order = list(range(pos, len(self.session))) + list(range(pos))
        for i in order:
            if held.get(i, client) == client and self.session.items[i].status in (NOT_STARTED, IN_PROGRESS):
                return i
        return pos

    def next_pending(self, index: int, client: str, step: int = 1) -> int:
        held = self.locks.held()
        n = len(self.session)
        for k in range(1, n):
            i = (index + k * step) % n
            if held.get(i, client) == client and self.session.items[i].status in (NOT_STARTED, IN_PROGRESS):
                return i
        return index

    def listing(self, client: str) -> dict[str, Any]:
        held = self.locks.held()
        items = [
            {"index": i, "name": it.name, "status": it.status, "held": i in held and held[i] != client}
            for i, it in enumerate(self.session.items)
        ]
        return {
            "items": items,
            "done": self.session.n_done,
            "total": len(items),
            "progress": self.session.progress_text(),
        }

    def state(self, index: int, client: str) -> dict[str, Any]:
        index = self.check_index(index)
        w = self.work(index)
        item = self.session.items[index]
        holder = self.locks.holder(index)
        return {
            "index": index,
            "name": item.name,
            "status": item.status,
            **self.info(index),
            "readonly": holder is not None and holder != client,
            "objects": w.objects(),
            "version": w.version,
            "can_undo": bool(w.undo_stack),
            "can_redo": bool(w.redo_stack),
            "window": self._record_window(index),
            "presets": {k: list(v) for k, v in CT_PRESETS.items()},
            "model": self.model.name,
            "warnings": list(self.session.warnings),  # opening an image may have set a damaged record aside
            "done": self.session.n_done,
            "total": len(self.session),
        }

    def export(self) -> dict[str, Any]:
        from napari_medsam.engine.export import export_session

        res = export_session(self.session)
        out = self.session.output_dir
        return {
            "files": len(res.files),
            "folder": Path(res.out_dir).relative_to(out).as_posix(),
            "summary": None if res.summary_path is None else Path(res.summary_path).relative_to(out).as_posix(),
            "errors": res.errors,
        }

    def close(self, timeout: float = 60.0) -> None:
        """Refuse new model calls, wait for running ones and for the encoder worker (idempotent)."""
        self._model_calls.drain(timeout)
        self.queue.close(timeout)
