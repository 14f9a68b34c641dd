"""Autosave in the background: one writer thread, per image only the latest pending save runs."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from .threads import start_worker

log = logging.getLogger(__name__)
FLUSH_TIMEOUT_S = 120.0


class Saver:
    """Background writer. ``submit(index, job)`` replaces a save of ``index`` not started yet.

    Args:
        done: called (writer thread) with ``(index, result)``; ``result`` is what
            ``job()`` returned, or the exception it raised.
    """

    def __init__(self, done: Callable[[int, object], None]):
        self._done = done
        self._cv = threading.Condition()
        self._jobs: dict[int, Callable[[], object]] = {}
        self._busy = False
        self._stop = False
        self.written = 0
        self._thread = start_worker(self._run, "medsam-session-save", self.stop)

    def submit(self, index: int, job: Callable[[], object]) -> None:
        with self._cv:
            if self._stop:
                raise RuntimeError("the saver was stopped")
            self._jobs.pop(index, None)
            self._jobs[index] = job
            self._cv.notify_all()

    def pending(self) -> int:
        with self._cv:
            return len(self._jobs) + int(self._busy)

    def flush(self, timeout: float | None = FLUSH_TIMEOUT_S) -> bool:
        """Wait until every pending save has been written. True unless it timed out."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._jobs and not self._busy, timeout)

    def stop(self) -> None:
        """No new saves; the ones pending are still written, then the thread ends (no wait here)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()

    @property
    def stopped(self) -> bool:
        return self._stop

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._jobs or self._stop)
                if not self._jobs:
                    return  # stopped, and everything is written
                index = next(iter(self._jobs))
                job = self._jobs.pop(index)
                self._busy = True
            try:
                result = job()
                self.written += 1
            except Exception as exc:  # reported in the GUI thread by ``done``
                log.warning("saving image %d failed: %s", index, exc, exc_info=True)
                result = exc
            with self._cv:
                self._busy = False
                self._cv.notify_all()
            try:
                self._done(index, result)
            except Exception:  # the writer must go on for the other images
                log.exception("the save callback for image %d failed", index)
