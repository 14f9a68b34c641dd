"""Step 4, decoding: boxes become masks in a worker thread; the latest box wins, accepts are never dropped.

:class:`LatestBoxDecoder` runs one worker thread. ``preview(job)`` replaces any
preview still waiting (the decoder only ever works on the newest box of a drag);
``accept(job)`` is queued and never dropped. Answers leave in generation order:
the worker always takes the waiting job with the lowest generation, so queued
accepts go before any newer preview, also after a wait for the plane's embedding
(when the worker waited, it re-picks: a newer preview of the same drag replaces
the one it held, and a preview older than a queued accept is moot, since that
drag is over). Results go to ``on_result`` from the worker thread; the annotator
forwards them to the GUI thread with a Qt signal.

Previews decode on the plane's full-view embedding. Accepts answer what
``MedSAM.segment(plane, box=...)`` answers: on LiteMedSAM (unless loaded ``exact``)
the zoom strategy of :mod:`napari_medsam.engine.zoom` (crops re-encoded around a
small box, here in this worker, shown as busy), else the model's own decode.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field

import numpy as np

from napari_medsam.engine.decoder_process import DecoderUnavailable
from napari_medsam.engine.fast.windows import grown_region
from napari_medsam.engine.predictor import Prediction
from napari_medsam.engine.segment import uses_zoom
from napari_medsam.engine.zoom import DEFAULT as ZOOM
from napari_medsam.engine.zoom import ZoomInfo, crop_window, decode_window, encode_window, segment_box

from .constants import JobKind
from .threads import start_worker

log = logging.getLogger(__name__)
Index = tuple[int, ...]
Region = tuple[int, int, int, int]


@dataclass
class BoxJob:
    """One box to decode.

    Attributes:
        generation: increases with every box event; results of older previews are stale.
        index: leading indices of the plane (slice, time...).
        box: x0, y0, x1, y1 in plane pixels.
        embedding: future of the plane's embedding.
        kind: :class:`JobKind` (preview or accept).
        shape_index: the box's row in the Shapes layer (accepts).
        t_event: perf_counter time of the mouse event (latency measurement).
        plane: returns the prepared (H, W, 3) uint8 plane the embedding was encoded from (same
            source version); called in the worker on accept, for the zoom crops. None: no zoom.
    """

    generation: int
    index: Index
    box: tuple[float, float, float, float]
    embedding: Future
    kind: JobKind = JobKind.PREVIEW
    shape_index: int = -1
    t_event: float = field(default_factory=time.perf_counter)
    plane: Callable[[], np.ndarray] | None = None


@dataclass
class BoxResult:
    job: BoxJob
    prediction: object | None = None
    region: Region | None = None
    error: BaseException | None = None
    decode_s: float = 0.0
    #: what the zoom strategy did for an accept (path, crops, encodes); None: decoded on the full view
    zoom: ZoomInfo | None = None


#: (y0, y1, x0, x1): the box grown by a quarter of its size plus 8 px, clipped to the plane. MedSAM's
#: masks stay close to their box (trained on tight boxes with 0-20 px jitter), so the preview computes
#: the mask only there; accepted labels use the full plane. One home, shared with the fused decoder.
preview_region = grown_region


class LatestBoxDecoder:
    """Single worker thread answering box jobs; see the module docstring.

    Args:
        model: the loaded model; accepts: :func:`uses_zoom` decides (zoom strategy or one full-view decode).
        on_result: called (worker thread) with each :class:`BoxResult`, in generation order.
        on_busy: called with True before waiting for an embedding, False after.
        remote: a :class:`~napari_medsam.engine.decoder_process.DecoderProcess` for previews.
    """

    def __init__(
        self,
        model,
        on_result: Callable[[BoxResult], None],
        on_busy: Callable[[bool], None] = lambda b: None,
        remote=None,
    ):
        self.model = model
        self.remote = remote  # previews go to this child process when it is ready
        self.on_result = on_result
        self.on_busy = on_busy
        self._cv = threading.Condition()
        self._preview: BoxJob | None = None
        self._accepts: deque[BoxJob] = deque()
        self._idle_waiters: list[Future] = []
        self._stop = False
        self._working = False
        self.dropped = 0
        #: set while a preview is being decoded (background prefetch pauses then)
        self.decoding_preview = threading.Event()
        self._thread = start_worker(self._run, "medsam-decoder", self.shutdown)

    # -- GUI-thread API -------------------------------------------------------
    def preview(self, job: BoxJob) -> None:
        with self._cv:
            if self._preview is not None:
                self.dropped += 1
            self._preview = job
            self._cv.notify_all()

    def accept(self, job: BoxJob) -> None:
        with self._cv:
            if self._preview is not None:  # the drag is over: its last preview is moot
                self._preview = None
                self.dropped += 1
            self._accepts.append(job)
            self._cv.notify_all()

    def idle(self) -> bool:
        with self._cv:
            return self._idle_locked()

    def warm(self, embedding) -> None:
        """Make ``embedding``'s decoder state before its first box (any thread): in-process, and in
        the preview child once it runs (a prefetched next image answers its first box at once)."""
        if embedding is None:  # a slide: no full view
            return
        try:
            self.model.warm(embedding)
            if self.remote is not None:
                self.remote.send(embedding)
        except Exception:  # only a head start: the first box does it anyway
            log.debug("warming the decoder failed", exc_info=True)

    def when_idle(self) -> Future:
        """A future resolved (worker thread) once every job so far has been answered."""
        fut: Future = Future()
        with self._cv:
            if self._idle_locked() or self._stop:
                fut.set_result(None)
            else:
                self._idle_waiters.append(fut)
        return fut

    def shutdown(self) -> None:
        """Stop the worker without waiting (a running decode finishes in the background)."""
        if self.remote is not None:
            self.remote.close()
        with self._cv:
            self._stop = True
            self._release_waiters()
            self._cv.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker to end (tests, scripts; never from the GUI thread). True if it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- worker -------------------------------------------------------------------
    def _idle_locked(self) -> bool:
        return self._preview is None and not self._accepts and not self._working

    def _release_waiters(self) -> None:
        waiters, self._idle_waiters = self._idle_waiters, []
        for fut in waiters:
            fut.set_result(None)

    def _pick_locked(self) -> BoxJob:
        """The waiting job with the lowest generation (queued accepts before a newer preview)."""
        preview = self._preview
        if self._accepts and (preview is None or self._accepts[0].generation < preview.generation):
            return self._accepts.popleft()
        self._preview = None
        return preview

    def _next(self) -> BoxJob | None:
        with self._cv:
            while self._preview is None and not self._accepts and not self._stop:
                self._cv.wait()
            if self._stop:
                return None
            self._working = True
            return self._pick_locked()

    def _repick(self, job: BoxJob) -> BoxJob:
        """After a wait: put ``job`` back among what arrived meanwhile and take the oldest again."""
        with self._cv:
            if job.kind is JobKind.ACCEPT:
                self._accepts.appendleft(job)  # the oldest accept: still first among the accepts
            elif self._preview is None or self._preview.generation < job.generation:
                self._preview = job
            else:
                self.dropped += 1  # a newer box of the same drag replaces it
            if self._preview is not None and self._accepts and self._accepts[-1].generation > self._preview.generation:
                self._preview = None  # an accept came after it: that drag is over
                self.dropped += 1
            return self._pick_locked()

    @contextlib.contextmanager
    def _busy(self) -> Iterator[None]:
        """``on_busy(True)`` / ``(False)`` around the enclosed wait (nobody is told after shutdown)."""
        if not self._stop:
            self.on_busy(True)
        try:
            yield
        finally:
            if not self._stop:
                self.on_busy(False)

    def _answer(self, res: BoxResult) -> None:
        if not self._stop:  # after shutdown nobody listens (the owner may be gone)
            self.on_result(res)

    def _run(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            try:
                while not job.embedding.done():
                    with self._busy():
                        job.embedding.exception()  # wait; errors are raised by _decode
                    job = self._repick(job)
                self._answer(self._decode(job))
            except CancelledError:  # the image changed under the box: nothing to answer
                log.debug("box of generation %d dropped: its plane's encode was cancelled", job.generation)
            except Exception as exc:  # answered as an error result, shown in the GUI
                log.debug("decoding box %d failed", job.generation, exc_info=True)
                self._answer(BoxResult(job, error=exc))
            finally:
                with self._cv:
                    self._working = False
                    if self._idle_locked():
                        self._release_waiters()

    def _decode(self, job: BoxJob) -> BoxResult:
        emb = job.embedding.result()
        t0 = time.perf_counter()
        if job.kind is JobKind.ACCEPT:  # labels: what segment(plane, box=...) gives
            if job.plane is None or not uses_zoom(self.model):
                return BoxResult(job, self.model.predict(emb, job.box), decode_s=time.perf_counter() - t0)
            return self._zoom(job, emb, t0)
        if emb is None:  # a plane never encoded whole (a slide): the preview decodes in the box's crop
            return self._crop_preview(job, t0)
        region = preview_region(job.box, emb.original_size)
        pred = None
        if self.remote is not None and self.remote.ready:
            try:
                pred = self.remote.predict(emb, job.box, region)
            except DecoderUnavailable:
                log.info("decoder process unavailable: previews decode in this process")
        if pred is None:
            self.decoding_preview.set()
            try:
                pred = self.model.predict(emb, job.box, region=region)
            finally:
                self.decoding_preview.clear()
        return BoxResult(job, pred, region, decode_s=time.perf_counter() - t0)

    def _crop_preview(self, job: BoxJob, t0: float) -> BoxResult:
        """Preview on a plane with no full view: the box decoded in its middle-context crop (encoded
        once here, shown as busy; a drag within the same snapped crop costs decodes only)."""
        assert job.plane is not None
        plane = job.plane()
        w = crop_window(job.box, plane.shape[:2], ZOOM, ZOOM.contexts[len(ZOOM.contexts) // 2])
        with self._busy():
            emb, _ = encode_window(self.model, plane, w)
        mask, iou = decode_window(self.model, emb, w, job.box)
        pred = Prediction(mask[None], np.array([iou], np.float32), np.asarray([job.box], float))
        return BoxResult(job, pred, w, decode_s=time.perf_counter() - t0)

    def _zoom(self, job: BoxJob, emb, t0: float) -> BoxResult:
        """The zoom strategy for an accept; its crop encodes (if not cached) run here, shown as busy."""
        assert job.plane is not None
        with self._busy():
            mask, info = segment_box(self.model, job.plane(), job.box, full_embedding=emb)
        iou = np.array([float(np.mean(info.iou)) if info.iou else 0.0], np.float32)
        pred = Prediction(mask[None], iou, np.asarray([job.box], float))
        return BoxResult(job, pred, None, decode_s=time.perf_counter() - t0, zoom=info)
