"""Each image is edited by one labeler at a time.

Policy: the first browser that opens an image holds it; its page sends a
heartbeat, and the hold lapses ``lease_s`` seconds after the last one (a closed
tab frees its image by itself). Another browser that opens a held image sees it
read-only (it can look, it cannot draw, and the server refuses its writes with
409) and its "next pending" skips held images.
"""

from __future__ import annotations

import threading
import time


class ImageLocks:
    def __init__(self, lease_s: float = 20.0):
        self.lease_s = float(lease_s)
        self._held: dict[int, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def _alive(self, index: int, now: float) -> str | None:
        entry = self._held.get(index)
        if entry is None:
            return None
        if now - entry[1] > self.lease_s:
            del self._held[index]
            return None
        return entry[0]

    def acquire(self, index: int, client: str) -> bool:
        """Hold ``index`` for ``client`` (dropping what else it held); False if another labeler holds it."""
        now = time.monotonic()
        with self._lock:
            owner = self._alive(index, now)
            if owner is not None and owner != client:
                return False
            for i, (c, _) in list(self._held.items()):
                if c == client and i != index:
                    del self._held[i]
            self._held[index] = (client, now)
            return True

    def holder(self, index: int) -> str | None:
        with self._lock:
            return self._alive(index, time.monotonic())

    def holds(self, index: int, client: str) -> bool:
        return self.holder(index) == client

    def touch(self, client: str) -> int | None:
        """Heartbeat: renew what ``client`` holds; returns the image index or None."""
        now = time.monotonic()
        with self._lock:
            for i, (c, t) in list(self._held.items()):
                if c == client:
                    if now - t > self.lease_s:
                        del self._held[i]
                        return None
                    self._held[i] = (c, now)
                    return i
        return None

    def release(self, client: str) -> None:
        with self._lock:
            for i, (c, _) in list(self._held.items()):
                if c == client:
                    del self._held[i]

    def held(self) -> dict[int, str]:
        now = time.monotonic()
        with self._lock:
            return {i: c for i in list(self._held) if (c := self._alive(i, now)) is not None}
