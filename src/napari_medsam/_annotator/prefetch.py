"""Background encoding while the user works: the slices of a volume (current slice outward) and the
next image of a session, at the lowest priority and only while no box is in flight.

A plane on screen is always requested at :data:`~.constants.Priority.NOW` and so goes before any
background plane; background planes start only while :meth:`Prefetch.quiet` holds (no box waiting
or decoding, no preview being decoded, no box event for :data:`QUIET_S`). A background encode that
has already started runs to its end (a forward pass cannot be stopped half-way): at worst a box
drawn at that instant waits for one encode. Embeddings land in the model's cache (fp16 on the fast
path; a session's cache also keeps them on disk), within :func:`budget` planes.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from napari_medsam.engine.precompute import outward

from .constants import Priority

#: seconds without a box event before background encoding may start again
QUIET_S = 0.4
#: bytes of one embedding when none is known yet (LiteMedSAM / MedSAM: 256 x 64 x 64 floats)
EMBEDDING_BYTES = 256 * 64 * 64 * 4


def budget(cache, n_planes: int, plane_bytes: int = EMBEDDING_BYTES) -> int:
    """How many planes to encode ahead: all with a disk store, else what half the memory cache holds."""
    if cache is None:
        return 0
    if getattr(cache, "disk_dir", None) is not None and getattr(cache, "disk_writable", False):
        return n_planes
    per = plane_bytes // 2 if getattr(cache, "fp16", False) else plane_bytes
    return max(0, min(n_planes, int(cache.max_bytes) // 2 // max(per, 1)))


class Prefetch:
    """The background-encoding policy of one annotator (GUI thread, except :meth:`quiet`)."""

    def __init__(
        self, encoder, decoder, on_progress: Callable[[int, int], None], busy: Callable[[], bool] = lambda: False
    ):
        self.encoder = encoder
        self.decoder = decoder
        self.busy = busy  # other foreground work (a running 3D propagation)
        self.last_box = 0.0
        encoder.may_prefetch = self.quiet
        encoder.on_prefetch = on_progress

    def quiet(self) -> bool:
        """No box in flight, no preview decoding, no recent box event, no propagation (encoder worker)."""
        return (
            time.monotonic() - self.last_box > QUIET_S
            and not self.decoder.decoding_preview.is_set()
            and self.decoder.idle()
            and not self.busy()
        )

    def box_event(self) -> None:
        self.last_box = time.monotonic()

    def around(self, index: tuple[int, ...], spatial: tuple[int, ...], model) -> None:
        """Plane ``index`` is on screen: its neighbours soon, then the rest of its axis in the background."""
        if not index:
            return
        size = spatial[len(index) - 1]
        order = outward(size, index[-1])
        for z in order[1:3]:
            self.encoder.request((*index[:-1], z), Priority.SOON)
        n = budget(getattr(model, "cache", None), size)
        self.encoder.prefetch([(*index[:-1], z) for z in order[3:n]])

    def image(self, source) -> list:
        """Encode another (2D) image in the background, e.g. the next one of a session; the decoder
        (in-process and the preview child) makes its per-image state then too, so after Next the
        first box is one decode."""
        futures = self.encoder.prefetch([()], source)
        for fut in futures:
            fut.add_done_callback(self._warm)
        return futures

    def _warm(self, fut) -> None:  # the encoder's worker thread, right after the encode
        if not fut.cancelled() and fut.exception() is None:
            self.decoder.warm(fut.result())
