"""The decoder child's channel: signed, length-prefixed pickle frames over two pipes.

A frame is ``magic | request id | length | HMAC-SHA256(key, id + payload) | pickle``.
:func:`receive_frame` checks magic, length and signature before anything is
unpickled, and :func:`check_answer` accepts only a known answer of the right form to
the request just sent; everything else is a :class:`ProtocolError`, which the parent
treats like a dead child (see :mod:`engine.decoder_process`).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import pickle
import select
import struct
import time
from typing import Any

import numpy as np

_MAGIC = b"MSD2"
_HEADER = struct.Struct("<4sQQ32s")  # magic, request id, payload length, HMAC
KEY_BYTES = 32
#: larger frames are garbage, refused before anything is allocated
MAX_FRAME = 1 << 31


class ProtocolError(Exception):
    """Bytes on the channel that are not a well-formed, authentic answer to the pending request."""


def _mac(key: bytes, rid: int, data: bytes) -> bytes:
    return hmac.new(key, rid.to_bytes(8, "little") + data, hashlib.sha256).digest()


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def read_exact(fd: int, n: int, deadline: float | None = None) -> bytes:
    chunks, got = [], 0
    while got < n:
        if deadline is not None and os.name != "nt":
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError("no answer from the decoder process in time")
        block = os.read(fd, min(n - got, 1 << 20))
        if not block:
            raise EOFError("decoder process closed its pipe")
        chunks.append(block)
        got += len(block)
    return b"".join(chunks)


def send_frame(fd: int, key: bytes, rid: int, message: Any) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    write_all(fd, _HEADER.pack(_MAGIC, rid, len(data), _mac(key, rid, data)) + data)


def receive_frame(fd: int, key: bytes, deadline: float | None = None) -> tuple[int, Any]:
    """(request id, message) of the next frame; :class:`ProtocolError` before unpickling anything not ours."""
    magic, rid, n, mac = _HEADER.unpack(read_exact(fd, _HEADER.size, deadline))
    if magic != _MAGIC:
        raise ProtocolError(f"not a frame (starts with {magic!r})")
    if n > MAX_FRAME:
        raise ProtocolError(f"frame of {n} bytes")
    data = read_exact(fd, n, deadline)
    if not hmac.compare_digest(mac, _mac(key, rid, data)):
        raise ProtocolError("frame not signed with this channel's key")
    return rid, pickle.loads(data)


def check_answer(reply: Any, request: str, shape: tuple | None = None, key: str | None = None) -> tuple:
    """The reply if it is a known answer to ``request`` of the right form; :class:`ProtocolError` otherwise."""
    if not isinstance(reply, tuple) or not reply or not isinstance(reply[0], str):
        raise ProtocolError(f"answer of type {type(reply).__name__}")
    tag = reply[0]
    if request == "load" and reply == ("ready",):
        return reply
    if tag in ("error", "rejected") and len(reply) == 2 and isinstance(reply[1], str):
        if tag == "rejected" and request != "predict":
            raise ProtocolError("'rejected' answering a load")
        return reply
    if request == "predict" and tag == "missing" and len(reply) == 2 and reply[1] == key:
        return reply
    if request == "predict" and tag == "ok" and len(reply) == 5:
        _, masks, iou, boxes, seconds = reply
        ok = (
            isinstance(masks, np.ndarray)
            and masks.dtype == np.bool_
            and masks.ndim == 3
            and (shape is None or masks.shape == shape)
            and isinstance(iou, np.ndarray)
            and iou.shape == (masks.shape[0],)
            and iou.dtype.kind == "f"
            and isinstance(boxes, np.ndarray)
            and boxes.shape == (masks.shape[0], 4)
            and isinstance(seconds, float)
            and math.isfinite(seconds)
        )
        if ok:
            return reply
        raise ProtocolError("'ok' answer of the wrong form")
    raise ProtocolError(f"unexpected answer {tag!r} to {request!r}")
