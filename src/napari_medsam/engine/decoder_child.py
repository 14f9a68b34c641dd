"""The child's side of :mod:`.decoder_process`: its first lines and its answer loop.

The parent starts ``python -c BOOT`` with the two pipes; ``serve`` reads the key, loads
the model the parent names and answers until the request pipe closes (the messages are
listed in :mod:`.decoder_process`).
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from .cache import Embedding
from .decoder_channel import KEY_BYTES, ProtocolError, read_exact, receive_frame, send_frame
from .errors import MedSAMError
from .predictor import MedSAM

#: embeddings the child keeps (a plane and its neighbours); the parent mirrors the LRU
KEEP = 4

#: the child's first lines: the answer channel is a pipe of its own; stdout joins stderr
#: before anything is imported, so stray prints go to the log
BOOT = (
    "import os, sys\n"
    "if sys.argv[1] == 'stdio':\n"
    "    req, ans = os.dup(0), os.dup(1)\n"
    "else:\n"
    "    req, ans = int(sys.argv[1]), int(sys.argv[2])\n"
    "os.dup2(2, 1)\n"
    "os.set_inheritable(req, False)\n"
    "os.set_inheritable(ans, False)\n"
    "from napari_medsam.engine.decoder_child import serve\n"
    "serve(req, ans)\n"
)


def serve(req: int, ans: int) -> None:
    """The child's loop: read the key, load, then answer until end of input."""
    torch.set_num_threads(1)
    try:
        key = read_exact(req, KEY_BYTES)
    except EOFError:
        return
    model = None
    planes: OrderedDict[str, Embedding] = OrderedDict()
    while True:
        try:
            rid, msg = receive_frame(req, key)
        except (EOFError, ProtocolError, OSError):
            return
        kind = msg[0]
        try:
            if kind == "load":
                _, name, checkpoint, fast = msg
                model = MedSAM.load(name, device="cpu", checkpoint=checkpoint, fast=fast)
                send_frame(ans, key, rid, ("ready",))
            elif kind == "embed":
                _, ekey, feats, original, resized = msg
                assert model is not None
                planes[ekey] = Embedding(torch.from_numpy(feats), tuple(original), tuple(resized), model.name, ekey)
                model.warm(planes[ekey])  # the decoder state now, before the first box asks
                while len(planes) > KEEP:
                    planes.popitem(last=False)
            elif kind == "predict":
                _, ekey, box, region = msg
                if ekey not in planes:
                    send_frame(ans, key, rid, ("missing", ekey))
                    continue
                planes.move_to_end(ekey)  # the same LRU order as the parent's record of what was sent
                assert model is not None
                pred = model.predict(planes[ekey], box, region=region)
                reply = ("ok", pred.masks, pred.iou, pred.boxes, float(model.last_decode_s))
                send_frame(ans, key, rid, reply)
        except Exception as exc:  # noqa: BLE001 - reported to the parent, the child keeps serving
            text = f"{type(exc).__name__}: {exc}"
            if kind == "predict" and isinstance(exc, MedSAMError | ValueError):
                send_frame(ans, key, rid, ("rejected", text))
            elif kind in ("load", "predict"):
                send_frame(ans, key, rid, ("error", text))
