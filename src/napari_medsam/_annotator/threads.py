"""Worker threads of the box flow, joined once at interpreter exit (never from the GUI thread).

A torch forward pass still running in a daemon thread when the interpreter tears
down aborts the process, so every worker is started here and one ``atexit``
handler (registered once per process, not once per annotator) asks the owners to
stop and waits for the threads. Closing an annotator only signals its workers.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections.abc import Callable

from .constants import EXIT_JOIN_S

log = logging.getLogger(__name__)

_workers: list[tuple[threading.Thread, Callable[[], Callable[[], None] | None]]] = []
_lock = threading.Lock()
_registered = False


def start_worker(target: Callable[[], None], name: str, stop: Callable[[], None]) -> threading.Thread:
    """Start a daemon thread running ``target``; ``stop`` (thread-safe, non-blocking) is called at exit."""
    global _registered
    thread = threading.Thread(target=target, name=name, daemon=True)
    with _lock:
        if not _registered:
            atexit.register(_join_all)
            _registered = True
        _workers[:] = [(t, s) for t, s in _workers if t.is_alive()]  # owners done: nothing to stop
        _workers.append((thread, weakref.WeakMethod(stop) if hasattr(stop, "__self__") else (lambda: stop)))
    thread.start()
    return thread


def alive_workers() -> list[threading.Thread]:
    with _lock:
        return [t for t, _ in _workers if t.is_alive()]


def _join_all(timeout: float = EXIT_JOIN_S) -> None:
    with _lock:
        workers = [(t, s()) for t, s in _workers if t.is_alive()]
    for _, stop in workers:
        try:
            if stop is not None:
                stop()
        except Exception:  # must not fail: exit goes on; say what went wrong
            log.exception("stopping a MedSAM worker at exit failed")
    for thread, _ in workers:
        if thread is not threading.current_thread():
            thread.join(timeout)
