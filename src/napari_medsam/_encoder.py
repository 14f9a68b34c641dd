"""Background encoding of image planes, current plane first (no Qt: plain threads + futures).

An :class:`EncoderService` owns one worker thread. ``request(index)`` returns a
``Future[Embedding]``; requests are served by priority (the plane on screen
first, then propagation fronts, then neighbours prefetched in the background),
each plane at most once per intensity setting thanks to the model's cache.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from .engine.intensity import compose_channels, resolve_modality, to_uint8
from .engine.predictor import MedSAM

Index = Tuple[int, ...]
NOW, SOON, LATER = 0, 1, 2


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
    window: Optional[Tuple[float, float]] = None
    channels: Optional[Tuple[int, ...]] = None


class EncoderService:
    """Encodes planes of one :class:`Source` with one model, in a worker thread.

    Args:
        model: the loaded model (its embedding cache is used).
        on_state: called (from the worker thread) with a status string and the
            seconds the last encode took; the widget relays it to the GUI thread.
    """

    def __init__(self, model: MedSAM, on_state: Optional[Callable[[str, float], None]] = None):
        self.model = model
        self.on_state = on_state or (lambda *_: None)
        self._source: Optional[Source] = None
        self._u8: Optional[np.ndarray] = None
        self._version = 0
        self._futures: Dict[Tuple[int, Index], Future] = {}
        self._heap: list = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._stop = False
        self.encoded = 0
        self._thread = threading.Thread(target=self._run, name="medsam-encoder", daemon=True)
        self._thread.start()

    # -- GUI-thread API -------------------------------------------------------
    def set_source(self, source: Source) -> None:
        """Switch image or intensity; pending work for the old source is dropped."""
        with self._cv:
            self._source = source
            self._u8 = None
            self._version += 1
            for fut in self._futures.values():
                fut.cancel()
            self._futures.clear()
            self._heap.clear()
            self._cv.notify()

    @property
    def source(self) -> Optional[Source]:
        return self._source

    def request(self, index: Index, priority: int = NOW) -> Future:
        """Future of the embedding of plane ``index`` (leading indices of the source)."""
        with self._cv:
            key = (self._version, tuple(int(i) for i in index))
            fut = self._futures.get(key)
            if fut is None or fut.cancelled():
                fut = Future()
                self._futures[key] = fut
            if not fut.done():
                heapq.heappush(self._heap, (priority, next(self._seq), key, fut))
                self._cv.notify()
            return fut

    def plane_u8(self, index: Index) -> np.ndarray:
        """The (H, W, 3) uint8 plane the model sees (prepares the source if needed)."""
        u8 = self.prepared()
        plane = u8[tuple(index)]
        return plane if plane.ndim == 3 else np.repeat(plane[:, :, None], 3, axis=-1)

    def shutdown(self) -> None:
        """Stop the worker: pending requests are cancelled, a running encode finishes."""
        with self._cv:
            for fut in self._futures.values():
                fut.cancel()
            self._stop = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)  # a torch thread alive at interpreter exit aborts the process

    # -- worker -----------------------------------------------------------------
    def prepared(self) -> np.ndarray:
        """The whole source as the model sees it: uint8, (..., H, W) or (..., H, W, 3) (computed once per source)."""
        with self._cv:
            source, u8, version = self._source, self._u8, self._version
        if u8 is not None:
            return u8
        if source is None:
            raise RuntimeError("no image chosen")
        data = np.asarray(source.data)
        if source.channels is not None:
            u8 = compose_channels(data, source.channels, axis=0, modality=source.modality, window=source.window)
        else:
            if not source.rgb and data.ndim >= 2:
                from .engine.prompts import check_image

                check_image(data.reshape(-1, data.shape[-1]))  # NaN / constant / dtype checks over the whole stack
            intensity = resolve_modality(data, source.modality, source.window, rgb=source.rgb)
            u8 = to_uint8(data[..., :3] if source.rgb else data, intensity)
        with self._cv:
            if version == self._version:
                self._u8 = u8
        return u8

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._heap and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                _, _, key, fut = heapq.heappop(self._heap)
                if key[0] != self._version or fut.done() or not fut.set_running_or_notify_cancel():
                    continue
            try:
                self.on_state("encoding", 0.0)
                t0 = time.perf_counter()
                emb, encoded = self.model.embed_rgb_status(self.plane_u8(key[1]))
                self.encoded += encoded
                fut.set_result(emb)
                self.on_state("ready", time.perf_counter() - t0)
            except BaseException as exc:  # delivered to whoever waits on the future
                fut.set_exception(exc)
                self.on_state(f"error: {exc}", 0.0)

