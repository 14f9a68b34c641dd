"""LiteMedSAM's prompt encoder + mask decoder split in two graphs: per image and per box.

Exported to ONNX (:mod:`.onnx_decoder`), they are the default CPU decoder where ONNX Runtime
loads, and the browser's decoder (``napari_medsam.server``: ONNX Runtime Web).

Same weights and maths as ``segment_anything`` with ``multimask_output=False``, in the
order of the engine's fused decoder (``engine.fast.decoder``), written as plain tensor
products (no chunk loops, no online softmax) so that ``torch.onnx.export`` traces it:

* :class:`ImagePart` (once per embedding): the box-independent tensors of the image
  tokens + no-mask embedding ``x0``, i.e. layer 0's token->image keys/values ``k0 v0`` and
  image->token queries ``q0``, layer 1's image-side projections of ``x0`` with layer 0's
  final LayerNorm weight folded in ``xk1 xv1 xq1``, and for the statistics of both
  LayerNorms after the image->token updates and the final attention: the centred tokens
  ``xc`` and ``xg`` (``xc`` times that weight, centred) through the per-head out
  projections and the final attention's key/value weights ``xc0 xg0 xg1 xkf xvf``, and
  eight per-token scalars ``xs`` (rows :data:`MX` ... :data:`XGB1`), and ``xu``: ``xg``
  through the output upscaling's first product (its weight times layer 1's final LayerNorm
  weight), so that product is low-rank per box as well;
* :class:`BoxPart` (every drag move): the transformer for one box against those. The
  4096 image tokens only ever meet 7 tokens x 8 heads = 56 vectors (``engine.fast.lowrank``),
  so no (4096, 256) tensor is built per box: each image->token update is carried as the
  (56, 4096) attention weights, and the LayerNorm statistics after it (mean, 1/std) come
  from the centred sums of squares expanded into products of those weights with 56 x 56
  Gram matrices and the per-image products above; the final attention runs for the IoU
  token and mask token 0 only, and the output upscaling runs on a window of tokens only
  (``rows``, ``cols``: token indices on the 64 x 64 grid), its first product from ``xu``
  and the two (P, 56) x (56, 256) products of the window's attention weights, the keys
  never built. The low-rank logits' mean and constant terms ride in the same product as
  the attention weights (``a0m``, two extra rows): one Gemm instead of a Gemm and three
  full-size elementwise passes (in ONNX Runtime Web 27-30 -> 26-27 ms per box, node, this
  machine). The algebra is exact; the logits agree with the explicit form to float32
  rounding (tested against ``segment_anything``'s decoder).

Outputs of :class:`BoxPart`: ``logits`` flat, the ``(4 * len(rows), 4 * len(cols))``
low-resolution logits of the window in row-major order, and ``iou`` (1, 1).
The page puts the window into a 256 x 256 grid of :data:`FILL_LOGIT` and does the
authors' postprocessing (crop to the unpadded area, bilinear, logit > 0).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .decoder import FILL_LOGIT  # logit outside the decoded window: a sure "no"

__all__ = ["FILL_LOGIT", "IMAGE_OUTPUTS", "BoxPart", "ImagePart"]

IMAGE_OUTPUTS = ("k0", "v0", "q0", "xk1", "xv1", "xq1", "xc0", "xg0", "xg1", "xkf", "xvf", "xs", "xu")
# the rows of ``xs`` (per image token): see :meth:`ImagePart.forward`
MX, SXC2, XCB0, SXG2, XGGB0, XGG0, XGB0, XGB1 = range(8)


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """(1, T, D) -> (1, H, T, d)."""
    return x.reshape(1, x.shape[1], h, -1).transpose(1, 2)


def _per_head(w: torch.Tensor, h: int) -> torch.Tensor:
    """A Linear weight (H*d, C) -> (H, d, C): each head's rows."""
    return w.detach().reshape(h, -1, w.shape[-1]).clone()


def _out_per_head(w: torch.Tensor, h: int) -> torch.Tensor:
    """An out_proj weight (C, H*d) -> (H, d, C): the rows each head's values meet."""
    return w.detach().reshape(w.shape[0], h, -1).permute(1, 2, 0).contiguous().clone()


def _up_weight(ct: Any) -> torch.Tensor:
    """A ``ConvTranspose2d(k=2, s=2)`` weight (Cin, Cout, 2, 2) as (Cin, 4 * Cout), columns (dy, dx, co)."""
    w = ct.weight.detach()
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).clone()


def _up_weight_g1(module: Any) -> torch.Tensor:
    """The output upscaling's first product with layer 1's final LayerNorm weight folded in,
    (C, 4 * C1): ``xu = xg @ this`` per image, the window's ``(vt0, vc1) @ this`` per box."""
    ups, g1 = module.mask_decoder.output_upscaling, module.mask_decoder.transformer.layers[1].norm4.weight
    return _up_weight(ups[0]) * g1.detach().unsqueeze(1)


def _softmax_tokens(x: torch.Tensor) -> torch.Tensor:
    """Softmax over axis 2 (the 7 tokens) of (1, H, T, N), written out: ONNX Runtime's Softmax on
    an inner axis transposes the tensor there and back (2.8 of 28 ms per box in the browser)."""
    e = torch.exp(x - x.amax(2, keepdim=True))
    return e / e.sum(2, keepdim=True)


class ImagePart(nn.Module):
    """embedding (1, C, 64, 64) float16 -> the per-image tensors (float32), see the module docstring."""

    no_mask: torch.Tensor
    pe: torch.Tensor
    w_k0: torch.Tensor
    b_k0: torch.Tensor
    w_v0: torch.Tensor
    b_v0: torch.Tensor
    w_q0: torch.Tensor
    b_q0: torch.Tensor
    w_1: torch.Tensor
    g0: torch.Tensor
    b0: torch.Tensor
    bo0: torch.Tensor
    bo1: torch.Tensor
    wo0g: torch.Tensor
    wo0: torch.Tensor
    wo1: torch.Tensor
    wkfg: torch.Tensor
    wvfg: torch.Tensor
    up_wg: torch.Tensor

    def __init__(self, module: Any, dense_pe: torch.Tensor):
        super().__init__()
        pe_mod, dec = module.prompt_encoder, module.mask_decoder
        t = dec.transformer
        self.h = int(t.num_heads)
        l0, l1 = t.layers
        self.register_buffer("no_mask", pe_mod.no_mask_embed.weight.detach().reshape(-1).clone())
        self.register_buffer("pe", dense_pe.detach().flatten(2)[0].transpose(0, 1).contiguous().clone())
        g0 = l0.norm4.weight.detach()
        ws = {
            "k0": l0.cross_attn_token_to_image.k_proj,
            "v0": l0.cross_attn_token_to_image.v_proj,
            "q0": l0.cross_attn_image_to_token.q_proj,
        }
        for name, lin in ws.items():
            self.register_buffer(f"w_{name}", lin.weight.detach().t().contiguous().clone())
            self.register_buffer(f"b_{name}", lin.bias.detach().clone())
        # one product for layer 1's three folded projections: x0 @ (W diag g0)^T
        w1 = [
            l1.cross_attn_token_to_image.k_proj.weight,
            l1.cross_attn_token_to_image.v_proj.weight,
            l1.cross_attn_image_to_token.q_proj.weight,
        ]
        self.register_buffer("w_1", torch.cat([(w.detach() * g0).t() for w in w1], 1).contiguous().clone())
        # the image-side projections of layer 1's and the final attention's low-rank products
        i2t0, i2t1, fin = l0.cross_attn_image_to_token, l1.cross_attn_image_to_token, t.final_attn_token_to_image
        g1 = l1.norm4.weight.detach()
        self.register_buffer("g0", g0.clone())
        self.register_buffer("b0", l0.norm4.bias.detach().clone())
        self.register_buffer("bo0", i2t0.out_proj.bias.detach().clone())
        self.register_buffer("bo1", i2t1.out_proj.bias.detach().clone())
        self.register_buffer("wo0g", _out_per_head(i2t0.out_proj.weight, self.h) * g0)  # (H, d, C)
        self.register_buffer("wo0", _out_per_head(i2t0.out_proj.weight, self.h))
        self.register_buffer("wo1", _out_per_head(i2t1.out_proj.weight, self.h))
        self.register_buffer("wkfg", _per_head(fin.k_proj.weight, self.h) * g1)  # (H, d, C)
        self.register_buffer("wvfg", (_per_head(fin.v_proj.weight, self.h) * g1).transpose(1, 2).contiguous())
        self.register_buffer("up_wg", _up_weight_g1(module))

    def forward(self, embedding: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = embedding.float()
        c = f.shape[1]
        x0 = f[0].reshape(c, -1).transpose(0, 1) + self.no_mask  # (N, C)
        n, h = x0.shape[0], self.h
        kp = x0 + self.pe
        k0 = (kp @ self.w_k0 + self.b_k0).reshape(n, h, -1).permute(1, 2, 0)  # (H, d, N)
        v0 = (x0 @ self.w_v0 + self.b_v0).reshape(n, h, -1).transpose(0, 1)  # (H, N, d)
        q0 = (kp @ self.w_q0 + self.b_q0).reshape(n, h, -1).permute(1, 2, 0)  # (H, d, N)
        x1 = (x0 @ self.w_1).reshape(n, 3, h, -1)
        xk1 = x1[:, 0].permute(1, 2, 0)  # (H, d, N)
        xv1 = x1[:, 1].transpose(0, 1)  # (H, N, d)
        xq1 = x1[:, 2].permute(1, 2, 0)  # (H, d, N)
        # centred rows: xc = x0 - mean; xg = (xc g0) - mean (layer 0's LayerNorm without 1/std)
        xc = x0 - x0.mean(-1, keepdim=True)
        xg = xc * self.g0
        xg = xg - xg.mean(-1, keepdim=True)
        xct, xgt = xc.t(), xg.t()
        xc0 = torch.matmul(self.wo0, xct)  # (H, d, N)
        xg0 = torch.matmul(self.wo0g, xgt)
        xg1 = torch.matmul(self.wo1, xgt)
        xkf = torch.matmul(self.wkfg, xgt)
        xvf = torch.matmul(xg, self.wvfg)  # (H, N, d)
        vecs = torch.stack([self.bo0, self.g0 * self.bo0, self.g0, self.b0, self.bo1], 1)  # (C, 5)
        xcb0 = xc @ vecs[:, :1]
        xgv = xg @ vecs[:, 1:]
        sq = torch.stack([(xc * xc).sum(-1), (xg * xg).sum(-1)], 1)
        xs = torch.cat([x0.mean(-1, keepdim=True), sq[:, :1], xcb0, sq[:, 1:], xgv], 1).t().contiguous()  # (8, N)
        xu = xg @ self.up_wg  # (N, 4 * C1): the upscaling's first product of xg, see BoxPart
        return k0, v0, q0, xk1, xv1, xq1, xc0, xg0, xg1, xkf, xvf, xs, xu


class BoxPart(nn.Module):
    """The per-image tensors + box (1, 4) model pixels + window token indices -> (logits, iou)."""

    corner: torch.Tensor
    out_tokens: torch.Tensor
    pe_k1: torch.Tensor
    pe_q1: torch.Tensor
    pe_kf: torch.Tensor
    wk1: torch.Tensor
    wq1: torch.Tensor
    wkf: torch.Tensor
    wo0: torch.Tensor
    wo1: torch.Tensor
    wvg: torch.Tensor
    wv_g0: torch.Tensor
    wv_b0: torch.Tensor
    bq1: torch.Tensor
    wvf: torch.Tensor
    up_wg: torch.Tensor
    up_c: torch.Tensor
    up_w2: torch.Tensor
    up_b2: torch.Tensor

    def __init__(self, module: Any, dense_pe: torch.Tensor):
        super().__init__()
        self.pe_mod, self.dec = module.prompt_encoder, module.mask_decoder
        t = self.dec.transformer
        h = self.h = int(t.num_heads)
        self.l0, self.l1 = t.layers
        self.fin, self.norm_final = t.final_attn_token_to_image, t.norm_final_attn
        pe = dense_pe.detach().flatten(2)[0].transpose(0, 1)  # (N, C)
        self.gw = int(dense_pe.shape[-1])  # 64 tokens a row
        reg = self.register_buffer
        with torch.no_grad():
            pe_mod = self.pe_mod
            reg("corner", torch.cat([pe_mod.point_embeddings[2].weight, pe_mod.point_embeddings[3].weight], 0).clone())
            reg("out_tokens", torch.cat([self.dec.iou_token.weight, self.dec.mask_tokens.weight], 0).clone())
            t2i1, i2t1 = self.l1.cross_attn_token_to_image, self.l1.cross_attn_image_to_token
            # the positional encoding's projections by the later image-side weights: (H, d, N)
            for name, lin in (("pe_k1", t2i1.k_proj), ("pe_q1", i2t1.q_proj), ("pe_kf", self.fin.k_proj)):
                reg(name, (pe @ lin.weight.t()).reshape(pe.shape[0], h, -1).permute(1, 2, 0).contiguous().clone())
            for name, lin in (("wk1", t2i1.k_proj), ("wq1", i2t1.q_proj), ("wkf", self.fin.k_proj)):
                reg(name, _per_head(lin.weight, h))  # token_side: (1, H, T, d) @ (H, d, C)
            for name, att in (("wo0", self.l0.cross_attn_image_to_token), ("wo1", i2t1)):
                # img2tok values: v (1, H, T, d) @ out_proj per head (H, d, C)
                reg(
                    name,
                    att.out_proj.weight.detach()
                    .reshape(-1, h, att.out_proj.weight.shape[1] // h)
                    .permute(1, 2, 0)
                    .clone(),
                )
            g0, b0 = self.l0.norm4.weight, self.l0.norm4.bias
            vw = t2i1.v_proj.weight  # (H*d, C)
            reg("wvg", (vw * g0).t().contiguous().clone())  # (C, H*d)
            reg("wv_g0", (vw @ g0).reshape(1, h, 1, -1).clone())
            reg("wv_b0", (vw @ b0 + t2i1.v_proj.bias).reshape(1, h, 1, -1).clone())
            reg("bq1", i2t1.q_proj.bias.reshape(h, -1, 1).clone())  # (H, d, 1)
            reg(
                "wvf",
                self.fin.v_proj.weight.detach().reshape(h, -1, self.fin.v_proj.weight.shape[1]).transpose(1, 2).clone(),
            )
            ups = self.dec.output_upscaling
            ct1, ct2 = ups[0], ups[3]
            self.c1, self.c2 = int(ct1.weight.shape[1]), int(ct2.weight.shape[1])
            # the first product on LN1's output src = rstd2 zc g1 + b1 (zc: the centred rows):
            # src @ W + c = rstd2 (zc @ (g1 W)) + (b1 @ W + c)
            reg("up_wg", _up_weight_g1(module))
            reg("up_c", (self.l1.norm4.bias @ _up_weight(ct1) + ct1.bias.repeat(4)).clone())
            reg("up_w2", ct2.weight.permute(0, 2, 3, 1).reshape(self.c1, 4 * self.c2).clone())
            reg("up_b2", ct2.bias.repeat(4).clone())
        self.up_ln, self.up_act1, self.up_act2 = ups[1], ups[2], ups[4]

    def _vo(self, att: Any, wo: torch.Tensor, tok: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1, T, C) tokens -> values per head (H, T, d) and (H*T, C): the values through out_proj
        per head, its bias spread over the heads."""
        v = _heads(att.v_proj(tok), self.h)  # (1, H, T, d)
        vo = torch.matmul(v, wo)  # (1, H, T, C)
        return v[0], vo.reshape(-1, vo.shape[-1]) + att.out_proj.bias / self.h

    def forward(
        self,
        k0: Any,
        v0: Any,
        q0: Any,
        xk1: Any,
        xv1: Any,
        xq1: Any,
        xc0: Any,
        xg0: Any,
        xg1: Any,
        xkf: Any,
        xvf: Any,
        xs: Any,
        xu: Any,
        box: Any,
        rows: Any,
        cols: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, l0, l1 = self.h, self.l0, self.l1
        coords = (box + 0.5).reshape(1, 2, 2)
        sparse = self.pe_mod.pe_layer.forward_with_coords(coords, self.pe_mod.input_image_size) + self.corner
        qpe = torch.cat([self.out_tokens.unsqueeze(0), sparse], 1)  # (1, T, C)
        t, n = qpe.shape[1], xs.shape[1]
        c = qpe.shape[2]
        # layer 0 (skip_first_layer_pe): the tokens against the cached image projections
        queries = l0.norm1(l0.self_attn(q=qpe, k=qpe, v=qpe))
        qp = _heads(l0.cross_attn_token_to_image.q_proj(queries + qpe), h)
        s = qp.shape[-1] ** -0.5
        a = torch.softmax(torch.matmul(qp, k0) * s, dim=-1)  # (1, H, T, N)
        o = torch.matmul(a, v0).transpose(1, 2).reshape(1, t, -1)
        queries = l0.norm2(queries + l0.cross_attn_token_to_image.out_proj(o))
        queries = l0.norm3(queries + l0.mlp(queries))
        i2t0 = l0.cross_attn_image_to_token
        kp = _heads(i2t0.k_proj(queries + qpe), h) * s
        a0 = _softmax_tokens(torch.matmul(kp, q0)).reshape(h * t, n)  # (56, N)
        v0t, vo0 = self._vo(i2t0, self.wo0, queries)  # (H, T, d), (56, C)
        # the image tokens after layer 0 are z = x0 + a0^T vo0, never built: their mean and
        # 1/std from the centred per-image products (sum of squares of xc + a0^T vo0c)
        n4 = l0.norm4
        g0, b0 = n4.weight, n4.bias
        m0 = vo0.mean(-1, keepdim=True)  # (56, 1)
        vc0 = vo0 - m0
        mu = xs[MX] + (m0 * a0).sum(0)  # (N,)
        xcv = torch.matmul(v0t, xc0).reshape(h * t, n) + xs[XCB0] / h  # xc . vo0
        s1 = xs[SXC2] + (a0 * (2 * xcv + torch.matmul(vc0 @ vc0.t(), a0))).sum(0)
        var = s1 / c + n4.eps
        rstd = torch.rsqrt(var)
        # a0 with two more rows, so that the low-rank logits' mean and constant terms ride in one product
        a0m = torch.cat([a0, mu.reshape(1, n), torch.sqrt(var).reshape(1, n)], 0)  # (58, N)
        # layer 1: self-attention, then token->image with the keys' projection taken low-rank:
        # w . LN(x0 + a0^T vo0) = rstd (w.(g0 x0) + (w g0) vo0^T a0 - (w.g0) mu) + w.b0
        q = queries + qpe
        queries = l1.norm1(queries + l1.self_attn(q=q, k=q, v=queries))
        t2i1 = l1.cross_attn_token_to_image
        qp1 = _heads(t2i1.q_proj(queries + qpe), h) * s  # (1, H, T, d)
        qk1 = torch.matmul(qp1, self.wk1).reshape(1, h * t, -1)  # (1, 56, C)
        lg = self._lowrank(qk1[0], g0, b0, vo0, torch.matmul(qp1, xk1).reshape(h * t, n), a0m, rstd)
        lg = lg + torch.matmul(qp1, self.pe_k1).reshape(h * t, n)
        p = torch.softmax(lg, dim=-1) * rstd  # (56, N)
        zx = torch.matmul(p.reshape(1, h, t, n), xv1)  # (1, H, T, d)
        zam = p @ a0m.t()  # (56, 58): p a0^T and p mu in one product (the last column unused)
        za, zmu = zam[:, : h * t].unsqueeze(0), zam[:, h * t : h * t + 1].reshape(1, h, t, 1)
        va = torch.matmul(vo0, self.wvg).reshape(1, h * t, h, -1).permute(0, 2, 1, 3)  # (1, H, 56, d)
        o = zx + torch.matmul(za.reshape(1, h, t, -1), va) - zmu * self.wv_g0 + self.wv_b0
        queries = l1.norm2(queries + t2i1.out_proj(o.transpose(1, 2).reshape(1, t, -1)))
        queries = l1.norm3(queries + l1.mlp(queries))
        # layer 1 image->token: logits low-rank again, softmax over the tokens
        i2t1 = l1.cross_attn_image_to_token
        kp = _heads(i2t1.k_proj(queries + qpe), h) * s
        kq = torch.matmul(kp, self.wq1).reshape(h * t, -1)
        pel2 = torch.matmul(kp, self.pe_q1 + self.bq1).reshape(h * t, n)
        lg = self._lowrank(kq, g0, b0, vo0, torch.matmul(kp, xq1).reshape(h * t, n), a0m, rstd) + pel2
        a1 = _softmax_tokens(lg.reshape(1, h, t, n)).reshape(h * t, n)
        v1t, vo1 = self._vo(i2t1, self.wo1, queries)
        # keys2 = LN1(z2), z2 = LN0(z) + a1^T vo1, never built either: centred, z2 - mean(z2) =
        # rstd y + b0c + a1^T vc1 with y = xg + a0^T vt0 (xg, vt0: the centred rows times g0)
        n4 = l1.norm4
        g1 = n4.weight
        vc1 = vo1 - vo1.mean(-1, keepdim=True)
        vt0 = vc0 * g0
        vt0 = vt0 - vt0.mean(-1, keepdim=True)
        b0c = b0 - b0.mean()
        xgv = torch.matmul(v0t, xg0).reshape(h * t, n) + xs[XGGB0] / h - xs[XGG0] * m0  # xg . vt0
        yy = xs[SXG2] + (a0 * (2 * xgv + torch.matmul(vt0 @ vt0.t(), a0))).sum(0)  # |y|^2
        yb = xs[XGB0] + ((vt0 @ b0c).unsqueeze(1) * a0).sum(0)  # y . b0c
        yv1 = torch.matmul(v1t, xg1).reshape(h * t, n) + xs[XGB1] / h + torch.matmul(vc1 @ vt0.t(), a0)  # y . vc1
        a1v = a1 * (2 * (vc1 @ b0c).unsqueeze(1) + torch.matmul(vc1 @ vc1.t(), a1))
        s2 = rstd * rstd * yy + (b0c * b0c).sum() + 2 * rstd * (yb + (a1 * yv1).sum(0)) + a1v.sum(0)
        rstd2 = torch.rsqrt(s2 / c + n4.eps)  # (N,)
        # final token->image attention, IoU token and mask token 0 only: keys2 . (w g1) =
        # rstd2 (rstd (xg + a0^T vt0) + b0c + a1^T vc1) . (w g1) + const
        fin = self.fin
        qpf = _heads(fin.q_proj((queries + qpe)[:, :2]), h) * s  # (1, H, 2, d)
        wg = torch.matmul(qpf, self.wkf).reshape(h * 2, -1) * g1  # (16, C)
        xw = torch.matmul(qpf[0], xkf).reshape(h * 2, n) + torch.matmul(wg @ vt0.t(), a0)
        lg = rstd2 * (rstd * xw + (wg @ b0c).unsqueeze(1) + torch.matmul(wg @ vc1.t(), a1))
        lg = lg + torch.matmul(qpf, self.pe_kf).reshape(h * 2, n)
        pf = torch.softmax(lg, dim=-1) * rstd2  # (16, N)
        pr = pf * rstd
        wvf = self.wvf * g1.reshape(1, -1, 1)  # (H, C, d)
        of = torch.matmul(pr.reshape(h, 2, n), xvf)  # (H, 2, d)
        of = of + torch.matmul((pr @ a0.t()).reshape(h, 2, -1), torch.matmul(vt0, wvf))
        of = of + pf.sum(-1).reshape(h, 2, 1) * torch.matmul(b0c, wvf).unsqueeze(1)
        of = of + torch.matmul((pf @ a1.t()).reshape(h, 2, -1), torch.matmul(vc1, wvf))
        of = of + (torch.matmul(n4.bias, self.wvf) + fin.v_proj.bias.reshape(h, -1)).unsqueeze(1)
        hs = self.norm_final(queries[:, :2] + fin.out_proj(of.unsqueeze(0).transpose(1, 2).reshape(1, 2, -1)))
        hyper = self.dec.output_hypernetworks_mlps[0](hs[:, 1, :])  # (1, C/8)
        iou = self.dec.iou_prediction_head(hs[:, 0, :])[:, :1]
        # the output upscaling of the window's tokens: its first product on keys2 = LN1(z2) low-rank
        # as well, src @ W = rstd2 (rstd (xg W + a0^T vt0 W) + b0c W + a1^T vc1 W) + const, with xu =
        # xg W per image (ImagePart); then the rest per pixel, as the authors
        idx = (rows.unsqueeze(1) * self.gw + cols.unsqueeze(0)).reshape(-1)
        wg1 = self.up_wg
        r0, r2 = rstd.index_select(0, idx).unsqueeze(1), rstd2.index_select(0, idx).unsqueeze(1)
        pre = (xu.index_select(0, idx) + a0.index_select(1, idx).t() @ (vt0 @ wg1)) * r0
        pre = pre + a1.index_select(1, idx).t() @ (vc1 @ wg1) + b0c @ wg1
        y = (pre * r2 + self.up_c).reshape(-1, self.c1)
        y = self.up_act1(F.layer_norm(y, (self.c1,), self.up_ln.weight, self.up_ln.bias, self.up_ln.eps))
        y = self.up_act2((y @ self.up_w2 + self.up_b2).reshape(-1, self.c2))
        m = (y @ hyper.reshape(-1, 1)).reshape(rows.shape[0], cols.shape[0], 2, 2, 2, 2)
        # (ty, tx, dy1, dx1, dy2, dx2) -> pixel (4ty + 2dy1 + dy2, 4tx + 2dx1 + dx2), row-major
        return m.permute(0, 2, 4, 1, 3, 5).reshape(-1), iou

    @staticmethod
    def _lowrank(w: Any, g0: Any, b0: Any, vo0: Any, wx: Any, a0m: Any, rstd: Any) -> torch.Tensor:
        """``w . LN(x0 + a0^T vo0)`` (56, N) for all image tokens, w (56, C); wx = w.(g0 x0) (56, N);
        a0m = [a0; mu; 1/rstd] and m = [wg vo0^T, -sum(wg), w.b0] (wg = w g0): (wx + m a0m) rstd, one
        product and one scaling for rstd (wx + wg vo0^T a0 - sum(wg) mu) + w.b0."""
        wg = w * g0
        m = torch.cat([wg @ vo0.t(), -wg.sum(-1, keepdim=True), (w @ b0).unsqueeze(-1)], 1)  # (56, 58)
        return (wx + m @ a0m) * rstd
