"""Opt-in CPU speed-ups for LiteMedSAM (issue #6): ``MedSAM.load(..., fast=True)``.

Nothing here changes the default path: :func:`accelerate` builds *separate* fast
copies of the encoder / decoder and hangs them on the model as ``model.fast``;
``MedSAM.embed_rgb`` / ``MedSAM.predict`` use them only when that attribute is set.
Every fast path is checked against the default path for mask agreement by
``tests/test_fast.py`` and timed against the authors' pipeline by
``benchmarks/speed.py`` (numbers in ``docs/benchmarks_speed.md``).

Decoder (``decoder="fused"``, the default of ``fast=True``), pure PyTorch:

* **prompt-independent work cached per embedding**: image tokens + no-mask
  embedding, and in the first two-way layer the token->image keys/values and the
  image->token queries (they see only the image and its positional encoding);
* **low-rank cross-attention**: with 7 prompt tokens and 8 heads the 4096 image
  tokens only ever meet 56 head-token vectors, so each 4096 x 256 x 128 projection of
  the image side is folded into a 4096 x 256 x 56 product with the projection
  weights moved to the token side (same maths, different rounding). The key bias
  of token->image attention is dropped: it is constant along the softmax axis.
  In layer 1 the image-side keys are ``LN(x + A^T v)`` (x the image tokens, A the
  layer-0 attention, v 56 token vectors): its token->image logits and values and its
  image->token logits are taken through that form - per-image projections of x with
  the LayerNorm weight folded in, plus 56 attention weights and the LayerNorm mean and
  scale per image token - instead of 256-wide products with the keys;
* **chunked image side**: the 4096 image tokens are walked in chunks of 1024, twice,
  so each chunk's intermediates stay in cache (softmaxes over all image tokens are
  accumulated online); the positional encoding's share of each image-side logit comes
  from projections made once per model;
* **only what ``multimask_output=False`` reads**: one hypernetwork MLP, and in the
  final token->image attention only the IoU token and the first mask token attend;
* **only the needed part of the output upscaling**: the two stride-2 transposed
  convolutions and the per-pixel LayerNorm are local (each 256-grid logit depends
  on one 64-grid token), so for ``predict(region=...)`` only the tokens under the
  region are upscaled, as three channels-last matrix products - identical values there;
* ``auto_region=True`` (default with ``fast=True``): a full-size mask is computed
  in the box grown by a margin; if any positive logit lies on that window's border
  the whole plane is computed instead. Differs from the full computation only when
  the decoder puts a separate blob far outside the box.

Encoder:

* ``encoder="fused"``: TinyViT with BatchNorm folded into the convolutions,
  attention biases gathered once, fused scaled-dot-product attention.
* ``encoder="onnx"``: that fused TinyViT exported with ``torch.onnx`` (cached in the
  user cache folder) and run by ONNX Runtime with its own threads and no spinning
  (optional extra ``napari-medsam[onnx]``); falls back to ``fused``.

Measured and *not* offered (``benchmarks/speed.py`` still times them): int8 dynamic
quantisation of the Linear/MatMul layers (torch.ao and ONNX Runtime) - masks at mean
Dice ~0.93 against the authors'; TorchScript trace + freeze - no gain over ``fused``;
``torch.compile`` - minutes of warm-up on two cores, and it imports triton, which must
not happen in a process with an OpenGL context (see :func:`triton_blocked`).
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

log = logging.getLogger(__name__)

ENCODERS = ("eager", "fused", "onnx")
DECODERS = ("eager", "fused")


# ---------------------------------------------------------------------------
# encoder: fused TinyViT
# ---------------------------------------------------------------------------
def _fold_conv_bn(cbn: nn.Module) -> nn.Conv2d:
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    return fuse_conv_bn_eval(cbn.c.eval(), cbn.bn.eval())


def _fast_window_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
    b, n, c = x.shape
    qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.key_dim)
    q, k, v = qkv.split(self.key_dim, dim=3)
    q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._bias, scale=self.scale)
    return self.proj(out.transpose(1, 2).reshape(b, n, c))


def fuse_tinyvit(encoder: nn.Module, sdpa: bool = True) -> nn.Module:
    """A copy of a LiteMedSAM TinyViT with conv-BN folded and attention biases precomputed."""
    from .models import tinyvit as tv

    enc = copy.deepcopy(encoder).eval()

    def walk(parent: nn.Module):
        for name, child in list(parent.named_children()):
            if isinstance(child, tv.ConvBN):
                setattr(parent, name, _fold_conv_bn(child))
            else:
                walk(child)

    with torch.no_grad():
        walk(enc)
        for mod in enc.modules():
            if isinstance(mod, tv.WindowAttention):
                bias = mod.attention_biases[:, mod.attention_bias_idxs].detach().clone().contiguous()
                mod.register_buffer("_bias", bias, persistent=False)
                if sdpa:
                    mod.forward = _fast_window_attention_forward.__get__(mod)
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc


VIT_MASK_ROWS = 4  # query rows of the token grid per fused-attention call (mask chunk: heads x 4 x 64 x 4096)


def _sdpa_vit_attention_forward(self, x: torch.Tensor) -> torch.Tensor:
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
            if grad:
                m = rel_h[:, r0:r1, :, :, None] + rel_w[:, r0:r1, :, None, :]
            else:
                m = buf[:, : r1 - r0]
                torch.add(rel_h[:, r0:r1, :, :, None], rel_w[:, r0:r1, :, None, :], out=m)
            o[:, r0 * W : r1 * W] = F.scaled_dot_product_attention(
                q[None, :, r0 * W : r1 * W], k[None], v[None], attn_mask=m.reshape(1, B * nh, (r1 - r0) * W, H * W), scale=self.scale
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


def have_onnxruntime() -> bool:
    """onnxruntime (to run) and onnx (torch.onnx.export needs it) both importable."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except Exception:
        return False
    return True


def export_onnx(enc: nn.Module, cache_dir: Optional[str] = None) -> str:
    """Export a (fused) TinyViT to ONNX once; the file is named by a digest of the weights."""
    size = getattr(enc, "img_size", 256)
    folder = _onnx_dir(cache_dir)
    path = os.path.join(folder, f"tinyvit-{_weights_digest(enc)}.onnx")
    if not os.path.exists(path):
        tmp = f"{path}.{os.getpid()}.tmp"
        with torch.no_grad():
            _export(enc, (torch.zeros(1, 3, size, size),), tmp, ["image"], ["embedding"])
        os.replace(tmp, path)
    return path


class OrtEncoder:
    """ONNX Runtime session over an exported TinyViT; called like the module."""

    def __init__(self, path: str, threads: Optional[int] = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = int(threads or 0)  # 0: ONNX Runtime's default, one per physical core
        so.inter_op_num_threads = 1
        # no busy-waiting: on 2 cores shared with the GUI a spinning pool steals the decoder's core
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.path = path

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"image": np.ascontiguousarray(x.detach().cpu().numpy(), np.float32)})[0]
        return torch.from_numpy(out)


def _weights_digest(module: nn.Module) -> str:
    """Short digest of a module's float tensors (names the exported ONNX file)."""
    import hashlib

    h = hashlib.blake2b(digest_size=8)
    h.update(f"{torch.__version__}|{module.__class__.__name__}".encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _onnx_dir(cache_dir: Optional[str] = None) -> str:
    """Where exported ONNX files live: ``cache_dir``, $MEDSAM_ONNX_CACHE, the user cache, else a temp dir."""
    for cand in (cache_dir, os.environ.get("MEDSAM_ONNX_CACHE")):
        if cand:
            os.makedirs(cand, exist_ok=True)
            return cand
    try:
        from platformdirs import user_cache_dir

        d = os.path.join(user_cache_dir("napari-medsam"), "onnx")
        os.makedirs(d, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except Exception:
        pass
    return tempfile.mkdtemp(prefix="medsam_onnx_")


def _export(module, args, path, inputs, outputs):
    import warnings

    kw = dict(input_names=inputs, output_names=outputs, opset_version=17)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, args, path, dynamo=False, **kw)
        except TypeError:  # older torch without the dynamo switch
            torch.onnx.export(module, args, path, **kw)


def build_encoder(model, kind: str):
    """A callable (1, 3, S, S) -> (1, 256, 64, 64) for ``kind`` (see module doc); None for eager."""
    if kind in (None, "eager"):
        return None
    if model.name != "litemedsam":
        raise ValueError(f"fast encoders exist for litemedsam only, not {model.name!r}")
    fused = fuse_tinyvit(model.module.image_encoder)
    if kind == "fused":
        return ChannelsLast(fused)
    if kind == "onnx":
        if not have_onnxruntime():
            log.warning("onnxruntime/onnx not installed (pip install 'napari-medsam[onnx]'); "
                        "using the fused PyTorch encoder")
            return fused
        try:
            return OrtEncoder(export_onnx(fused))
        except Exception as exc:  # export or session failure: stay correct, just slower
            log.warning("ONNX encoder unavailable (%s); using the fused PyTorch encoder", exc)
            return fused
    raise ValueError(f"encoder must be one of {ENCODERS}, got {kind!r}")


# ---------------------------------------------------------------------------
# decoder: restructured SAM mask decoder
# ---------------------------------------------------------------------------
@dataclass
class _ImageState:
    """Prompt-independent decoder tensors of one embedding (float32)."""

    x0: torch.Tensor  # (N, C) image tokens + no-mask embedding
    k0: torch.Tensor  # (H, d, N) layer-0 token->image keys, heads split, transposed
    v0: torch.Tensor  # (H, N, d) layer-0 token->image values
    q0: torch.Tensor  # (H, d, N) layer-0 image->token queries, transposed
    grid: Tuple[int, int]
    # layer 1's image-side projections of the image tokens, with layer 0's final LayerNorm
    # weight folded in (see FusedDecoder.transformer): keys (H, d, N), values (H, N, d),
    # image->token queries (H, d, N)
    xk1: torch.Tensor
    xv1: torch.Tensor
    xq1: torch.Tensor


class FusedDecoder:
    """SAM's prompt encoder + mask decoder for box prompts, restructured for CPU.

    Same weights and maths as ``segment_anything`` (``multimask_output=False``);
    see the module docstring for what is reordered. Products of the weights with the
    positional encoding and the output tokens are taken when it is built: build it (or
    call :func:`accelerate` again) after loading other weights into the module.
    """

    chunk = 1024  # image tokens per step of the chunked transformer (1024 x 256 floats: 1 MB, the L2 size)

    def __init__(self, module: nn.Module, cache_entries: int = 4):
        self.pe_module = module.prompt_encoder
        self.dec = module.mask_decoder
        t = self.dec.transformer
        self.heads = t.num_heads
        self.layers = t.layers
        with torch.inference_mode():
            pe = self.pe_module.get_dense_pe()  # (1, C, h, w)
            self.grid = tuple(pe.shape[-2:])
            self.pe = pe.flatten(2)[0].transpose(0, 1).contiguous()  # (N, C)
            self.no_mask = self.pe_module.no_mask_embed.weight.reshape(-1).clone()
            self.out_tokens = torch.cat([self.dec.iou_token.weight, self.dec.mask_tokens.weight], 0).clone()
            # the positional encoding is the same for every image: its projections by the
            # three later image-side weights, heads split and transposed (H, d, N)
            l1 = self.layers[1]
            n = self.pe.shape[0]

            def proj(w):
                return (self.pe @ w.weight.t()).view(n, self.heads, -1).permute(1, 2, 0).contiguous()

            self.pe_k1 = proj(l1.cross_attn_token_to_image.k_proj)
            self.pe_q1 = proj(l1.cross_attn_image_to_token.q_proj)
            self.pe_kf = proj(t.final_attn_token_to_image.k_proj)
        self._states: "OrderedDict[object, _ImageState]" = OrderedDict()
        self._cache_entries = cache_entries
        self._lock = threading.Lock()

    # -- per-image ------------------------------------------------------
    def image_state(self, features: torch.Tensor, key: str = "") -> _ImageState:
        """The per-image tensors, memoised by cache key (``key`` empty: computed, not kept)."""
        k = (key, features.dtype)
        if key:
            with self._lock:
                st = self._states.get(k)
                if st is not None:
                    self._states.move_to_end(k)
                    return st
        f = features.to(torch.float32)
        c = f.shape[1]
        x0 = (f[0].reshape(c, -1).transpose(0, 1) + self.no_mask).contiguous()
        kp = x0 + self.pe
        l0 = self.layers[0]
        h = self.heads
        t2i, i2t = l0.cross_attn_token_to_image, l0.cross_attn_image_to_token
        n = x0.shape[0]
        k0 = t2i.k_proj(kp).view(n, h, -1).permute(1, 2, 0).contiguous()
        v0 = t2i.v_proj(x0).view(n, h, -1).transpose(0, 1).contiguous()
        q0 = i2t.q_proj(kp).view(n, h, -1).permute(1, 2, 0).contiguous()
        l1 = self.layers[1]
        g0 = l0.norm4.weight

        def folded(lin):  # x0 @ (W diag g0)^T, heads split: (N, H, d)
            return (x0 @ (lin.weight * g0).t()).view(n, h, -1)

        xk1 = folded(l1.cross_attn_token_to_image.k_proj).permute(1, 2, 0).contiguous()
        xv1 = folded(l1.cross_attn_token_to_image.v_proj).transpose(0, 1).contiguous()
        xq1 = folded(l1.cross_attn_image_to_token.q_proj).permute(1, 2, 0).contiguous()
        st = _ImageState(x0, k0, v0, q0, tuple(f.shape[-2:]), xk1, xv1, xq1)
        if key:
            with self._lock:
                self._states[k] = st
                while len(self._states) > self._cache_entries:
                    self._states.popitem(last=False)
        return st

    def clear(self):
        with self._lock:
            self._states.clear()

    # -- attention helpers ----------------------------------------------
    @staticmethod
    def _heads(x: torch.Tensor, h: int) -> torch.Tensor:  # (B, T, D) -> (B, H, T, d)
        b, t, d = x.shape
        return x.view(b, t, h, d // h).transpose(1, 2)

    def _img2tok_values(self, attn, tok: torch.Tensor) -> torch.Tensor:
        """(B, T, C) tokens -> (B, H*T, C): values pushed through out_proj per head.

        out_proj's bias is spread as bias / H over the rows: every image token's
        attention weights sum to 1 per head, so a @ values gets the bias exactly once.
        """
        h = self.heads
        b, t, c = tok.shape
        v = self._heads(attn.v_proj(tok), h)  # (B, H, T, d)
        d = v.shape[-1]
        wo = attn.out_proj.weight.view(c, h, d)
        vo = torch.einsum("bhtd,ohd->bhto", v, wo).reshape(b, h * t, c)
        return vo + attn.out_proj.bias / h

    # -- forward ----------------------------------------------------------
    @staticmethod
    def _token_side(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
        """(B, H, T, d) per-head token vectors -> (B, H*T, C): each multiplied into its head's rows
        of ``lin``'s weight, i.e. an image-side projection moved to the token side."""
        b, h, t, d = x.shape
        return torch.einsum("bhtd,hdc->bhtc", x, lin.weight.view(h, d, -1)).reshape(b, h * t, -1)

    def _tok2img_out(self, attn, z: torch.Tensor, t: int) -> torch.Tensor:
        """(B, H*T, C) attention-weighted image tokens -> (B, T, C) token->image attention output."""
        h = self.heads
        b, _, c = z.shape
        wv = attn.v_proj.weight.view(h, -1, c)
        d = wv.shape[1]
        o = torch.einsum("bhtc,hdc->bhtd", z.view(b, h, t, c), wv) + attn.v_proj.bias.view(1, h, 1, d)
        return attn.out_proj(o.transpose(1, 2).reshape(b, t, h * d))

    @staticmethod
    def _online_weights(m_prev: Optional[torch.Tensor], logits: torch.Tensor):
        """Running-max step of an online softmax over the last axis: (new max, exp(logits - max),
        factor for what was accumulated so far, or None on the first chunk)."""
        m = logits.amax(-1, keepdim=True)
        if m_prev is not None:
            m = torch.maximum(m_prev, m)
        alpha = None if m_prev is None else torch.exp(m_prev - m)
        return m, torch.exp(logits - m), alpha

    def _online_softmax_step(self, acc, logits: torch.Tensor, values: torch.Tensor):
        """One chunk of a softmax(logits) @ values over the last axis, accumulated (flash-attention style)."""
        m, p, alpha = self._online_weights(None if acc is None else acc[0], logits)
        if alpha is None:
            return [m, p.sum(-1, keepdim=True), torch.bmm(p, values)]
        return [m, acc[1] * alpha + p.sum(-1, keepdim=True), torch.baddbmm(acc[2] * alpha, p, values)]

    @staticmethod
    def _softmax_dim2(x: torch.Tensor) -> torch.Tensor:
        """Softmax over axis 2 of (B, H, T, n) with T = 7: along the long contiguous axis
        (``torch.softmax(dim=2)`` walks the short strided one, ~10x slower)."""
        e = torch.exp(x - x.amax(2, keepdim=True))
        return e.div_(e.sum(2, keepdim=True))

    @staticmethod
    def _lowrank(w: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, vo: torch.Tensor):
        """Token-side factors of ``w . LN(x + A^T vo)``: (w*g) vo^T (B, R, 56), w.g and w.beta (B, R, 1)."""
        wg = w * g
        return torch.bmm(wg, vo.transpose(1, 2)), wg.sum(-1, keepdim=True), torch.matmul(w, beta).unsqueeze(-1)

    @staticmethod
    def _lowrank_logits(f, wx: torch.Tensor, ac: torch.Tensor, mu: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
        """``w . LN(x_i + A_i^T vo)`` for a chunk: wx = w.(g x_i) (B, R, n), ac (B, 56, n), mu / rstd (B, 1, n)."""
        m, u, cst = f
        return torch.baddbmm(wx, m, ac).sub_(u * mu).mul_(rstd).add_(cst)

    def _lowrank_values_step(self, acc, logits, rstd, mu, ac, xv, h: int, t: int):
        """One chunk of softmax(logits) @ W_v LN(x + A^T vo), kept as its factors and accumulated
        online: sum of p (B, R, 1), p rstd @ (x W_v g) per head (B, H, T, d), p rstd @ A^T (B, R, 56),
        p rstd . mu (B, R, 1)."""
        b, r, n = logits.shape
        m, p, alpha = self._online_weights(None if acc is None else acc[0], logits)
        pr = p * rstd
        parts = [
            p.sum(-1, keepdim=True),
            torch.matmul(pr.view(b, h, t, n), xv.unsqueeze(0)),
            torch.bmm(pr, ac.transpose(1, 2)),
            torch.bmm(pr, mu.transpose(1, 2)),
        ]
        if alpha is None:
            return [m, *parts]
        return [
            m,
            acc[1] * alpha + parts[0],
            acc[2] * alpha.view(b, h, t, 1) + parts[1],
            acc[3] * alpha + parts[2],
            acc[4] * alpha + parts[3],
        ]

    def transformer(self, st: _ImageState, sparse: torch.Tensor):
        """(B, T, C) prompt tokens -> (hs (B, 2, C): IoU token and mask token 0, keys chunks).

        The 4096-token image side is walked in chunks of ``chunk`` tokens, twice: each
        chunk's keys go through layer 0's update, layer 1's token->image logits, its
        image->token update and the final attention's logits while they are in cache;
        the two token->image softmaxes over all image tokens are accumulated online.
        Every 4096 x 256 intermediate of the plain order would otherwise make a round
        trip through memory, which on a shared CPU costs more than its arithmetic. The
        positional encoding's share of each image-side logit comes from projections
        made once (``pe_k1``, ``pe_q1``, ``pe_kf``) instead of a keys + pe sum per chunk.
        Returns the final keys as a list of (B, chunk, C) tensors.
        """
        b = sparse.shape[0]
        h = self.heads
        tokens = torch.cat((self.out_tokens.unsqueeze(0).expand(b, -1, -1), sparse), dim=1)
        t = tokens.shape[1]
        qpe = tokens
        l0, l1 = self.layers
        # layer 0 (skip_first_layer_pe): tokens only, against the cached image projections
        queries = l0.norm1(l0.self_attn(q=tokens, k=tokens, v=tokens))
        q = queries + qpe
        qp = self._heads(l0.cross_attn_token_to_image.q_proj(q), h)  # (B, H, T, d)
        d = qp.shape[-1]
        s = d ** -0.5
        a = torch.softmax(torch.matmul(qp, st.k0.unsqueeze(0)) * s, dim=-1)  # (B, H, T, N)
        o = torch.matmul(a, st.v0.unsqueeze(0)).transpose(1, 2).reshape(b, -1, h * d)
        queries = l0.norm2(queries + l0.cross_attn_token_to_image.out_proj(o))
        queries = l0.norm3(queries + l0.mlp(queries))
        q = queries + qpe
        i2t0 = l0.cross_attn_image_to_token
        kp = self._heads(i2t0.k_proj(q), h)
        n = st.q0.shape[-1]
        a0 = self._softmax_dim2(torch.matmul(kp * s, st.q0.unsqueeze(0))).reshape(b, h * t, n)
        vo0 = self._img2tok_values(i2t0, queries)  # (B, H*T, C)
        # layer 1 up to its token->image attention: the queries do not depend on the keys
        q = queries + qpe
        queries = l1.norm1(queries + l1.self_attn(q=q, k=q, v=queries))
        q = queries + qpe
        t2i1 = l1.cross_attn_token_to_image
        qp1 = self._heads(t2i1.q_proj(q), h) * s  # (B, H, T, d)
        qk1 = self._token_side(qp1, t2i1.k_proj)
        pel1 = torch.matmul(qp1, self.pe_k1.unsqueeze(0)).reshape(b, h * t, n)  # (B, H*T, N)
        c = qk1.shape[-1]
        # keys1 = LN(x0 + A0^T vo0) = g0 * (x0 + A0^T vo0 - mu) * rstd + b0 per image token, so a
        # product w . keys1 splits into w.(g0 x0) (cached per image as xk1/xv1/xq1), A0^T (vo0 (g0 w)),
        # and mu / rstd from the LayerNorm: 56 + 16 numbers per token instead of 256.
        n4 = l0.norm4
        g0, b0 = n4.weight, n4.bias
        lr1 = self._lowrank(qk1, g0, b0, vo0)  # (M, u, c) of the token->image logits
        vproj = t2i1.v_proj
        wvg = (vproj.weight * g0).t()  # (C, H*d)
        va = torch.matmul(vo0, wvg).view(b, h * t, h, d).permute(0, 2, 1, 3)  # (B, H, H*T rows, d)
        keys1, stats1 = [], []
        acc = None
        for i0 in range(0, n, self.chunk):
            i1 = min(n, i0 + self.chunk)
            a0c = a0[:, :, i0:i1]
            k1, mu, rstd = torch.native_layer_norm(torch.baddbmm(st.x0[i0:i1].unsqueeze(0), a0c.transpose(1, 2), vo0), (c,), g0, b0, n4.eps)
            mu, rstd = mu.transpose(1, 2), rstd.transpose(1, 2)  # (B, 1, n)
            keys1.append(k1)
            stats1.append((mu, rstd))
            xk = torch.matmul(qp1, st.xk1[:, :, i0:i1].unsqueeze(0)).reshape(b, h * t, i1 - i0)
            lg = self._lowrank_logits(lr1, xk, a0c, mu, rstd) + pel1[:, :, i0:i1]
            acc = self._lowrank_values_step(acc, lg, rstd, mu, a0c, st.xv1[:, i0:i1], h, t)
        m, ssum, zx, za, zmu = acc
        # o = W_v keys1 weighted: [zx + za @ (vo0 diag(g0) W_v^T) - zmu * W_v g0] / sum + W_v b0 + b_v
        o = zx + torch.matmul(za.view(b, h, t, -1), va) - zmu.view(b, h, t, 1) * (vproj.weight @ g0).view(1, h, 1, d)
        o = o / ssum.view(b, h, t, 1) + (vproj.weight @ b0 + vproj.bias).view(1, h, 1, d)
        queries = l1.norm2(queries + t2i1.out_proj(o.transpose(1, 2).reshape(b, t, h * d)))
        queries = l1.norm3(queries + l1.mlp(queries))
        q = queries + qpe
        # layer 1 image->token update, and the final token->image attention (IoU token and
        # mask token 0 only: nothing else is read with multimask_output=False)
        i2t1 = l1.cross_attn_image_to_token
        kp = self._heads(i2t1.k_proj(q), h) * s
        kq = self._token_side(kp, i2t1.q_proj)
        cb = torch.einsum("bhtd,hd->bht", kp, i2t1.q_proj.bias.view(h, d)).reshape(b, h * t, 1)
        pel2 = torch.matmul(kp, self.pe_q1.unsqueeze(0)).reshape(b, h * t, n) + cb
        lr2 = self._lowrank(kq, g0, b0, vo0)
        vo1 = self._img2tok_values(i2t1, queries)
        fin = self.dec.transformer.final_attn_token_to_image
        qf = (queries + qpe)[:, :2]
        qpf = self._heads(fin.q_proj(qf), h) * s  # (B, H, 2, d)
        qk2 = self._token_side(qpf, fin.k_proj)
        pel3 = torch.matmul(qpf, self.pe_kf.unsqueeze(0)).reshape(b, h * 2, n)
        n4 = l1.norm4
        keys2 = []
        acc = None
        for k1, (mu, rstd), i0 in zip(keys1, stats1, range(0, n, self.chunk)):
            i1 = i0 + k1.shape[1]
            xq = torch.matmul(kp, st.xq1[:, :, i0:i1].unsqueeze(0)).reshape(b, h * t, i1 - i0)
            lg = self._lowrank_logits(lr2, xq, a0[:, :, i0:i1], mu, rstd) + pel2[:, :, i0:i1]  # (B, H*T, n)
            a1 = self._softmax_dim2(lg.view(b, h, t, i1 - i0)).view(b, h * t, i1 - i0)
            k2 = F.layer_norm(torch.baddbmm(k1, a1.transpose(1, 2), vo1), (c,), n4.weight, n4.bias, n4.eps)
            keys2.append(k2)
            acc = self._online_softmax_step(acc, torch.baddbmm(pel3[:, :, i0:i1], qk2, k2.transpose(1, 2)), k2)
        out = queries[:, :2] + self._tok2img_out(fin, acc[2] / acc[1], 2)
        return self.dec.transformer.norm_final_attn(out), keys2

    def _upscale(self, src: torch.Tensor, hyper: torch.Tensor) -> torch.Tensor:
        """Output upscaling + hypernetwork dot product as three matrix products, channels last.

        src (B, h, w, C) tokens; hyper (B, C/8). Returns (B, 1, 4h, 4w) logits. Each
        stride-2, kernel-2 transposed convolution maps a pixel to a 2 x 2 block through
        one (C_in, 4 * C_out) matrix; LayerNorm2d and GELU act per pixel.
        """
        up = self.dec.output_upscaling
        ct1, ln, act1, ct2, act2 = up[0], up[1], up[2], up[3], up[4]
        b, gh, gw, c = src.shape
        c1, c2 = ct1.weight.shape[1], ct2.weight.shape[1]
        w1 = ct1.weight.permute(0, 2, 3, 1).reshape(c, 4 * c1)
        w2 = ct2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
        y = torch.addmm(ct1.bias.repeat(4), src.reshape(-1, c), w1).view(-1, c1)
        y = act1(F.layer_norm(y, (c1,), ln.weight, ln.bias, ln.eps))
        y = act2(torch.addmm(ct2.bias.repeat(4), y, w2)).view(b, -1, c2)  # (B, P*16, C2)
        m = torch.bmm(y, hyper.unsqueeze(-1))  # (B, P*16, 1)
        # index order (ty, tx, dy1, dx1, dy2, dx2) -> pixel (4ty + 2dy1 + dy2, 4tx + 2dx1 + dx2)
        m = m.view(b, gh, gw, 2, 2, 2, 2).permute(0, 1, 3, 5, 2, 4, 6).reshape(b, 1, 4 * gh, 4 * gw)
        return m

    def logits(self, st: _ImageState, box_t: torch.Tensor, window: Optional[Tuple[int, int, int, int]] = None, keys=None):
        """Box (B, 4) in model pixels -> (mask logits (B, 1, 4h, 4w), iou (B, 1), (hs, keys)).

        ``window`` (ty0, ty1, tx0, tx1) in embedding tokens: upscale only there;
        logits elsewhere are -1e4 (a sure "no"). ``keys``: the (hs, keys) of an earlier
        call with the same box, to upscale another window without the transformer.
        """
        if keys is None:
            sparse, _ = self.pe_module(points=None, boxes=box_t[:, None, :], masks=None)
            keys = self.transformer(st, sparse)
        hs, chunks = keys
        dec = self.dec
        b = hs.shape[0]
        gh, gw = st.grid
        ty0, ty1, tx0, tx1 = window if window is not None else (0, gh, 0, gw)
        # the chunks holding grid rows ty0..ty1 (all of them unless chunks are whole rows)
        if self.chunk % gw == 0:
            rows = self.chunk // gw
            c0, c1 = ty0 // rows, min(len(chunks), -(-ty1 // rows))
        else:
            rows, c0, c1 = 0, 0, len(chunks)
        part = chunks[c0] if c1 - c0 == 1 else torch.cat(chunks[c0:c1], 1)
        src = part.view(b, -1, gw, part.shape[-1])[:, ty0 - c0 * rows : ty1 - c0 * rows, tx0:tx1]
        hyper = dec.output_hypernetworks_mlps[0](hs[:, 1, :])  # mask token 0 only (multimask off)
        m = self._upscale(src, hyper)
        if window is not None:
            s = m.shape[-1] // (tx1 - tx0)  # logit pixels per token
            full = m.new_full((b, 1, gh * s, gw * s), -1e4)
            full[..., window[0] * s : window[1] * s, window[2] * s : window[3] * s] = m
            m = full
        iou = dec.iou_prediction_head(hs[:, 0, :])[:, :1]
        return m, iou, keys


def _source_span(n_in: int, n_out: int, start: int, stop: int) -> Tuple[int, int]:
    """Rows of an ``n_in`` grid that bilinear (align_corners=False) reads for output rows [start, stop)."""
    scale = n_in / n_out

    def src(i):
        return max(0.0, (i + 0.5) * scale - 0.5)

    lo = min(int(np.floor(src(start))), n_in - 1)
    hi = min(int(np.floor(src(stop - 1))) + 1, n_in - 1)
    return lo, hi + 1


def _pixel_span(n_in: int, n_out: int, lo: int, hi: int) -> Tuple[int, int]:
    """Output rows [y0, y1) outside which bilinear upsampling reads no input row in [lo, hi)."""
    r = n_out / n_in
    y0 = int(np.floor((lo - 0.5) * r - 0.5)) - 1
    y1 = int(np.ceil((hi + 0.5) * r - 0.5)) + 1
    return max(0, y0), min(n_out, y1)


# ---------------------------------------------------------------------------
# the accelerator hung on a MedSAM
# ---------------------------------------------------------------------------
@dataclass
class Accelerator:
    """Fast encoder/decoder for one :class:`MedSAM` (``model.fast``)."""

    encoder_kind: str = "eager"
    decoder_kind: str = "eager"
    encoder: Optional[object] = None
    decoder: Optional[FusedDecoder] = None
    auto_region: bool = True
    margin: float = 0.25
    decoder_threads: Optional[int] = 1
    stats: Dict[str, int] = field(default_factory=lambda: {"windowed": 0, "full": 0, "grown": 0})

    key_suffix: str = ""  # cache-key suffix for encoders whose embeddings must not be shared

    def describe(self) -> str:
        return f"encoder={self.encoder_kind}, decoder={self.decoder_kind}, auto_region={self.auto_region}"

    # token window helpers -------------------------------------------------
    def _window_for(self, recipe, resized, original, region, st: _ImageState):
        """Token window (ty0, ty1, tx0, tx1) whose upscaled logits cover ``region`` exactly."""
        nh, nw = resized
        gh, gw = st.grid
        s = recipe.input_size // gh  # logit pixels per token (256 / 64 = 4)
        H, W = original
        y0, y1, x0, x1 = region
        ly0, ly1 = _source_span(nh, H, y0, y1)
        lx0, lx1 = _source_span(nw, W, x0, x1)
        return ly0 // s, min(gh, -(-ly1 // s)), lx0 // s, min(gw, -(-lx1 // s))

    def _auto_window(self, recipe, box_t: torch.Tensor, resized, st: _ImageState):
        """Tokens under the union of the boxes (model pixels) grown by ``margin`` + 8 px."""
        gh, gw = st.grid
        s = recipe.input_size // gh
        nh, nw = resized
        b = box_t.detach().cpu().numpy().astype(np.float64)
        x0, y0 = b[:, [0, 2]].min(), b[:, [1, 3]].min()
        x1, y1 = b[:, [0, 2]].max(), b[:, [1, 3]].max()
        mx, my = (x1 - x0) * self.margin + 8, (y1 - y0) * self.margin + 8
        ty0 = max(0, int(np.floor((y0 - my) / s)))
        ty1 = min(-(-nh // s), int(np.ceil((y1 + my) / s)) + 1)
        tx0 = max(0, int(np.floor((x0 - mx) / s)))
        tx1 = min(-(-nw // s), int(np.ceil((x1 + mx) / s)) + 1)
        if ty1 <= ty0 or tx1 <= tx0:
            return None
        return ty0, ty1, tx0, tx1

    @staticmethod
    def _touches_border(m: torch.Tensor, win, grid, resized, s: int) -> bool:
        """Any positive logit on a window edge that is not the edge of the unpadded image."""
        ty0, ty1, tx0, tx1 = win
        nh, nw = resized
        y0, y1, x0, x1 = ty0 * s, min(ty1 * s, nh), tx0 * s, min(tx1 * s, nw)
        inner = m[:, 0, y0:y1, x0:x1]
        edges = []
        if ty0 > 0:
            edges.append(inner[:, 0, :])
        if y1 < nh:
            edges.append(inner[:, -1, :])
        if tx0 > 0:
            edges.append(inner[:, :, 0])
        if x1 < nw:
            edges.append(inner[:, :, -1])
        return any(bool((e > 0).any()) for e in edges)

    def decode(self, model, embedding, box_t: torch.Tensor, region=None):
        """(masks, iou) exactly shaped like ``MedSAM.predict``'s, via the fused decoder."""
        with _num_threads(self.decoder_threads):
            return self._decode(model, embedding, box_t, region)

    def _decode(self, model, embedding, box_t: torch.Tensor, region=None):
        recipe = model.recipe
        st = self.decoder.image_state(embedding.features, embedding.key)
        if region is not None:
            win = self._window_for(recipe, embedding.resized, embedding.original_size, region, st)
            logits, iou, _ = self.decoder.logits(st, box_t, win)
            self.stats["windowed"] += 1
        elif self.auto_region and recipe.name == "litemedsam":
            win = self._auto_window(recipe, box_t, embedding.resized, st)
            logits, iou, keys = self.decoder.logits(st, box_t, win)
            s = recipe.input_size // st.grid[0]
            if win is not None and self._touches_border(logits, win, st.grid, embedding.resized, s):
                logits, iou, _ = self.decoder.logits(st, box_t, None, keys=keys)
                self.stats["grown"] += 1
            elif win is not None:
                self.stats["windowed"] += 1
                # logits outside the window are -1e4: only pixels reading the window can be set
                (nh, nw), (H, W) = embedding.resized, embedding.original_size
                y0, y1 = _pixel_span(nh, H, win[0] * s, min(win[1] * s, nh))
                x0, x1 = _pixel_span(nw, W, win[2] * s, min(win[3] * s, nw))
                masks = torch.zeros((logits.shape[0], H, W), dtype=torch.bool)
                region = (y0, y1, x0, x1)
                masks[:, y0:y1, x0:x1] = recipe.postprocess(logits, embedding.resized, embedding.original_size, region)
                return masks, iou
            else:
                self.stats["full"] += 1
        else:
            logits, iou, _ = self.decoder.logits(st, box_t, None)
            self.stats["full"] += 1
        masks = recipe.postprocess(logits, embedding.resized, embedding.original_size, region)
        return masks, iou


class _num_threads:
    """Temporarily set torch's intra-op threads of the *calling* thread (OpenMP: per thread)."""

    def __init__(self, n: Optional[int]):
        self.n = n

    def __enter__(self):
        self.prev = torch.get_num_threads()
        if self.n and self.n != self.prev:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        if self.n and self.n != self.prev:
            torch.set_num_threads(self.prev)


def triton_blocked() -> bool:
    """True when something (e.g. a GUI with an OpenGL context) has blocked importing triton."""
    import sys

    return "triton" in sys.modules and sys.modules["triton"] is None


def accelerate(
    model,
    encoder: Optional[str] = "fused",
    decoder: Optional[str] = "fused",
    auto_region: bool = True,
    margin: float = 0.25,
    fp16_cache: bool = False,
    decoder_threads: Optional[int] = 1,
) -> Optional[Accelerator]:
    """Attach fast paths to a loaded :class:`MedSAM` as ``model.fast`` and return them.

    Args:
        encoder: ``fused`` (default), ``onnx``, or ``None`` / ``eager`` (the default path).
        decoder: ``fused`` (default) or ``None`` / ``eager``.
        auto_region: full-size masks computed in the box grown by ``margin`` unless the
            mask reaches that window's edge (see module doc).
        decoder_threads: torch threads while decoding (1: the decoder's small matrix
            products gain little from a second core, and a second OpenMP thread that
            competes with the GUI or the encoder thread makes every op wait; ``None``
            keeps torch's setting).
        fp16_cache: switch the model's :class:`EmbeddingCache` to float16 storage
            (2.1 MB instead of 4.2 MB per embedding; affects every model sharing it).
    LiteMedSAM gets all of these on the CPU. MedSAM / SAM ViT encoders get one: every
    attention layer runs as one ``scaled_dot_product_attention`` (any ``encoder`` other
    than ``None``/``eager``; see :func:`sdpa_vit`); their decoder keeps the default path.
    """
    if model.name != "litemedsam":
        if encoder in (None, "eager") or not sdpa_vit(model.module.image_encoder):
            log.info("no fast path for %s with encoder=%r; it keeps the default path", model.name, encoder)
            model.fast = None
            return None
        # ViT encoders (MedSAM, SAM): the fused attention kernel, on any device; no decoder change
        model.fast = Accelerator("sdpa", "eager", None, None, auto_region=False, key_suffix=":sdpa")
        return model.fast
    if str(model.device) != "cpu":
        log.info("fast paths target the CPU; %s keeps the default path on %s", model.name, model.device)
        model.fast = None
        return None
    ek = encoder or "eager"
    dk = decoder or "eager"
    if dk not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    acc = Accelerator(
        ek, dk, build_encoder(model, ek), FusedDecoder(model.module) if dk == "fused" else None,
        auto_region, margin, decoder_threads,
    )
    if ek == "onnx" and not isinstance(acc.encoder, OrtEncoder):
        acc.encoder_kind = "fused"
    if acc.encoder is not None:
        # same embeddings to float rounding, but not bit-identical: a cache (in memory or a
        # shared --cache-dir) never hands them to the authors' exact path, nor the reverse
        acc.key_suffix = f":{acc.encoder_kind}"
    if fp16_cache and model.cache is not None:
        model.cache.fp16 = True
    model.fast = acc
    return acc


def fast_options(fast) -> dict:
    """``MedSAM.load(fast=...)`` value -> keyword arguments of :func:`accelerate`.

    ``True`` -> the measured winners (docs/benchmarks_speed.md): ONNX Runtime encoder when
    ``napari-medsam[onnx]`` is installed (else the fused PyTorch TinyViT), fused decoder
    with automatic region, one decoder thread, fp16 embedding cache. A string names the
    encoder; a dict is passed through to :func:`accelerate`.
    """
    winners = {
        "encoder": "onnx" if have_onnxruntime() else "fused",
        "decoder": "fused",
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
