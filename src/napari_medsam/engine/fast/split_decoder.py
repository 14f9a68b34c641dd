"""LiteMedSAM's prompt encoder + mask decoder split in two graphs: per image and per box.

Exported to ONNX (:mod:`.onnx_decoder`), they are the default CPU decoder where ONNX Runtime
loads, and the browser's decoder (``napari_medsam.server``: ONNX Runtime Web).

Same weights and maths as ``segment_anything`` with ``multimask_output=False``, in the
order of the engine's fused decoder (``engine.fast.decoder``), written as plain tensor
products (no chunk loops, no online softmax) so that ``torch.onnx.export`` traces it:

* :class:`ImagePart` (once per embedding): the box-independent tensors, i.e. the image
  tokens + no-mask embedding ``x0``, layer 0's token->image keys/values ``k0 v0`` and
  image->token queries ``q0``, and layer 1's image-side projections of ``x0`` with
  layer 0's final LayerNorm weight folded in ``xk1 xv1 xq1``;
* :class:`BoxPart` (every drag move): the transformer for one box against those, with
  the low-rank cross-attention of layer 1 (the 4096 image tokens only meet 7 tokens x 8
  heads = 56 vectors, see ``engine.fast.lowrank``), the final attention for the IoU token
  and mask token 0 only, and the output upscaling of a window of tokens only (``rows``,
  ``cols``: token indices on the 64 x 64 grid), as three matrix products.

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

IMAGE_OUTPUTS = ("x0", "k0", "v0", "q0", "xk1", "xv1", "xq1")


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """(1, T, D) -> (1, H, T, d)."""
    return x.reshape(1, x.shape[1], h, -1).transpose(1, 2)


def _per_head(w: torch.Tensor, h: int) -> torch.Tensor:
    """A Linear weight (H*d, C) -> (H, d, C): each head's rows."""
    return w.detach().reshape(h, -1, w.shape[-1]).clone()


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
        return x0, k0, v0, q0, xk1, xv1, xq1


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
    up_w1: torch.Tensor
    up_b1: torch.Tensor
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
            c = ct1.weight.shape[0]
            self.c1, self.c2 = int(ct1.weight.shape[1]), int(ct2.weight.shape[1])
            reg("up_w1", ct1.weight.permute(0, 2, 3, 1).reshape(c, 4 * self.c1).clone())
            reg("up_b1", ct1.bias.repeat(4).clone())
            reg("up_w2", ct2.weight.permute(0, 2, 3, 1).reshape(self.c1, 4 * self.c2).clone())
            reg("up_b2", ct2.bias.repeat(4).clone())
        self.up_ln, self.up_act1, self.up_act2 = ups[1], ups[2], ups[4]

    def _vo(self, att: Any, wo: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        """(1, T, C) tokens -> (1, H*T, C): values through out_proj per head, bias spread over the heads."""
        v = _heads(att.v_proj(tok), self.h)  # (1, H, T, d)
        vo = torch.matmul(v, wo)  # (1, H, T, C)
        return vo.reshape(1, -1, vo.shape[-1]) + att.out_proj.bias / self.h

    def forward(
        self, x0: Any, k0: Any, v0: Any, q0: Any, xk1: Any, xv1: Any, xq1: Any, box: Any, rows: Any, cols: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, l0, l1 = self.h, self.l0, self.l1
        coords = (box + 0.5).reshape(1, 2, 2)
        sparse = self.pe_mod.pe_layer.forward_with_coords(coords, self.pe_mod.input_image_size) + self.corner
        qpe = torch.cat([self.out_tokens.unsqueeze(0), sparse], 1)  # (1, T, C)
        t, n = qpe.shape[1], x0.shape[0]
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
        a0 = _softmax_tokens(torch.matmul(kp, q0)).reshape(1, h * t, n)  # (1, 56, N)
        vo0 = self._vo(i2t0, self.wo0, queries)  # (1, 56, C)
        # keys1 = LN(z), z = x0 + a0^T vo0 (one Gemm with x0 added in place), and z's mean and
        # 1/std per token for the low-rank products below (E[z^2] through one L2 reduction)
        n4 = l0.norm4
        c = x0.shape[1]
        z = torch.addmm(x0, a0[0].t(), vo0[0])  # (N, C)
        keys1 = F.layer_norm(z, (c,), n4.weight, n4.bias, n4.eps)
        mu = z.mean(-1, keepdim=True)  # (N, 1)
        ms = torch.linalg.vector_norm(z, dim=-1, keepdim=True) ** 2 / c
        rstd = torch.rsqrt(ms - mu * mu + n4.eps)
        mu_r, rstd_r = mu.reshape(1, 1, n), rstd.reshape(1, 1, n)  # (1, 1, N)
        g0, b0 = n4.weight, n4.bias
        # layer 1: self-attention, then token->image with the keys' projection taken low-rank:
        # w . LN(x0 + a0^T vo0) = rstd (w.(g0 x0) + (w g0) vo0^T a0 - (w.g0) mu) + w.b0
        q = queries + qpe
        queries = l1.norm1(queries + l1.self_attn(q=q, k=q, v=queries))
        t2i1 = l1.cross_attn_token_to_image
        qp1 = _heads(t2i1.q_proj(queries + qpe), h) * s  # (1, H, T, d)
        qk1 = torch.matmul(qp1, self.wk1).reshape(1, h * t, -1)  # (1, 56, C)
        lg = self._lowrank(qk1, g0, b0, vo0, torch.matmul(qp1, xk1), a0, mu_r, rstd_r)
        lg = lg + torch.matmul(qp1, self.pe_k1).reshape(1, h * t, n)
        p = torch.softmax(lg, dim=-1) * rstd_r  # (1, 56, N)
        zx = torch.matmul(p.reshape(1, h, t, n), xv1)  # (1, H, T, d)
        za = torch.matmul(p, a0.transpose(1, 2))  # (1, 56, 56)
        zmu = torch.matmul(p, mu.unsqueeze(0)).reshape(1, h, t, 1)
        va = torch.matmul(vo0, self.wvg).reshape(1, h * t, h, -1).permute(0, 2, 1, 3)  # (1, H, 56, d)
        o = zx + torch.matmul(za.reshape(1, h, t, -1), va) - zmu * self.wv_g0 + self.wv_b0
        queries = l1.norm2(queries + t2i1.out_proj(o.transpose(1, 2).reshape(1, t, -1)))
        queries = l1.norm3(queries + l1.mlp(queries))
        # layer 1 image->token: logits low-rank again, softmax over the tokens, then keys2 explicitly
        i2t1 = l1.cross_attn_image_to_token
        kp = _heads(i2t1.k_proj(queries + qpe), h) * s
        kq = torch.matmul(kp, self.wq1).reshape(1, h * t, -1)
        pel2 = torch.matmul(kp, self.pe_q1 + self.bq1).reshape(1, h * t, n)
        lg = self._lowrank(kq, g0, b0, vo0, torch.matmul(kp, xq1), a0, mu_r, rstd_r) + pel2
        a1 = _softmax_tokens(lg.reshape(1, h, t, n)).reshape(1, h * t, n)
        vo1 = self._vo(i2t1, self.wo1, queries)
        n4 = l1.norm4
        keys2 = F.layer_norm(torch.addmm(keys1, a1[0].t(), vo1[0]), (c,), n4.weight, n4.bias, n4.eps)  # (N, C)
        # final token->image attention, IoU token and mask token 0 only
        fin = self.fin
        qpf = _heads(fin.q_proj((queries + qpe)[:, :2]), h) * s  # (1, H, 2, d)
        qk2 = torch.matmul(qpf, self.wkf).reshape(1, h * 2, -1)
        lg = torch.matmul(qpf, self.pe_kf).reshape(1, h * 2, n) + torch.matmul(qk2, keys2.t())
        zf = torch.matmul(torch.softmax(lg, dim=-1), keys2).reshape(1, h, 2, -1)  # (1, H, 2, C)
        of = torch.matmul(zf, self.wvf) + fin.v_proj.bias.reshape(1, h, 1, -1)
        hs = self.norm_final(queries[:, :2] + fin.out_proj(of.transpose(1, 2).reshape(1, 2, -1)))
        hyper = self.dec.output_hypernetworks_mlps[0](hs[:, 1, :])  # (1, C/8)
        iou = self.dec.iou_prediction_head(hs[:, 0, :])[:, :1]
        # the output upscaling of the window only: two 2x2-stride-2 transposed convs as products
        grid = keys2.reshape(-1, self.gw, c)  # (64, 64, C)
        src = grid.index_select(0, rows).index_select(1, cols).reshape(-1, c)  # (P, C)
        y = (src @ self.up_w1 + self.up_b1).reshape(-1, self.c1)
        y = self.up_act1(F.layer_norm(y, (self.c1,), self.up_ln.weight, self.up_ln.bias, self.up_ln.eps))
        y = self.up_act2((y @ self.up_w2 + self.up_b2).reshape(-1, self.c2))
        m = (y @ hyper.reshape(-1, 1)).reshape(rows.shape[0], cols.shape[0], 2, 2, 2, 2)
        # (ty, tx, dy1, dx1, dy2, dx2) -> pixel (4ty + 2dy1 + dy2, 4tx + 2dx1 + dx2), row-major
        return m.permute(0, 2, 4, 1, 3, 5).reshape(-1), iou

    @staticmethod
    def _lowrank(w: Any, g0: Any, b0: Any, vo0: Any, wx: Any, a0: Any, mu: Any, rstd: Any) -> torch.Tensor:
        """``w . LN(x0 + a0^T vo0)`` for all image tokens; wx = w.(g0 x0) per head (1, H, T, N)."""
        wg = w * g0
        m = torch.matmul(wg, vo0.transpose(1, 2))  # (1, 56, 56)
        u = wg.sum(-1, keepdim=True)
        cst = torch.matmul(w, b0).unsqueeze(-1)
        return (wx.reshape(1, w.shape[1], -1) + torch.matmul(m, a0) - u * mu) * rstd + cst
