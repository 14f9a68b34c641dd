"""Step 3, encoding: planes of the image become embeddings in a worker thread, plane on screen first.

An :class:`EncoderService` owns one worker thread. ``request(index)`` returns a
``Future[Embedding]`` (``None`` for a plane that is never encoded whole,
:func:`~napari_medsam.engine.segment.crops_only`: a slide's boxes encode their own crops);
requests are served by :class:`~.constants.Priority` (the
plane on screen first, then its neighbours, then background prefetch), each plane
at most once per intensity setting thanks to the model's cache. The service is
named after its job, scheduling: the image encoder itself is the model's.

Every request belongs to the source (image + intensity rule) that was current
when it was made: the worker takes the source *together with* the request under
the lock, so a source switched meanwhile can never answer an old request.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from napari_medsam.engine.intensity import convert, gray_to_rgb
from napari_medsam.engine.lazy import LazyU8, as_rgb, large_planes, lazy_planes
from napari_medsam.engine.segment import crops_only

from .constants import EncoderState, Priority
from .threads import start_worker

log = logging.getLogger(__name__)
Index = tuple[int, ...]
NOW, SOON, IDLE = Priority.NOW, Priority.SOON, Priority.IDLE


@dataclass(frozen=True)
class Source:
    """What to encode: an image array (nD, optionally RGB) and its intensity rule.

    ``channels``: the first axis of ``data`` holds channels; these (1-3) are composed
    into the model's RGB (:func:`~napari_medsam.engine.intensity.compose_channels`),
    each scaled by the intensity rule on its own.
    """

    data: object
    rgb: bool
    modality: str = "auto"
    window: tuple[float, float] | None = None
    channels: tuple[int, ...] | None = None


@dataclass(frozen=True)
class Snapshot:
    """A source as it was at one moment: ``version`` changes with every :meth:`EncoderService.set_source`."""

    version: int
    source: Source


def model_input(source: Source) -> np.ndarray | LazyU8:
    """The whole source as the model sees it: uint8, (..., H, W) or (..., H, W, 3); bad data raises ImageError.

    Planes of a slide (a side over the zoom's ``large_side``) stay lazy: a :class:`LazyU8` reads and
    converts the crops the boxes need, so a dask- or zarr-backed layer is never loaded whole.
    """
    if large_planes(source.data, source.rgb, source.channels):
        return lazy_planes(source.data, source.modality, source.window, rgb=source.rgb, channels=source.channels)
    out = convert(source.data, "planes", source.modality, source.window, rgb=source.rgb, channels=source.channels)
    return out.pixels


class EncoderService:
    """Encodes planes of one :class:`Source` with one model, in a worker thread.

    Args:
        model: the loaded model (its embedding cache is used).
        on_state: called (from the worker thread) with an :class:`EncoderState`, the
            seconds the last encode took and a detail (the error's text); the
            annotator relays it to the GUI thread.
    """

    def __init__(self, model, on_state: Callable[[EncoderState, float, str], None] | None = None):
        self.model = model
        self.on_state = on_state or (lambda *_: None)
        self._snapshot: Snapshot | None = None
        self._u8: tuple[int, np.ndarray | LazyU8 | None] = (0, None)
        self._version = 0
        self._futures: dict[tuple[int, Index], Future] = {}
        self._heap: list = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._stop = False
        self._busy = False
        self._others: dict[int, Snapshot] = {}  # prefetched sources other than the one on screen
        self.encoded = 0
        #: background (``IDLE``) work starts only while this says so (the annotator: no box in flight)
        self.may_prefetch: Callable[[], bool] = lambda: True
        #: called (worker thread) with (prefetched so far, asked so far) after each background plane
        self.on_prefetch: Callable[[int, int], None] = lambda done, total: None
        self.prefetch_done = self.prefetch_total = 0
        self._thread = start_worker(self._run, "medsam-encoder", self.shutdown)

    # -- GUI-thread API -------------------------------------------------------
    def set_source(self, source: Source) -> None:
        """Switch image or intensity; pending work for the old source is dropped."""
        with self._cv:
            self._version += 1
            self._snapshot = Snapshot(self._version, source)
            for fut in self._futures.values():
                fut.cancel()  # a running one cannot be: it is answered from its own source
            self._futures.clear()
            self.prefetch_done = self.prefetch_total = 0
            self._heap = [e for e in self._heap if e[2][0] < 0]  # other images' prefetch goes on
            heapq.heapify(self._heap)
            self._cv.notify_all()

    @property
    def source(self) -> Source | None:
        snap = self._snapshot
        return None if snap is None else snap.source

    def snapshot(self) -> Snapshot:
        """The current source and its version (what a worker of its own, e.g. propagation, should use)."""
        snap = self._snapshot
        if snap is None:
            raise RuntimeError("no image chosen")
        return snap

    def request(self, index: Index, priority: int = NOW) -> Future:
        """Future of the embedding of plane ``index`` (leading indices) of the current source."""
        with self._cv:
            key = (self._version, tuple(int(i) for i in index))
            fut = self._futures.get(key)
            if fut is None or fut.cancelled():
                fut = Future()
                self._futures[key] = fut
            if not fut.done():
                heapq.heappush(self._heap, (int(priority), next(self._seq), key, fut))
                self._cv.notify_all()
            return fut

    def prefetch(self, indices, source: Source | None = None) -> list[Future]:
        """Encode planes ``indices`` in the background (:data:`IDLE`: after everything else, and only
        while :attr:`may_prefetch`), of the current source or of ``source`` (e.g. the next image of a
        session). The embeddings land in the model's cache, so a later request is a cache hit."""
        if source is None:
            with self._cv:
                keys = [tuple(int(x) for x in i) for i in indices]
                new = [k for k in keys if (self._version, k) not in self._futures]
                self.prefetch_total += len(new)
                for k in new:
                    self.request(k, IDLE)
                return [self._futures[(self._version, k)] for k in keys]
        futs = []
        with self._cv:
            version = -1 - len(self._others)
            self._others[version] = Snapshot(version, source)
            for i in indices:
                fut: Future = Future()
                heapq.heappush(self._heap, (int(IDLE), next(self._seq), (version, tuple(int(x) for x in i)), fut))
                futs.append(fut)
            self.prefetch_total += len(futs)
            self._cv.notify_all()
        return futs

    def cached(self, index: Index) -> bool:
        """Plane ``index`` of the current source has its embedding (asking nothing of the worker)."""
        with self._cv:
            fut = self._futures.get((self._version, tuple(int(i) for i in index)))
            return fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None

    def idle(self) -> bool:
        """Nothing queued and nothing encoding."""
        with self._cv:
            return not self._busy and not any(not f.done() for *_, f in self._heap)

    def shutdown(self) -> None:
        """Stop the worker without waiting: pending requests are cancelled, a running encode finishes
        in the background (the interpreter-exit handler of :mod:`.threads` waits for it)."""
        with self._cv:
            for fut in self._futures.values():
                fut.cancel()
            self._stop = True
            self._cv.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker to end (tests, scripts; never from the GUI thread). True if it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    # -- any thread ---------------------------------------------------------------
    def model_input(self, snapshot: Snapshot | None = None) -> np.ndarray | LazyU8:
        """:func:`model_input` of ``snapshot`` (default: the current source), computed once per version."""
        snap = snapshot or self.snapshot()
        with self._cv:
            version, u8 = self._u8
        if version == snap.version and u8 is not None:
            return u8
        u8 = model_input(snap.source)
        with self._cv:
            if snap.version == self._version:
                self._u8 = (snap.version, u8)
        return u8

    def plane(self, index: Index, snapshot: Snapshot | None = None) -> np.ndarray | LazyU8:
        """The (H, W, 3) uint8 plane ``index`` of ``snapshot`` as the model sees it (a slide's: lazy,
        (H, W) or (H, W, 3), read crop by crop)."""
        u8 = self.model_input(snapshot)
        if isinstance(u8, LazyU8):
            return u8.plane(index)
        plane = u8[tuple(index)]
        return plane if plane.ndim == 3 else gray_to_rgb(plane)

    # -- worker -----------------------------------------------------------------
    def _next(self) -> tuple[Snapshot, Index, Future, bool] | None:
        with self._cv:
            while True:
                while not self._heap and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return None
                if self._heap[0][0] >= IDLE and not self.may_prefetch():
                    self._cv.wait(0.05)  # background work waits while boxes are in flight
                    continue
                priority, _, key, fut = heapq.heappop(self._heap)
                snap = self._snapshot if key[0] >= 0 else self._others.get(key[0])
                if snap is None or key[0] != snap.version or fut.done() or not fut.set_running_or_notify_cancel():
                    continue
                self._busy = True
                return snap, key[1], fut, priority >= IDLE  # the source taken with the request, under one lock

    def _state(self, state: EncoderState, seconds: float = 0.0, detail: str = "") -> None:
        if not self._stop:  # after shutdown nobody listens (the owner may be gone)
            self.on_state(state, seconds, detail)

    def _run(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            snap, index, fut, background = item
            try:
                if not background:
                    self._state(EncoderState.ENCODING)
                t0 = time.perf_counter()
                plane = self.plane(index, snap)
                if crops_only(self.model, plane.shape):  # a slide: no full view (boxes encode their crops)
                    emb, encoded = None, False
                else:
                    emb, encoded = self.model.embed_rgb_status(as_rgb(plane) if isinstance(plane, LazyU8) else plane)
                self.encoded += encoded
                fut.set_result(emb)
                if background:
                    self.prefetch_done += 1
                    if not self._stop:
                        self.on_prefetch(self.prefetch_done, self.prefetch_total)
                else:
                    self._state(EncoderState.READY, time.perf_counter() - t0)
            except Exception as exc:  # delivered to whoever waits on the future, and shown
                log.debug("encoding plane %s failed", index, exc_info=True)
                fut.set_exception(exc)
                if background:
                    log.info("background encode of plane %s failed: %s", index, exc)
                else:
                    self._state(EncoderState.ERROR, 0.0, str(exc))
            except BaseException as exc:  # KeyboardInterrupt/SystemExit: wake the waiters, then go on up
                fut.set_exception(exc)
                raise
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
