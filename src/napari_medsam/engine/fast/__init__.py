"""CPU speed-ups for LiteMedSAM that keep its masks: ``MedSAM.load(..., fast=...)``.

:func:`accelerate` builds *separate* fast copies of the encoder / decoder and hangs
them on the model as ``model.fast``; ``MedSAM.embed_rgb`` / ``MedSAM.predict`` use
them only when that attribute is set. The shared weights are never changed.

* encoders (:mod:`.encoders`, :mod:`.onnx`): TinyViT with BatchNorm folded and fused
  attention, in channels-last order (``fused``), or that network exported once and
  run by ONNX Runtime (``onnx``; falls back to ``fused`` where it cannot load);
  segment-anything ViTs (MedSAM, SAM) get one fused attention kernel (``sdpa``);
* decoder (:mod:`.decoder`, :mod:`.lowrank`): the prompt encoder + mask decoder for box
  prompts with the per-image work cached, low-rank cross-attention, a chunked image
  side, and only the needed window of the output upscaling (:mod:`.windows`).

Every fast path is checked against the authors' path for mask agreement by
``tests/test_fast.py`` and timed by ``benchmarks/speed.py``; what was measured, kept
and not kept is in ``docs/benchmarks_speed.md``.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch

from napari_medsam.engine.precision import AutocastEncoder, autocast_dtype, dtype_name, resolve

from .decoder import FILL_LOGIT, FusedDecoder, _ImageState
from .encoders import (
    ENCODERS,
    VIT_MASK_ROWS,
    ChannelsLast,
    EncoderFn,
    _sdpa_vit_attention_forward,
    build_encoder,
    fuse_tinyvit,
    sdpa_vit,
)
from .onnx import OrtEncoder, _onnx_dir, _weights_digest, export_onnx, have_onnxruntime
from .onnx_decoder import OrtDecoder
from .windows import (
    GROW_MARGIN,
    GROW_PAD_PX,
    _pixel_span,
    _source_span,
    auto_window,
    grow_box,
    grown_region,
    touches_border,
    window_for,
    window_pixels,
)

__all__ = [
    "DECODERS",
    "ENCODERS",
    "FILL_LOGIT",
    "GROW_MARGIN",
    "GROW_PAD_PX",
    "VIT_MASK_ROWS",
    "Accelerator",
    "ChannelsLast",
    "FusedDecoder",
    "OrtDecoder",
    "OrtEncoder",
    "_ImageState",
    "_onnx_dir",
    "_pixel_span",
    "_sdpa_vit_attention_forward",
    "_source_span",
    "_weights_digest",
    "accelerate",
    "apply_torch_threads",
    "auto_window",
    "autocast_dtype",
    "build_encoder",
    "export_onnx",
    "fast_options",
    "fuse_tinyvit",
    "grow_box",
    "grown_region",
    "have_onnxruntime",
    "resolve_torch_threads",
    "sdpa_vit",
    "torch_threads_for",
    "touches_border",
    "triton_blocked",
    "window_for",
    "window_pixels",
]

log = logging.getLogger(__name__)

DECODERS = ("eager", "fused", "onnx")


@dataclass
class Accelerator:
    """Fast encoder/decoder for one :class:`MedSAM` (``model.fast``).

    Attributes:
        key_suffix: appended to cache keys of embeddings this accelerator makes, so a
            shared cache never hands them to the authors' exact path (or the reverse).
        fp16_embeddings: embeddings are stored as float16 (2.1 MB instead of 4.2 MB);
            this model's only, whatever cache it shares.
        decoder_threads: kept for compatibility; not applied per decode (torch's thread
            count is process-wide state). A process that only decodes sets it once
            (``engine.decoder_process``).
        autocast: the type the encoder and the (eager) decoder run in under
            ``torch.autocast`` (:mod:`napari_medsam.engine.precision`); None: float32.
    """

    encoder_kind: str = "eager"
    decoder_kind: str = "eager"
    encoder: EncoderFn | None = None
    decoder: Any = None  # a FusedDecoder, an OrtDecoder or None
    auto_region: bool = True
    margin: float = GROW_MARGIN
    decoder_threads: int | None = 1
    stats: dict[str, int] = field(default_factory=lambda: {"windowed": 0, "full": 0, "grown": 0})
    key_suffix: str = ""
    fp16_embeddings: bool = False
    autocast: torch.dtype | None = None

    def describe(self) -> str:
        return f"encoder={self.encoder_kind}, decoder={self.decoder_kind}, auto_region={self.auto_region}"

    def decode(
        self, model: Any, embedding: Any, box_t: torch.Tensor, region: tuple[int, int, int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(masks, iou) exactly shaped like ``MedSAM.predict``'s, via the fused decoder.

        Runs on the calling thread with torch's thread setting as it is.
        """
        dec = self.decoder
        if dec is None:
            raise RuntimeError(f"decode() needs the fused decoder; this accelerator has {self.describe()}")
        recipe = model.recipe
        st = dec.image_state(embedding.features, embedding.key)
        resized, original = embedding.resized, embedding.original_size
        if region is not None:
            win = window_for(recipe, resized, original, region, st.grid)
            logits, iou, _ = dec.logits(st, box_t, win)
            self.stats["windowed"] += 1
        elif self.auto_region and recipe.name == "litemedsam":
            awin = auto_window(recipe, box_t, resized, st.grid, self.margin)
            logits, iou, keys = dec.logits(st, box_t, awin)
            s = recipe.input_size // st.grid[0]
            if awin is not None and touches_border(logits, awin, resized, s):
                logits, iou, _ = dec.logits(st, box_t, None, keys=keys)
                self.stats["grown"] += 1
            elif awin is not None:
                self.stats["windowed"] += 1
                # logits outside the window are FILL_LOGIT: only pixels reading the window can be set
                y0, y1, x0, x1 = window_pixels(awin, s, resized, original)
                masks = torch.zeros((logits.shape[0], *original), dtype=torch.bool)
                masks[:, y0:y1, x0:x1] = recipe.postprocess(logits, resized, original, (y0, y1, x0, x1))
                return masks, iou
            else:
                self.stats["full"] += 1
        else:
            logits, iou, _ = dec.logits(st, box_t, None)
            self.stats["full"] += 1
        return recipe.postprocess(logits, resized, original, region), iou


def triton_blocked() -> bool:
    """True when something (e.g. a GUI with an OpenGL context) has blocked importing triton."""
    return "triton" in sys.modules and sys.modules["triton"] is None


def accelerate(
    model: Any,
    encoder: str | None = "fused",
    decoder: str | None = "fused",
    auto_region: bool = True,
    margin: float = GROW_MARGIN,
    fp16_cache: bool = False,
    decoder_threads: int | None = 1,
    autocast: Any = "auto",
    torch_threads: Any = "auto",
) -> Accelerator | None:
    """Attach fast paths to a loaded :class:`MedSAM` as ``model.fast`` and return them.

    Args:
        encoder: ``fused`` (default), ``onnx``, or ``None`` / ``eager`` (the authors' encoder).
        decoder: ``fused`` (default), ``onnx`` (the same maths as two ONNX Runtime graphs,
            :mod:`.onnx_decoder`; the fused one where ONNX Runtime cannot load) or ``None`` / ``eager``.
        auto_region: full-size masks computed in the box grown by ``margin`` (see
            :func:`.windows.grow_box`) unless the mask reaches that window's edge.
        fp16_cache: this model's embeddings stored as float16 (2.1 MB instead of 4.2 MB
            each, own cache-key suffix); a cache shared with other models is not changed.
        decoder_threads: accepted for compatibility, not applied (see :class:`Accelerator`).
        torch_threads: torch's intra-op threads for this process's threads started from now on (and
            the calling one), set once here: ``"auto"`` = :func:`torch_threads_for` this machine
            (1 on up to 4 cores: the fused decoder's ~250 small ops lose 4-20x on a second
            OpenMP thread whenever anything else wants a core, docs/benchmarks.md; the encoder
            runs in ONNX Runtime's own pool); a number: that; ``None``: torch's setting is left alone.
        autocast: ``"auto"`` (a half type only where its measured agreement holds, i.e. today
            float32 everywhere: :mod:`napari_medsam.engine.precision`), ``None``, or a type name (``float16``,
            ``bfloat16``): the encoder and the eager decoder under ``torch.autocast``
            instead of the CPU paths (on the CPU too: measurements and tests).

    LiteMedSAM gets all of these on the CPU. MedSAM / SAM ViT encoders get one: every
    attention layer runs as one ``scaled_dot_product_attention`` (any ``encoder`` other
    than ``None``/``eager``; see :func:`sdpa_vit`); their decoder keeps the default path.
    """
    dtype = resolve(autocast, model.device, model.name)
    if dtype is not None:  # accelerators (or an explicit request): autocast, the eager modules
        model.fast = Accelerator(
            f"autocast-{dtype_name(dtype)}",
            f"autocast-{dtype_name(dtype)}",
            AutocastEncoder(model.module.image_encoder, model.device, dtype),
            None,
            auto_region=False,
            key_suffix=f":autocast-{dtype_name(dtype)}",
            autocast=dtype,
        )
        return model.fast
    if model.name != "litemedsam":
        if encoder in (None, "eager") or not sdpa_vit(model.module.image_encoder):
            log.info("no fast path for %s with encoder=%r; it keeps the default path", model.name, encoder)
            model.fast = None
            return None
        # ViT encoders (MedSAM, SAM): the fused attention kernel, on any device; no decoder change
        model.fast = Accelerator("sdpa", "eager", None, None, auto_region=False, key_suffix=":sdpa")
        return model.fast
    if str(model.device) != "cpu":
        log.info("no measured fast path for %s on %s: the default path (float32)", model.name, model.device)
        model.fast = None
        return None
    apply_torch_threads(torch_threads)
    ek = encoder or "eager"
    dk = decoder or "eager"
    if dk not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    acc = Accelerator(
        ek,
        dk,
        build_encoder(model, ek),
        build_decoder(model, dk),
        auto_region,
        margin,
        decoder_threads,
    )
    if dk == "onnx" and not isinstance(acc.decoder, OrtDecoder):
        acc.decoder_kind = "fused"
    if ek == "onnx" and not isinstance(acc.encoder, OrtEncoder):
        acc.encoder_kind = "fused"
    if acc.encoder is not None:
        # same embeddings to float rounding, but not bit-identical: a cache (in memory or a
        # shared --cache-dir) never hands them to the authors' exact path, nor the reverse
        acc.key_suffix = f":{acc.encoder_kind}"
    if fp16_cache:
        acc.fp16_embeddings = True
        acc.key_suffix += ":fp16"
    model.fast = acc
    return acc


def build_decoder(model: Any, kind: str) -> Any:
    """``fused`` -> :class:`FusedDecoder`; ``onnx`` -> :class:`OrtDecoder` where ONNX Runtime loads
    (else, logged, the fused one: the same maths in PyTorch); ``eager`` -> None."""
    if kind == "onnx":
        if have_onnxruntime():
            try:
                return OrtDecoder(model.module, model._dense_pe)
            except Exception as exc:  # noqa: BLE001 - an export or session failure: PyTorch decodes
                log.warning("ONNX Runtime decoder unavailable (%s): the fused PyTorch decoder", exc)
        return FusedDecoder(model.module)
    return FusedDecoder(model.module) if kind == "fused" else None


def torch_threads_for(cores: int | None = None) -> int:
    """torch intra-op threads for the fast CPU path on a machine with ``cores`` logical cores.

    Measured on 2 cores (docs/benchmarks.md): 1 thread. Larger machines keep a few threads
    (not measured here), at most half the cores, so a GUI or a second process keeps a core.
    """
    n = cores if cores is not None else (os.cpu_count() or 1)
    return 1 if n <= 4 else min(4, n // 2)


def resolve_torch_threads(threads: Any) -> int | None:
    """:func:`accelerate`'s ``torch_threads`` (``"auto"``, a positive int, None) -> a count or None."""
    if threads is None:
        return None
    n = torch_threads_for() if threads == "auto" else threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"torch_threads must be 'auto', None or a positive int, got {threads!r}")
    return n


def apply_torch_threads(threads: Any) -> None:
    """Set torch's intra-op threads as ``torch_threads`` says (:func:`resolve_torch_threads`)."""
    n = resolve_torch_threads(threads)
    if n is not None and torch.get_num_threads() != n:
        log.info(
            "torch intra-op threads %d -> %d (the fast CPU path; torch_threads=None leaves them)",
            torch.get_num_threads(),
            n,
        )
        torch.set_num_threads(n)


def fast_options(fast: Any) -> dict[str, Any]:
    """``MedSAM.load(fast=...)`` value -> keyword arguments of :func:`accelerate`.

    ``True`` -> the measured winners (docs/benchmarks_speed.md): ONNX Runtime encoder
    where it loads (else the fused PyTorch TinyViT), the decoder likewise (ONNX Runtime, else
    the fused PyTorch decoder) with automatic region, fp16 embeddings. A string names the
    encoder; a dict is passed through to :func:`accelerate`.
    """
    winners: dict[str, Any] = {
        "encoder": "onnx" if have_onnxruntime() else "fused",
        "decoder": "onnx" if have_onnxruntime() else "fused",
        "auto_region": True,
        "decoder_threads": 1,
        "fp16_cache": True,
    }
    if fast is True:
        return winners
    if isinstance(fast, str):
        return {**winners, "encoder": fast}
    if isinstance(fast, dict):
        return dict(fast)
    raise TypeError(f"fast must be True, an encoder name or a dict, got {fast!r}")
