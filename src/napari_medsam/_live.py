"""Decoding boxes while they are dragged: the latest box wins, accepts are never dropped.

:class:`LatestBoxDecoder` runs one worker thread. ``preview(job)`` replaces any
preview job still waiting (so the decoder only ever works on the newest box);
``accept(job)`` is queued FIFO and served before previews. If the plane's
embedding is still being encoded the worker waits for it and then answers the
box that is current at that moment. Results go to ``on_result`` from the worker
thread; the plugin forwards them to the GUI thread with a Qt signal.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

import numpy as np

from .engine.decoder_process import DecoderProcess, DecoderUnavailable
from .engine.predictor import MedSAM, Prediction

#: previews decode with the fused decoder on one thread (engine/fast.py); the
#: encoder and accepted labels keep the authors' exact numerics.
PREVIEW_FAST = {"encoder": None, "decoder": "fused", "auto_region": True, "decoder_threads": 1}
#: ViT models (MedSAM, SAM): the encoder's attention as one fused kernel (engine/fast.py
#: ``sdpa_vit``; embeddings equal to float rounding), ~2.3x faster per slice on a CPU.
VIT_FAST = {"encoder": "sdpa", "decoder": None}


def lite_options(fast_encoder: bool = False) -> dict:
    """LiteMedSAM's ``fast`` options in the plugin: :data:`PREVIEW_FAST`, plus with ``fast_encoder``
    the measured fastest encoder that keeps the masks (ONNX Runtime if installed, else the fused
    PyTorch TinyViT; engine/fast.py ``fast_options``)."""
    if not fast_encoder:
        return dict(PREVIEW_FAST)
    from .engine.fast import fast_options

    return {**PREVIEW_FAST, "encoder": fast_options(True)["encoder"]}

Index = Tuple[int, ...]


@dataclass
class BoxJob:
    """One box to decode.

    Attributes:
        generation: increases with every mouse move; results of older ones are stale.
        index: leading indices of the plane (slice, time...).
        box: x0, y0, x1, y1 in plane pixels.
        embedding: future of the plane's embedding.
        kind: ``"preview"`` or ``"accept"``.
        shape_index: the box's row in the Shapes layer (accepts).
        t_event: perf_counter time of the mouse event (latency measurement).
    """

    generation: int
    index: Index
    box: Tuple[float, float, float, float]
    embedding: Future
    kind: str = "preview"
    shape_index: int = -1
    t_event: float = field(default_factory=time.perf_counter)


@dataclass
class BoxResult:
    job: BoxJob
    prediction: Optional[Prediction] = None
    region: Optional[Tuple[int, int, int, int]] = None
    error: Optional[BaseException] = None
    decode_s: float = 0.0


def preview_region(box, shape, margin: float = 0.25) -> Tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the box grown by ``margin`` of its size, clipped to ``shape``.

    MedSAM's masks stay close to their box (it was trained on tight boxes with
    0-20 px jitter); the preview computes the mask only here. Accepted labels use
    the full plane.
    """
    h, w = shape
    x0, y0, x1, y1 = box
    mx, my = (x1 - x0) * margin + 8, (y1 - y0) * margin + 8
    return (
        int(max(0, np.floor(min(y0, y1) - my))),
        int(min(h, np.ceil(max(y0, y1) + my) + 1)),
        int(max(0, np.floor(min(x0, x1) - mx))),
        int(min(w, np.ceil(max(x0, x1) + mx) + 1)),
    )


class LatestBoxDecoder:
    """Single worker thread answering box jobs; see the module docstring."""

    def __init__(
        self, model: MedSAM, on_result: Callable[[BoxResult], None], on_busy: Callable[[bool], None] = lambda b: None,
        remote: Optional[DecoderProcess] = None,
    ):
        self.model = model
        self.remote = remote  # previews go to this child process when it is ready
        self.on_result = on_result
        self.on_busy = on_busy
        self._cv = threading.Condition()
        self._preview: Optional[BoxJob] = None
        self._accepts: deque = deque()
        self._stop = False
        self._working = False
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="medsam-decoder", daemon=True)
        self._thread.start()

    def preview(self, job: BoxJob) -> None:
        with self._cv:
            if self._preview is not None:
                self.dropped += 1
            self._preview = job
            self._cv.notify()

    def accept(self, job: BoxJob) -> None:
        with self._cv:
            self._preview = None  # the drag is over: its last preview is moot
            self._accepts.append(job)
            self._cv.notify()

    def idle(self) -> bool:
        with self._cv:
            return self._preview is None and not self._accepts and not self._working

    def shutdown(self) -> None:
        if self.remote is not None:
            self.remote.close()
        with self._cv:
            self._stop = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=60)  # a torch thread alive at interpreter exit aborts the process

    def _next(self) -> Optional[BoxJob]:
        with self._cv:
            while self._preview is None and not self._accepts and not self._stop:
                self._cv.wait()
            if self._stop:
                return None
            self._working = True
            if self._accepts:
                return self._accepts.popleft()
            job, self._preview = self._preview, None
            return job

    def _run(self) -> None:
        while True:
            job = self._next()
            if job is None:
                return
            try:
                if not job.embedding.done():
                    self.on_busy(True)
                    job.embedding.result()
                    self.on_busy(False)
                    if job.kind == "preview":  # answer the box that is current now
                        with self._cv:
                            if self._preview is not None:
                                job, self._preview = self._preview, None
                        job.embedding.result()
                self.on_result(self._decode(job))
            except BaseException as exc:
                self.on_busy(False)
                self.on_result(BoxResult(job, error=exc))
            finally:
                with self._cv:
                    self._working = False

    def _decode(self, job: BoxJob) -> BoxResult:
        emb = job.embedding.result()
        t0 = time.perf_counter()
        if job.kind == "accept":  # labels: the authors' exact numerics, full plane
            region, pred = None, self.model.predict(emb, job.box, exact=True)
        else:
            region = preview_region(job.box, emb.original_size)
            pred = None
            if self.remote is not None and self.remote.ready:
                try:
                    pred = self.remote.predict(emb, job.box, region)
                except DecoderUnavailable:
                    pred = None  # decode here instead
            if pred is None:
                pred = self.model.predict(emb, job.box, region=region)
        return BoxResult(job, pred, region, decode_s=time.perf_counter() - t0)
