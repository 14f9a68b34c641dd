"""A box decoder in a child process, for previews that must not wait on the caller's GIL.

In a GUI the main thread runs Python almost all the time while the user drags;
a decoder thread in the same process gets the GIL only between its ~100 small
torch ops, which measured here made a 35 ms decode take 130-200 ms. A child
process has its own interpreter: :class:`DecoderProcess` sends it each plane's
embedding once and then boxes, and gets masks back over a pipe.

The child loads the same model from the same checkpoint (LiteMedSAM: 40 MB) with
the same decoder options, so its masks are the parent's masks (tested). Until it
has started (a few seconds: it imports torch), or if it dies, ``ready`` is False
and callers decode in-process: the child is a speed-up, never a dependency.

Protocol (length-prefixed pickles on the child's stdin/stdout; the child's first
lines move stdout to stderr before any import, so stray prints cannot corrupt it)::

    -> ("load", name, checkpoint, fast)        <- ("ready",) | ("error", text)
    -> ("embed", key, features, original_size, resized)
    -> ("predict", key, box, region)           <- ("ok", masks, iou, boxes, seconds)
                                                 | ("rejected", text)   a bad box: ValueError
                                                 | ("missing", key)     embedding not held: resend
                                                 | ("error", text)      anything else: decode in-process
    -> ("close",)
"""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import tempfile
import threading
from collections import OrderedDict
from typing import BinaryIO, Optional

import torch

from .cache import Embedding
from .errors import MedSAMError
from .predictor import MedSAM, Prediction

_HEADER = struct.Struct("<Q")
#: embeddings the child keeps (a plane and its neighbours); the parent mirrors the LRU
KEEP = 4


def _send(stream: BinaryIO, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_HEADER.pack(len(data)))
    stream.write(data)
    stream.flush()


def _receive(stream: BinaryIO):
    header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size:
        raise EOFError("decoder process closed its pipe")
    (n,) = _HEADER.unpack(header)
    data = stream.read(n)
    if len(data) < n:
        raise EOFError("decoder process closed its pipe")
    return pickle.loads(data)


class DecoderUnavailable(RuntimeError):
    """The child is not (or no longer) running; decode in-process instead."""


class DecoderProcess:
    """Decodes boxes in a child process; see the module docstring.

    Args:
        model: the parent's loaded model; the child loads the same name and checkpoint.
        fast: decoder options for the child (``MedSAM.load``'s ``fast``).
        start: start the child now (else call :meth:`start`).
    """

    def __init__(self, model: MedSAM, fast=None, start: bool = True):
        self.name = model.name
        self.checkpoint = model.checkpoint
        self.fast = fast
        self.error: Optional[str] = None
        self._proc: Optional[subprocess.Popen] = None
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._settled = threading.Event()  # the start attempt ended (ready or failed)
        self._closed = False
        self._sent: "OrderedDict[str, None]" = OrderedDict()
        self.answered = 0  # boxes the child decoded
        self.last_decode_s = 0.0
        self._started = False
        if start:
            self.start()

    def start(self) -> None:
        """Start the child in a background thread (once); ``ready`` turns True when it answers."""
        if not self._started:
            self._started = True
            threading.Thread(target=self._start, name="medsam-decoder-process", daemon=True).start()

    @staticmethod
    def supported(model: MedSAM) -> bool:
        """Only a pretrained LiteMedSAM on the CPU (small to load twice; the GIL is what slows it),
        and not inside a frozen app, where ``sys.executable`` is the app itself."""
        return (
            model.name == "litemedsam" and str(model.device) == "cpu" and model.checkpoint is not None
            and not getattr(sys, "frozen", False)
        )

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._closed

    def wait_ready(self, timeout: Optional[float] = 180) -> bool:
        """Wait until the child answers, it failed, or ``timeout`` s passed; True if ready."""
        self._settled.wait(timeout)
        return self.ready

    def _start(self) -> None:
        log = tempfile.TemporaryFile()  # the child's stderr: the reason if it fails to start
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                env={**os.environ, "OMP_NUM_THREADS": "1"},
                creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
            )
            self._proc = proc
            if self._closed:
                raise RuntimeError("closed while starting")
            # no lock here: close() may kill the child at any moment, which ends these reads
            _send(proc.stdin, ("load", self.name, self.checkpoint, self.fast))
            reply = _receive(proc.stdout)
            if reply[0] != "ready":
                raise RuntimeError(reply[-1])
            if not self._closed:
                self._ready.set()
        except Exception as exc:  # no child: callers keep decoding in-process
            self.error = f"decoder process did not start: {exc}{_tail(log)}"
            self._kill()
        finally:
            log.close()
            self._settled.set()

    def predict(self, embedding: Embedding, box, region=None) -> Prediction:
        """Like ``MedSAM.predict(embedding, box, region=region)``, computed in the child.

        Raises:
            DecoderUnavailable: the child is not running (yet) or failed; decode in-process.
            ValueError: the child rejected the box (the engine's message).
        """
        if not self.ready:
            raise DecoderUnavailable(self.error or "decoder process not ready")
        key = embedding.key or f"id{id(embedding)}"
        with self._lock:
            try:
                reply = self._ask(embedding, key, box, region)
                if reply[0] == "missing":  # the child lost it (it should not): send it again
                    self._sent.pop(key, None)
                    reply = self._ask(embedding, key, box, region)
            except Exception as exc:  # the child died or the pipe is out of step: stop using it
                self.error = f"decoder process stopped: {type(exc).__name__}: {exc}"
                self._kill()
                raise DecoderUnavailable(self.error) from exc
        if reply[0] == "ok":
            _, masks, iou, boxes, seconds = reply
            self.last_decode_s = seconds
            self.answered += 1
            return Prediction(masks, iou, boxes)
        if reply[0] == "rejected":  # a bad box: the same error the in-process path raises
            raise ValueError(reply[1])
        raise DecoderUnavailable(f"decoder process could not decode: {reply[-1]}")

    def _ask(self, embedding: Embedding, key: str, box, region):
        if key in self._sent:
            self._sent.move_to_end(key)
        else:
            feats = embedding.features.detach().to("cpu", torch.float32).numpy()
            _send(self._proc.stdin, ("embed", key, feats, tuple(embedding.original_size), tuple(embedding.resized)))
            self._sent[key] = None
            while len(self._sent) > KEEP:
                self._sent.popitem(last=False)
        _send(self._proc.stdin, ("predict", key, tuple(float(v) for v in box), region))
        return _receive(self._proc.stdout)

    def close(self) -> None:
        """Stop the child without waiting for a decode in progress (never blocks for long)."""
        self._closed = True
        self._ready.clear()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                proc.stdin.close()  # the child sees end of input and exits
                proc.wait(timeout=2)
            except Exception:
                pass
        self._kill()

    def _kill(self) -> None:
        self._ready.clear()
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        try:
            proc.wait(timeout=5)
        except Exception:
            pass
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except Exception:
                pass


def _tail(log) -> str:
    try:
        log.seek(0)
        lines = [ln for ln in log.read().decode(errors="replace").splitlines() if ln.strip()]
        return f" ({lines[-1].strip()})" if lines else ""
    except Exception:
        return ""


#: the child's first lines: keep the protocol's stdout clean before anything is imported
_BOOT = (
    "import os, sys\n"
    "out = os.fdopen(os.dup(1), 'wb')\n"
    "os.dup2(2, 1)\n"
    "from napari_medsam.engine.decoder_process import _serve\n"
    "_serve(sys.stdin.buffer, out)\n"
)


def _serve(inp: BinaryIO, out: BinaryIO) -> None:
    """The child's loop: load, then answer until ``close`` or end of input."""
    import torch

    torch.set_num_threads(1)
    model = None
    planes: "OrderedDict[str, Embedding]" = OrderedDict()
    while True:
        try:
            msg = _receive(inp)
        except EOFError:
            return
        kind = msg[0]
        try:
            if kind == "close":
                return
            if kind == "load":
                _, name, checkpoint, fast = msg
                model = MedSAM.load(name, device="cpu", checkpoint=checkpoint, fast=fast)
                _send(out, ("ready",))
            elif kind == "embed":
                _, key, feats, original, resized = msg
                planes[key] = Embedding(torch.from_numpy(feats), tuple(original), tuple(resized), model.name, key)
                while len(planes) > KEEP:
                    planes.popitem(last=False)
            elif kind == "predict":
                _, key, box, region = msg
                if key not in planes:
                    _send(out, ("missing", key))
                    continue
                planes.move_to_end(key)  # the same LRU order as the parent's record of what was sent
                pred = model.predict(planes[key], box, region=region)
                _send(out, ("ok", pred.masks, pred.iou, pred.boxes, model.last_decode_s))
        except Exception as exc:  # reported to the parent, the child keeps serving
            text = f"{type(exc).__name__}: {exc}"
            if kind == "predict" and isinstance(exc, (MedSAMError, ValueError)):
                _send(out, ("rejected", text))
            elif kind in ("load", "predict"):
                _send(out, ("error", text))
