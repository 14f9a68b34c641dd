"""The fused decoder's maths run by ONNX Runtime: the two graphs of :mod:`.split_decoder`.

:class:`OrtDecoder` answers like :class:`~.decoder.FusedDecoder` (``image_state``, ``logits``),
so :class:`~napari_medsam.engine.fast.Accelerator` uses either: the image graph runs once
per embedding (memoised by its cache key), the box graph once per box on the token window
around it. One ONNX Runtime call per box instead of ~250 small torch ops: measured
``benchmarks/speed.py``. The graphs are exported once per weights into the folder of the
ONNX encoder (:func:`.onnx._onnx_dir`) and reused by every later process.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from napari_medsam.engine.atomic import atomic_write

from . import split_decoder
from .decoder import FILL_LOGIT, StateMemo
from .onnx import _export, _onnx_dir, _weights_digest
from .split_decoder import IMAGE_OUTPUTS, BoxPart, ImagePart


@dataclass(frozen=True)
class OrtState:
    """One embedding's outputs of the image graph, fed to every box of it."""

    feed: dict[str, np.ndarray]
    grid: tuple[int, int]


def export_split(module: Any, dense_pe: torch.Tensor, cache_dir: str | None = None) -> tuple[str, str]:
    """The image and box graphs of ``module``'s decoder as ONNX files (exported once); their paths."""
    pe = dense_pe.detach().cpu().float()
    image_part, box_part = ImagePart(module, pe).cpu().eval(), BoxPart(module, pe).cpu().eval()
    code = hashlib.blake2b(Path(split_decoder.__file__).read_bytes(), digest_size=4).hexdigest()
    stem = os.path.join(_onnx_dir(cache_dir), f"decoder-{_weights_digest(box_part)}-{code}")
    emb = torch.zeros(1, int(pe.shape[1]), *pe.shape[-2:], dtype=torch.float16)
    if not os.path.exists(stem + "-image.onnx"):
        atomic_write(
            stem + "-image.onnx", lambda tmp: _export(image_part, (emb,), str(tmp), ["embedding"], IMAGE_OUTPUTS)
        )
    if not os.path.exists(stem + "-box.onnx"):
        with torch.no_grad():
            state = image_part(torch.randn(emb.shape).to(torch.float16))
        args = (*state, torch.tensor([[30.0, 40.0, 120.0, 150.0]]), torch.arange(5, 20), torch.arange(3, 30))
        dynamic = {"rows": {0: "nr"}, "cols": {0: "nc"}, "logits": {0: "pixels"}}
        names = [*IMAGE_OUTPUTS, "box", "rows", "cols"]
        atomic_write(
            stem + "-box.onnx", lambda tmp: _export(box_part, args, str(tmp), names, ["logits", "iou"], dynamic)
        )
    return stem + "-image.onnx", stem + "-box.onnx"


class OrtDecoder:
    """LiteMedSAM's prompt encoder + mask decoder in two ONNX Runtime sessions (one thread each).

    Same maths as the fused decoder (masks tested against the authors'); a call with ``keys``
    (the fused decoder's way to upscale a larger window without the transformer) runs the
    box graph again on that window.
    """

    def __init__(self, module: Any, dense_pe: torch.Tensor, cache_dir: str | None = None, cache_entries: int = 4):
        import onnxruntime as ort

        self.paths = export_split(module, dense_pe, cache_dir)
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = 1  # ~20 ms of small products: a second thread costs more than it gives
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.image_graph = ort.InferenceSession(self.paths[0], so, providers=["CPUExecutionProvider"])
        self.box_graph = ort.InferenceSession(self.paths[1], so, providers=["CPUExecutionProvider"])
        self.grid = (int(dense_pe.shape[-2]), int(dense_pe.shape[-1]))
        self._states = StateMemo(cache_entries)

    def image_state(self, features: torch.Tensor, key: str = "") -> OrtState:
        """The image graph's outputs for one embedding, memoised by cache key (``key`` empty: not kept)."""
        k = (key, features.dtype)
        if key and (hit := self._states.get(k)) is not None:
            return hit
        emb = np.ascontiguousarray(features.detach().cpu().to(torch.float16).numpy())
        outs = self.image_graph.run(list(IMAGE_OUTPUTS), {"embedding": emb})
        st = OrtState(dict(zip(IMAGE_OUTPUTS, outs, strict=True)), (int(features.shape[-2]), int(features.shape[-1])))
        if key:
            self._states.put(k, st)
        return st

    def clear(self) -> None:
        self._states.clear()

    def logits(
        self, st: OrtState, box_t: torch.Tensor, window: tuple[int, int, int, int] | None = None, keys: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Boxes (B, 4) in model pixels -> (mask logits (B, 1, 4h, 4w), iou (B, 1), None), as
        :meth:`.decoder.FusedDecoder.logits`: outside ``window`` (tokens) the logits are FILL_LOGIT."""
        gh, gw = st.grid
        ty0, ty1, tx0, tx1 = window if window is not None else (0, gh, 0, gw)
        rows, cols = np.arange(ty0, ty1, dtype=np.int64), np.arange(tx0, tx1, dtype=np.int64)
        boxes = box_t.detach().cpu().numpy().astype(np.float32).reshape(-1, 4)
        out = torch.full((len(boxes), 1, 4 * gh, 4 * gw), FILL_LOGIT)
        ious = torch.empty((len(boxes), 1))
        for i, b in enumerate(boxes):
            lg, iou = self.box_graph.run(["logits", "iou"], {**st.feed, "box": b[None], "rows": rows, "cols": cols})
            out[i, 0, 4 * ty0 : 4 * ty1, 4 * tx0 : 4 * tx1] = torch.from_numpy(lg.reshape(4 * (ty1 - ty0), -1))
            ious[i] = float(iou.reshape(-1)[0])
        return out, ious, None
