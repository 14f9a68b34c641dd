"""One encoder queue for every browser: a single worker thread, highest priority first.

Several labelers share one model: their encode requests go through this queue, so
the encoder runs one image at a time (no two big forward passes fighting for the
same cores or GPU), a request for an image somebody is waiting on jumps ahead of
background prefetches, and two browsers asking for the same image share one encode.
Results land in the model's :class:`EmbeddingCache` (memory LRU + disk), so the
second request for an image is a cache hit.
"""

from __future__ import annotations

import atexit
import heapq
import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from typing import Any

from napari_medsam.engine.errors import MedSAMError

log = logging.getLogger(__name__)

#: objects with a ``close()`` that joins their threads, closed at interpreter exit if still open
_OPEN: weakref.WeakSet = weakref.WeakSet()


def close_at_exit(obj: Any) -> None:
    """Close ``obj`` (``obj.close()``) at interpreter exit unless it was closed before.

    A daemon thread still inside ONNX Runtime or torch when the interpreter finalizes
    is ended from under that native code, which aborts the process ("terminate called
    without an active exception") after everything else passed. ``atexit`` handlers run
    while such threads still run normally, so joining them there ends the process cleanly.
    """
    _OPEN.add(obj)


@atexit.register
def _close_open() -> None:
    for obj in list(_OPEN):
        try:
            obj.close()
        except Exception as exc:  # noqa: BLE001 - exit goes on; say what did not close
            log.warning("closing %r at exit failed: %s", obj, exc)


class ClosedError(MedSAMError, RuntimeError):
    """The service is shutting down."""


class InFlight:
    """Counts model calls in progress so that closing waits for them (no thread left inside the model)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._n = 0
        self.closed = False

    @contextmanager
    def __call__(self) -> Iterator[None]:
        with self._cv:
            if self.closed:
                raise ClosedError("the server is shutting down")
            self._n += 1
        try:
            yield
        finally:
            with self._cv:
                self._n -= 1
                self._cv.notify_all()

    def drain(self, timeout: float | None = 60.0) -> bool:
        """Refuse new calls and wait for those running; False if some still run after ``timeout``."""
        with self._cv:
            self.closed = True
            return self._cv.wait_for(lambda: self._n == 0, timeout)


NOW, SOON, PREFETCH = 0, 1, 2  # priorities: someone waits / the next image / background


class EncoderQueue:
    """Run ``job()`` callables one at a time on a worker thread, by priority, deduplicated by key."""

    def __init__(self, name: str = "medsam-encoder"):
        self._heap: list[tuple[int, int, Hashable]] = []
        self._jobs: dict[Hashable, tuple[Callable[[], Any], Future, int]] = {}
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._closed = False
        self.encodes = 0
        self.busy_s = 0.0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        close_at_exit(self)

    def submit(self, key: Hashable, job: Callable[[], Any], priority: int = NOW) -> Future:
        """Queue ``job`` under ``key``; a key already queued or running shares its future (priority raised)."""
        with self._cv:
            if self._closed:
                raise RuntimeError("encoder queue is closed")
            if key in self._jobs:
                old_job, fut, old_pri = self._jobs[key]
                if priority < old_pri and not fut.running():
                    self._jobs[key] = (old_job, fut, priority)
                    heapq.heappush(self._heap, (priority, next(self._seq), key))
                return fut
            fut: Future = Future()
            self._jobs[key] = (job, fut, priority)
            heapq.heappush(self._heap, (priority, next(self._seq), key))
            self._cv.notify()
            return fut

    def pending(self) -> int:
        with self._cv:
            return len(self._jobs)

    def _next(self):
        with self._cv:
            while True:
                if self._closed:
                    return None
                while self._heap:
                    pri, _, key = heapq.heappop(self._heap)
                    entry = self._jobs.get(key)
                    if entry is None or entry[2] != pri or entry[1].running() or entry[1].done():
                        continue  # a stale heap entry (priority raised since)
                    if not entry[1].set_running_or_notify_cancel():
                        self._jobs.pop(key, None)
                        continue
                    return key, entry
                self._cv.wait()

    def _run(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            key, (job, fut, _) = item
            t0 = time.perf_counter()
            try:
                result = job()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting request, which re-raises it
                log.debug("encode %s failed: %s", key, exc)
                fut.set_exception(exc)
            else:
                fut.set_result(result)
            finally:
                self.busy_s += time.perf_counter() - t0
                self.encodes += 1
                with self._cv:
                    self._jobs.pop(key, None)

    def close(self, timeout: float | None = 60.0) -> None:
        """Cancel what waits, let the running job finish and join the worker (up to ``timeout``)."""
        with self._cv:
            self._closed = True
            for _, fut, _ in self._jobs.values():
                fut.cancel()
            self._cv.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the encoder worker is still running after %s s", timeout)
