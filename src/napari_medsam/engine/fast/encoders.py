"""Fast image encoders: fused TinyViT (LiteMedSAM), fused ViT attention (MedSAM / SAM).

``fuse_tinyvit`` folds BatchNorm into the convolutions, gathers the attention biases
once and runs each window attention as one ``scaled_dot_product_attention``;
``ChannelsLast`` runs it in channels-last memory order. ``sdpa_vit`` gives
segment-anything's ViT attention the same fused kernel. ``build_encoder`` picks one
of them, or the ONNX Runtime session of :mod:`.onnx`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .onnx import OrtEncoder, export_onnx, have_onnxruntime

log = logging.getLogger(__name__)

ENCODERS = ("eager", "fused", "onnx")

#: query rows of the token grid per fused ViT attention call (mask chunk: heads x 4 x 64 x 4096)
VIT_MASK_ROWS = 4

EncoderFn = Callable[[torch.Tensor], torch.Tensor]


def _fold_conv_bn(cbn: Any) -> nn.Conv2d:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    return fuse_conv_bn_eval(cbn.c.eval(), cbn.bn.eval())


def _fast_window_attention_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.key_dim)
    q, k, v = qkv.split(self.key_dim, dim=3)
    q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._bias, scale=self.scale)
    return self.proj(out.transpose(1, 2).reshape(b, n, c))


def fuse_tinyvit(encoder: nn.Module, sdpa: bool = True) -> nn.Module:
    """A copy of a LiteMedSAM TinyViT with conv-BN folded and attention biases precomputed."""
    from napari_medsam.engine.models import tinyvit as tv

    enc = copy.deepcopy(encoder).eval()

    def walk(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            if isinstance(child, tv.ConvBN):
                setattr(parent, name, _fold_conv_bn(child))
            else:
                walk(child)

    with torch.no_grad():
        walk(enc)
        for mod in enc.modules():
            if isinstance(mod, tv.WindowAttention):
                biases: Any = mod.attention_biases
                bias = biases[:, mod.attention_bias_idxs].detach().clone().contiguous()
                mod.register_buffer("_bias", bias, persistent=False)
                if sdpa:
                    mod.forward = _fast_window_attention_forward.__get__(mod)  # type: ignore[method-assign]
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc


def _sdpa_vit_attention_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """segment-anything's ViT ``Attention.forward`` with one fused attention kernel.

    Same maths: the decomposed relative positions (q . R_h, q . R_w) become the additive
    mask of ``scaled_dot_product_attention``, so the (heads, N, N) score matrix is not
    built, shifted twice and soft-maxed in separate passes. The mask is built and used
    ``VIT_MASK_ROWS`` query rows at a time into one reused buffer: the whole (12, 4096,
    4096) mask of a global block would be 805 MB written and read back through memory
    (and a further copy when the broadcast sum comes out non-contiguous); a chunk of it
    stays in cache. Embeddings agree to float rounding (tested).
    """
    from segment_anything.modeling.image_encoder import get_rel_pos

    B, H, W, _ = x.shape
    nh = self.num_heads
    qkv = self.qkv(x).reshape(B, H * W, 3, nh, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.reshape(3, B * nh, H * W, -1).unbind(0)
    if not self.use_rel_pos:
        o = F.scaled_dot_product_attention(q[None], k[None], v[None], scale=self.scale)[0]
    else:
        q = q.contiguous()
        r_q = q.view(B * nh, H, W, -1)
        rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, get_rel_pos(H, H, self.rel_pos_h))
        rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, get_rel_pos(W, W, self.rel_pos_w))
        rows = min(H, VIT_MASK_ROWS)
        grad = torch.is_grad_enabled()  # out= has no autograd: fresh chunks when gradients flow
        buf = None if grad else q.new_empty((B * nh, rows, W, H, W))
        o = q.new_empty(q.shape[:-1] + v.shape[-1:])
        for r0 in range(0, H, rows):
            r1 = min(H, r0 + rows)
            if buf is None:
                m = rel_h[:, r0:r1, :, :, None] + rel_w[:, r0:r1, :, None, :]
            else:
                m = buf[:, : r1 - r0]
                torch.add(rel_h[:, r0:r1, :, :, None], rel_w[:, r0:r1, :, None, :], out=m)
            o[:, r0 * W : r1 * W] = F.scaled_dot_product_attention(
                q[None, :, r0 * W : r1 * W],
                k[None],
                v[None],
                attn_mask=m.reshape(1, B * nh, (r1 - r0) * W, H * W),
                scale=self.scale,
            )[0]
    x = o.view(B, nh, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
    return self.proj(x)


def sdpa_vit(encoder: nn.Module) -> int:
    """Give every attention layer of a segment-anything ViT encoder the fused kernel, in place.

    Returns how many layers were changed (0: not a segment-anything ViT).
    """
    try:
        from segment_anything.modeling.image_encoder import Attention
    except ImportError:
        return 0
    n = 0
    for mod in encoder.modules():
        if isinstance(mod, Attention):
            mod.forward = _sdpa_vit_attention_forward.__get__(mod)
            n += 1
    return n


class ChannelsLast(nn.Module):
    """Runs a conv net in channels-last memory order (oneDNN's depthwise 3x3 convs of the
    first TinyViT stage are ~2.5x faster so; the encoder ~10%), returns a contiguous NCHW result."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.to(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous(memory_format=torch.channels_last)).contiguous()


def build_encoder(model: Any, kind: str | None) -> EncoderFn | None:
    """A callable (1, 3, S, S) -> (1, 256, 64, 64) for ``kind``; None for ``eager``.

    ``fused``: :func:`fuse_tinyvit` in channels-last order. ``onnx``: that fused TinyViT
    exported once and run by ONNX Runtime; where ONNX Runtime cannot load or the export
    fails, the ``fused`` encoder (with a warning).
    """
    if kind in (None, "eager"):
        return None
    if kind not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {kind!r}")
    if model.name != "litemedsam":
        raise ValueError(f"fast encoders exist for litemedsam only, not {model.name!r}")
    fused = fuse_tinyvit(model.module.image_encoder)
    if kind == "onnx":
        if not have_onnxruntime():
            log.warning("onnxruntime/onnx cannot be imported; using the fused PyTorch encoder")
        else:
            try:
                return OrtEncoder(export_onnx(fused))
            except Exception as exc:  # noqa: BLE001 - export or session failure: stay correct, just slower
                log.warning("ONNX encoder unavailable (%s); using the fused PyTorch encoder", exc)
    return ChannelsLast(fused)
