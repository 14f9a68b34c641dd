"""SAM's prompt encoder + mask decoder for box prompts, restructured for the CPU.

Same weights and maths as ``segment_anything`` with ``multimask_output=False``:

* prompt-independent work is cached per embedding (:class:`_ImageState`): image tokens
  + no-mask embedding, layer 0's token->image keys/values and image->token queries, and
  layer 1's image-side projections with layer 0's final LayerNorm weight folded in;
* low-rank cross-attention: the 4096 image tokens only meet 7 tokens x 8 heads = 56
  head-token vectors, so each 4096 x 256 x 128 image-side projection becomes a
  4096 x 256 x 56 product with the weights moved to the token side (:mod:`.lowrank`);
  in layer 1 the keys ``LN(x + A^T v)`` are never built: their products are taken
  through that form (56 attention weights + LayerNorm mean and scale per image token);
* the image side is walked in chunks of :attr:`FusedDecoder.chunk` tokens, twice, with
  softmaxes over all image tokens accumulated online;
* only what ``multimask_output=False`` reads (one hypernetwork MLP; in the final
  attention only the IoU token and mask token 0), and only the requested window of the
  output upscaling (three channels-last matrix products).

Legend of the short names in :meth:`FusedDecoder.transformer` (B boxes, H heads, T = 7
tokens, d = C / H channels per head, N = 4096 image tokens, n a chunk of them):

==========  ==============================================================================
``x0``      image tokens + no-mask embedding (N, C); ``pe`` their positional encoding
``qpe``     the prompt tokens as first built (the token side's "positional encoding")
``qp``      token->image queries, heads split (B, H, T, d); ``qp1`` layer 1's, pre-scaled
``k0 v0``   layer-0 token->image keys (H, d, N) and values (H, N, d), cached per image
``q0``      layer-0 image->token queries (H, d, N), cached per image
``a``       layer-0 token->image attention (B, H, T, N)
``a0``      layer-0 image->token attention weights (B, H*T, N), softmax over the T tokens
``vo0``     layer-0 image->token values through out_proj (B, H*T, C): keys1 = LN(x0 + a0^T vo0)
``g0 b0``   layer 0's last LayerNorm (norm4) weight and bias
``qk1``     layer-1 token->image queries moved to the token side (B, H*T, C)
``pel1``    positional-encoding share of layer-1 token->image logits (B, H*T, N)
``lr1``     :func:`.lowrank.lowrank` factors of those logits (M, u, c)
``xk1 xv1`` layer-1 key / value projections of g0 * x0 (cached per image); ``xq1`` image->token queries
``va``      vo0 projected by layer-1 values with g0 folded in (B, H, H*T, d)
``mu rstd`` per-token LayerNorm mean and 1/std of keys1 (B, 1, n)
``lg``      a chunk's logits; ``acc`` online-softmax accumulators
``zx za``   accumulated x-part (B, H, T, d) and a0-part (B, H*T, 56) of the weighted values;
            ``zmu`` the accumulated mean part, ``ssum`` the softmax sum
``kp kq``   layer-1 image->token keys (token side) and their projection through q_proj
``pel2``    positional-encoding share of layer-1 image->token logits; ``lr2`` its factors
``vo1``     layer-1 image->token values through out_proj
``qpf qk2`` final attention queries (IoU + mask token 0) and their token-side keys
``pel3``    positional-encoding share of the final logits
``keys1/2`` image tokens after layer 0 / layer 1, kept as chunks (B, n, C)
==========  ==============================================================================
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from . import lowrank as lr

#: logit written outside a decoded window: a sure "no" after the sigmoid / threshold at 0
FILL_LOGIT = -1e4

Keys = tuple[torch.Tensor, list[torch.Tensor]]  # (hs (B, 2, C), final image-token chunks)


class StateMemo:
    """A decoder's per-embedding states, least recently used first out, keyed by (cache key, dtype);
    thread-safe (previews, accepts and prefetch warm-ups come from different threads)."""

    def __init__(self, entries: int = 4):
        self.entries = entries
        self._states: OrderedDict[object, Any] = OrderedDict()
        self._lock = threading.Lock()

    def __contains__(self, k: object) -> bool:
        with self._lock:
            return k in self._states

    def get(self, k: object) -> Any:
        with self._lock:
            st = self._states.get(k)
            if st is not None:
                self._states.move_to_end(k)
            return st

    def put(self, k: object, st: Any) -> None:
        with self._lock:
            self._states[k] = st
            while len(self._states) > self.entries:
                self._states.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._states.clear()


@dataclass
class _ImageState:
    """Prompt-independent decoder tensors of one embedding (float32)."""

    x0: torch.Tensor  # (N, C) image tokens + no-mask embedding
    k0: torch.Tensor  # (H, d, N) layer-0 token->image keys, heads split, transposed
    v0: torch.Tensor  # (H, N, d) layer-0 token->image values
    q0: torch.Tensor  # (H, d, N) layer-0 image->token queries, transposed
    grid: tuple[int, int]
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

    def __init__(self, module: Any, cache_entries: int = 4):
        self.pe_module: Any = module.prompt_encoder
        self.dec: Any = module.mask_decoder
        t = self.dec.transformer
        self.heads: int = int(t.num_heads)
        self.layers: Any = t.layers
        with torch.inference_mode():
            pe = self.pe_module.get_dense_pe()  # (1, C, h, w)
            self.grid = (int(pe.shape[-2]), int(pe.shape[-1]))
            self.pe = pe.flatten(2)[0].transpose(0, 1).contiguous()  # (N, C)
            self.no_mask = self.pe_module.no_mask_embed.weight.reshape(-1).clone()
            self.out_tokens = torch.cat([self.dec.iou_token.weight, self.dec.mask_tokens.weight], 0).clone()
            # the positional encoding is the same for every image: its projections by the
            # three later image-side weights, heads split and transposed (H, d, N)
            l1 = self.layers[1]
            n = self.pe.shape[0]

            def proj(w: Any) -> torch.Tensor:
                return (self.pe @ w.weight.t()).view(n, self.heads, -1).permute(1, 2, 0).contiguous()

            self.pe_k1 = proj(l1.cross_attn_token_to_image.k_proj)
            self.pe_q1 = proj(l1.cross_attn_image_to_token.q_proj)
            self.pe_kf = proj(t.final_attn_token_to_image.k_proj)
        self._states = StateMemo(cache_entries)

    # -- per-image ------------------------------------------------------
    def image_state(self, features: torch.Tensor, key: str = "") -> _ImageState:
        """The per-image tensors, memoised by cache key (``key`` empty: computed, not kept)."""
        k = (key, features.dtype)
        if key and (hit := self._states.get(k)) is not None:
            return hit
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

        def folded(lin: Any) -> torch.Tensor:  # x0 @ (W diag g0)^T, heads split: (N, H, d)
            return (x0 @ (lin.weight * g0).t()).view(n, h, -1)

        xk1 = folded(l1.cross_attn_token_to_image.k_proj).permute(1, 2, 0).contiguous()
        xv1 = folded(l1.cross_attn_token_to_image.v_proj).transpose(0, 1).contiguous()
        xq1 = folded(l1.cross_attn_image_to_token.q_proj).permute(1, 2, 0).contiguous()
        st = _ImageState(x0, k0, v0, q0, (int(f.shape[-2]), int(f.shape[-1])), xk1, xv1, xq1)
        if key:
            self._states.put(k, st)
        return st

    def clear(self) -> None:
        self._states.clear()

    # -- attention helpers ----------------------------------------------

    def transformer(self, st: _ImageState, sparse: torch.Tensor) -> Keys:
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
        qp = lr.heads(l0.cross_attn_token_to_image.q_proj(q), h)  # (B, H, T, d)
        d = qp.shape[-1]
        s = d**-0.5
        a = torch.softmax(torch.matmul(qp, st.k0.unsqueeze(0)) * s, dim=-1)  # (B, H, T, N)
        o = torch.matmul(a, st.v0.unsqueeze(0)).transpose(1, 2).reshape(b, -1, h * d)
        queries = l0.norm2(queries + l0.cross_attn_token_to_image.out_proj(o))
        queries = l0.norm3(queries + l0.mlp(queries))
        q = queries + qpe
        i2t0 = l0.cross_attn_image_to_token
        kp = lr.heads(i2t0.k_proj(q), h)
        n = st.q0.shape[-1]
        a0 = lr.softmax_dim2(torch.matmul(kp * s, st.q0.unsqueeze(0))).reshape(b, h * t, n)
        vo0 = lr.img2tok_values(i2t0, queries, h)  # (B, H*T, C)
        # layer 1 up to its token->image attention: the queries do not depend on the keys
        q = queries + qpe
        queries = l1.norm1(queries + l1.self_attn(q=q, k=q, v=queries))
        q = queries + qpe
        t2i1 = l1.cross_attn_token_to_image
        qp1 = lr.heads(t2i1.q_proj(q), h) * s  # (B, H, T, d)
        qk1 = lr.token_side(qp1, t2i1.k_proj)
        pel1 = torch.matmul(qp1, self.pe_k1.unsqueeze(0)).reshape(b, h * t, n)  # (B, H*T, N)
        c = qk1.shape[-1]
        # keys1 = LN(x0 + A0^T vo0) = g0 * (x0 + A0^T vo0 - mu) * rstd + b0 per image token, so a
        # product w . keys1 splits into w.(g0 x0) (cached per image as xk1/xv1/xq1), A0^T (vo0 (g0 w)),
        # and mu / rstd from the LayerNorm: 56 + 16 numbers per token instead of 256.
        n4 = l0.norm4
        g0, b0 = n4.weight, n4.bias
        lr1 = lr.lowrank(qk1, g0, b0, vo0)  # (M, u, c) of the token->image logits
        vproj = t2i1.v_proj
        wvg = (vproj.weight * g0).t()  # (C, H*d)
        va = torch.matmul(vo0, wvg).view(b, h * t, h, d).permute(0, 2, 1, 3)  # (B, H, H*T rows, d)
        keys1, stats1 = [], []
        acc: lr.Acc | None = None
        for i0 in range(0, n, self.chunk):
            i1 = min(n, i0 + self.chunk)
            a0c = a0[:, :, i0:i1]
            k1, mu, rstd = torch.native_layer_norm(
                torch.baddbmm(st.x0[i0:i1].unsqueeze(0), a0c.transpose(1, 2), vo0), (c,), g0, b0, n4.eps
            )
            mu, rstd = mu.transpose(1, 2), rstd.transpose(1, 2)  # (B, 1, n)
            keys1.append(k1)
            stats1.append((mu, rstd))
            xk = torch.matmul(qp1, st.xk1[:, :, i0:i1].unsqueeze(0)).reshape(b, h * t, i1 - i0)
            lg = lr.lowrank_logits(lr1, xk, a0c, mu, rstd) + pel1[:, :, i0:i1]
            acc = lr.lowrank_values_step(acc, lg, rstd, mu, a0c, st.xv1[:, i0:i1], h, t)
        assert acc is not None  # n > 0 image tokens
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
        kp = lr.heads(i2t1.k_proj(q), h) * s
        kq = lr.token_side(kp, i2t1.q_proj)
        cb = torch.einsum("bhtd,hd->bht", kp, i2t1.q_proj.bias.view(h, d)).reshape(b, h * t, 1)
        pel2 = torch.matmul(kp, self.pe_q1.unsqueeze(0)).reshape(b, h * t, n) + cb
        lr2 = lr.lowrank(kq, g0, b0, vo0)
        vo1 = lr.img2tok_values(i2t1, queries, h)
        fin = self.dec.transformer.final_attn_token_to_image
        qf = (queries + qpe)[:, :2]
        qpf = lr.heads(fin.q_proj(qf), h) * s  # (B, H, 2, d)
        qk2 = lr.token_side(qpf, fin.k_proj)
        pel3 = torch.matmul(qpf, self.pe_kf.unsqueeze(0)).reshape(b, h * 2, n)
        n4 = l1.norm4
        keys2 = []
        acc = None
        for k1, (mu, rstd), i0 in zip(keys1, stats1, range(0, n, self.chunk), strict=True):
            i1 = i0 + k1.shape[1]
            xq = torch.matmul(kp, st.xq1[:, :, i0:i1].unsqueeze(0)).reshape(b, h * t, i1 - i0)
            lg = lr.lowrank_logits(lr2, xq, a0[:, :, i0:i1], mu, rstd) + pel2[:, :, i0:i1]  # (B, H*T, n)
            a1 = lr.softmax_dim2(lg.view(b, h, t, i1 - i0)).view(b, h * t, i1 - i0)
            k2 = F.layer_norm(torch.baddbmm(k1, a1.transpose(1, 2), vo1), (c,), n4.weight, n4.bias, n4.eps)
            keys2.append(k2)
            acc = lr.online_softmax_step(acc, torch.baddbmm(pel3[:, :, i0:i1], qk2, k2.transpose(1, 2)), k2)
        assert acc is not None
        out = queries[:, :2] + lr.tok2img_out(fin, acc[2] / acc[1], 2, h)
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

    def logits(
        self,
        st: _ImageState,
        box_t: torch.Tensor,
        window: tuple[int, int, int, int] | None = None,
        keys: Keys | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, Keys]:
        """Box (B, 4) in model pixels -> (mask logits (B, 1, 4h, 4w), iou (B, 1), (hs, keys)).

        ``window`` (ty0, ty1, tx0, tx1) in embedding tokens: upscale only there;
        logits elsewhere are FILL_LOGIT (a sure "no"). ``keys``: the (hs, keys) of an earlier
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
            full = m.new_full((b, 1, gh * s, gw * s), FILL_LOGIT)
            full[..., window[0] * s : window[1] * s, window[2] * s : window[3] * s] = m
            m = full
        iou = dec.iou_prediction_head(hs[:, 0, :])[:, :1]
        return m, iou, keys
