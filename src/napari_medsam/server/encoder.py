"""One encoder queue for every browser: a single worker thread, highest priority first.

Several labelers share one model: their encode requests go through this queue, so
the encoder runs one image at a time (no two big forward passes fighting for the
same cores or GPU), a request for an image somebody is waiting on jumps ahead of
background prefetches, and two browsers asking for the same image share one encode.
Results land in the model's :class:`EmbeddingCache` (memory LRU + disk), so the
second request for an image is a cache hit.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any

log = logging.getLogger(__name__)

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

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for _, fut, _ in self._jobs.values():
                fut.cancel()
            self._cv.notify_all()
