"""A box decoder in a child process, for previews that must not wait on the caller's GIL.

In a GUI the main thread runs Python almost all the time while the user drags;
a decoder thread in the same process gets the GIL only between its ~100 small
torch ops, which measured here made a 35 ms decode take 130-200 ms. A child
process has its own interpreter: :class:`DecoderProcess` sends it each plane's
embedding once and then boxes, and gets masks back over a pipe.

The child loads the same model from the same checkpoint (LiteMedSAM: 40 MB) with
the same decoder options, so its masks are the parent's masks (tested). Until it
has started (a few seconds: it imports torch), or if it dies, hangs or answers
anything but a well-formed answer to the request just sent, ``ready`` is False and
callers decode in-process: the child is a speed-up, never a dependency.

The channel (tested in ``tests/test_decoder_process.py``):

* two pipes of their own (POSIX: file descriptors passed to the child, its stdin is
  ``/dev/null`` and its stdout goes to the log with stderr, before any import), so no
  print, library or grandchild can write into the answers;
* frames ``magic | request id | length | HMAC-SHA256(key, id + payload) | pickle``,
  with a random key sent first on the request pipe: a frame that does not carry the
  key, the id of the pending request or a known answer of the right shape is never
  unpickled or used, and the child is treated as dead.

Messages::

    -> ("load", name, checkpoint, fast)        <- ("ready",) | ("error", text)
    -> ("embed", key, features, original_size, resized)      (no answer; the child warms its decoder)
    -> ("predict", key, box, region)           <- ("ok", masks, iou, boxes, seconds)
                                                 | ("rejected", text)   a bad box: ValueError
                                                 | ("missing", key)     embedding not held: resend
                                                 | ("error", text)      anything else: decode in-process
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from typing import IO, Any

import torch

from .cache import Embedding, content_hash
from .decoder_channel import (
    KEY_BYTES,
    ProtocolError,
    check_answer,
    receive_frame,
    send_frame,
    write_all,
)
from .decoder_child import BOOT as _BOOT
from .decoder_child import KEEP
from .predictor import MedSAM, Prediction

log = logging.getLogger(__name__)

#: seconds the child has to import torch, load the model and say ready
START_TIMEOUT_S = 180.0
#: seconds one answer may take before the child is taken for hung
ANSWER_TIMEOUT_S = 30.0
CLOSE_WAIT_S = 2.0
KILL_WAIT_S = 5.0


class DecoderUnavailable(RuntimeError):
    """The child is not (or no longer) running; decode in-process instead."""


def _expected_shape(embedding: Embedding, region: Any) -> tuple:
    if region is not None:
        y0, y1, x0, x1 = (int(v) for v in region)
        return (1, y1 - y0, x1 - x0)
    return (1, int(embedding.original_size[0]), int(embedding.original_size[1]))


def _embedding_key(embedding: Embedding) -> str:
    """The cache key, else a digest of the content: never ``id()``, which is reused after GC."""
    if embedding.key:
        return embedding.key
    feats = embedding.features.detach().to("cpu").contiguous().numpy()
    return f"anon-{content_hash(feats)}-{tuple(embedding.original_size)}-{tuple(embedding.resized)}"


class DecoderProcess:
    """Decodes boxes in a child process; see the module docstring.

    Args:
        model: the parent's loaded model; the child loads the same name and checkpoint.
        fast: decoder options for the child (``MedSAM.load``'s ``fast``).
        start: start the child now (else call :meth:`start`).
        answer_timeout: seconds an answer may take before the child is taken for hung.
    """

    #: the child's program (tests substitute a faulty one)
    boot: str = ""

    def __init__(self, model: MedSAM, fast: Any = None, start: bool = True, answer_timeout: float = ANSWER_TIMEOUT_S):
        self.name = model.name
        self.checkpoint = model.checkpoint
        self.fast = fast
        self.answer_timeout = answer_timeout
        self.error: str | None = None
        self._proc: subprocess.Popen | None = None
        self._fds: tuple[int, int] | None = None  # (requests to write, answers to read)
        self._key = secrets.token_bytes(KEY_BYTES)
        self._ids = itertools.count(1)
        self._lock = threading.Lock()  # one request in flight; fds closed only under it
        self._start_lock = threading.Lock()
        self._ready = threading.Event()
        self._settled = threading.Event()  # the start attempt ended (ready or failed)
        self._closed = False
        self._sent: OrderedDict[str, None] = OrderedDict()
        self.answered = 0  # boxes the child decoded
        self.last_decode_s = 0.0
        self._started = False
        if start:
            self.start()

    def start(self) -> None:
        """Start the child in a background thread (once); ``ready`` turns True when it answers."""
        with self._start_lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._start, name="medsam-decoder-process", daemon=True).start()

    @staticmethod
    def supported(model: MedSAM) -> bool:
        """Only a pretrained LiteMedSAM on the CPU (small to load twice; the GIL is what slows it),
        and not inside a frozen app, where ``sys.executable`` is the app itself."""
        return (
            model.name == "litemedsam"
            and str(model.device) == "cpu"
            and model.checkpoint is not None
            and not getattr(sys, "frozen", False)
        )

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and not self._closed

    def wait_ready(self, timeout: float | None = START_TIMEOUT_S) -> bool:
        """Wait until the child answers, it failed, or ``timeout`` s passed; True if ready."""
        self._settled.wait(timeout)
        return self.ready

    def _spawn(self, log_file: IO[bytes]) -> None:
        boot = self.boot or _BOOT
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if os.name == "nt":  # no fd passing: stdin/stdout pipes, the child moves stdout away first
            proc = subprocess.Popen(
                [sys.executable, "-c", boot, "stdio"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                env=env,
                creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
            )
            assert proc.stdin is not None and proc.stdout is not None
            self._fds = (os.dup(proc.stdin.fileno()), os.dup(proc.stdout.fileno()))
            proc.stdin.close()
            proc.stdout.close()
        else:
            req_r, req_w = os.pipe()
            ans_r, ans_w = os.pipe()
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-c", boot, str(req_r), str(ans_w)],
                    stdin=subprocess.DEVNULL,
                    stdout=log_file,
                    stderr=log_file,
                    env=env,
                    pass_fds=(req_r, ans_w),
                )
            except BaseException:
                for fd in (req_r, req_w, ans_r, ans_w):
                    os.close(fd)
                raise
            os.close(req_r)
            os.close(ans_w)
            self._fds = (req_w, ans_r)
        self._proc = proc

    def _start(self) -> None:
        log_file = tempfile.TemporaryFile()  # noqa: SIM115 - the child's stdout+stderr, closed in finally
        try:
            with self._lock:
                if self._closed:
                    raise RuntimeError("closed before starting")
                self._spawn(log_file)
                assert self._fds is not None
                if self._closed:
                    raise RuntimeError("closed while starting")
                write_all(self._fds[0], self._key)
                reply = self._request(("load", self.name, self.checkpoint, self.fast), "load", START_TIMEOUT_S)
                if reply[0] != "ready":
                    raise RuntimeError(reply[-1])
                if self._closed:
                    raise RuntimeError("closed while starting")
                self._ready.set()
        except Exception as exc:  # noqa: BLE001 - any failure to start means: decode in-process
            self.error = f"decoder process did not start: {type(exc).__name__}: {exc}{_tail(log_file)}"
            log.info("%s", self.error)
            self._kill()
        finally:
            log_file.close()
            self._settled.set()

    def _request(
        self, message: tuple, kind: str, timeout: float, shape: tuple | None = None, key: str | None = None
    ) -> tuple:
        """Send one request and return its checked answer (caller holds ``_lock``)."""
        assert self._fds is not None
        rid = next(self._ids)
        send_frame(self._fds[0], self._key, rid, message)
        got, reply = receive_frame(self._fds[1], self._key, time.monotonic() + timeout)
        if got != rid:
            raise ProtocolError(f"answer to request {got}, expected {rid}")
        return check_answer(reply, kind, shape, key)

    def predict(self, embedding: Embedding, box: Any, region: Any = None) -> Prediction:
        """Like ``MedSAM.predict(embedding, box, region=region)``, computed in the child.

        Raises:
            DecoderUnavailable: the child is not running (yet) or failed; decode in-process.
            ValueError: the child rejected the box (the engine's message).
        """
        if not self.ready:
            raise DecoderUnavailable(self.error or "decoder process not ready")
        key = _embedding_key(embedding)
        shape = _expected_shape(embedding, region)
        with self._lock:
            try:
                if self._fds is None:
                    raise EOFError("decoder process closed")
                reply = self._ask(embedding, key, box, region, shape)
                if reply[0] == "missing":  # the child lost it (it should not): send it again
                    self._sent.pop(key, None)
                    reply = self._ask(embedding, key, box, region, shape)
            except Exception as exc:  # died, hung, or answered garbage: stop using it
                self.error = f"decoder process stopped: {type(exc).__name__}: {exc}"
                log.warning("%s; decoding in-process from now on", self.error)
                self._kill_locked()
                raise DecoderUnavailable(self.error) from exc
        if reply[0] == "ok":
            _, masks, iou, boxes, seconds = reply
            self.last_decode_s = seconds
            self.answered += 1
            return Prediction(masks, iou, boxes)
        if reply[0] == "rejected":  # a bad box: the same error the in-process path raises
            raise ValueError(reply[1])
        raise DecoderUnavailable(f"decoder process could not decode: {reply[-1]}")

    def send(self, embedding: Embedding) -> bool:
        """Hand ``embedding`` to the child before its first box (the child makes its decoder state
        then: a prefetched next image); False if the child is not ready (the first box sends it)."""
        with self._lock:
            if not self.ready or self._fds is None:
                return False
            try:
                self._send_locked(embedding, _embedding_key(embedding))
                return True
            except (OSError, ValueError, ProtocolError) as exc:  # a broken pipe: the child is gone
                self.error = f"decoder process stopped: {type(exc).__name__}: {exc}"
                self._kill_locked()
                return False

    def _send_locked(self, embedding: Embedding, key: str) -> None:
        assert self._fds is not None
        if key in self._sent:
            self._sent.move_to_end(key)
            return
        feats = embedding.features.detach().to("cpu", torch.float32).numpy()
        message = ("embed", key, feats, tuple(embedding.original_size), tuple(embedding.resized))
        send_frame(self._fds[0], self._key, next(self._ids), message)
        self._sent[key] = None
        while len(self._sent) > KEEP:
            self._sent.popitem(last=False)

    def _ask(self, embedding: Embedding, key: str, box: Any, region: Any, shape: tuple) -> tuple:
        assert self._fds is not None
        self._send_locked(embedding, key)
        request = ("predict", key, tuple(float(v) for v in box), region)
        return self._request(request, "predict", self.answer_timeout, shape, key)

    def close(self) -> None:
        """Stop the child without waiting for a decode in progress (never blocks for long)."""
        self._closed = True
        self._ready.clear()
        proc = self._proc
        if proc is not None and proc.poll() is None and self._lock.acquire(timeout=0.05):
            try:  # idle: end of input lets the child exit on its own
                if self._fds is not None:
                    os.close(self._fds[0])
                    self._fds = (-1, self._fds[1])
            except OSError as exc:
                log.debug("decoder process: closing its request pipe: %s", exc)
            finally:
                self._lock.release()
            try:
                proc.wait(timeout=CLOSE_WAIT_S)
            except subprocess.TimeoutExpired:
                log.debug("decoder process did not exit within %s s of end of input: killing it", CLOSE_WAIT_S)
        self._kill()

    def _kill(self) -> None:
        """Kill the child; its pipes are closed by whoever holds the request lock (the reader, or us)."""
        self._ready.clear()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()  # ends any read in progress with end of file
        if self._lock.acquire(timeout=KILL_WAIT_S):
            try:
                self._kill_locked()
            finally:
                self._lock.release()

    def _kill_locked(self) -> None:
        self._ready.clear()
        proc, self._proc = self._proc, None
        fds, self._fds = self._fds, None
        self._sent.clear()
        if proc is not None:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                log.warning("decoder process %s did not exit after kill", proc.pid)
        for fd in fds or ():
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError as exc:
                    log.debug("decoder process: closing a pipe: %s", exc)


def _tail(log_file: IO[bytes]) -> str:
    try:
        log_file.seek(0)
        lines = [ln for ln in log_file.read().decode(errors="replace").splitlines() if ln.strip()]
        return f" ({lines[-1].strip()})" if lines else ""
    except (OSError, ValueError) as exc:
        log.debug("decoder process: cannot read its log: %s", exc)
        return ""
