"""The attention algebra of the fused decoder, as free functions (see decoder.py's legend).

With 7 prompt tokens and 8 heads the 4096 image tokens only ever meet 56 head-token
vectors, so image-side projections can be moved to the token side; softmaxes over the
image tokens are accumulated chunk by chunk (online, flash-attention style).
"""

from __future__ import annotations

from typing import Any

import torch

#: (running max, sum of weights, weighted values) of an online softmax
Acc = list[torch.Tensor]


def heads(x: torch.Tensor, h: int) -> torch.Tensor:
    """(B, T, D) -> (B, H, T, d): split the channels into ``h`` heads."""
    b, t, d = x.shape
    return x.view(b, t, h, d // h).transpose(1, 2)


def img2tok_values(attn: Any, tok: torch.Tensor, h: int) -> torch.Tensor:
    """(B, T, C) tokens -> (B, H*T, C): values pushed through out_proj per head.

    out_proj's bias is spread as bias / H over the rows: every image token's
    attention weights sum to 1 per head, so a @ values gets the bias exactly once.
    """
    b, t, c = tok.shape
    v = heads(attn.v_proj(tok), h)  # (B, H, T, d)
    d = v.shape[-1]
    wo = attn.out_proj.weight.view(c, h, d)
    vo = torch.einsum("bhtd,ohd->bhto", v, wo).reshape(b, h * t, c)
    return vo + attn.out_proj.bias / h


def token_side(x: torch.Tensor, lin: Any) -> torch.Tensor:
    """(B, H, T, d) per-head token vectors -> (B, H*T, C): each multiplied into its head's rows
    of ``lin``'s weight, i.e. an image-side projection moved to the token side."""
    b, h, t, d = x.shape
    return torch.einsum("bhtd,hdc->bhtc", x, lin.weight.view(h, d, -1)).reshape(b, h * t, -1)


def tok2img_out(attn: Any, z: torch.Tensor, t: int, h: int) -> torch.Tensor:
    """(B, H*T, C) attention-weighted image tokens -> (B, T, C) token->image attention output."""
    b, _, c = z.shape
    wv = attn.v_proj.weight.view(h, -1, c)
    d = wv.shape[1]
    o = torch.einsum("bhtc,hdc->bhtd", z.view(b, h, t, c), wv) + attn.v_proj.bias.view(1, h, 1, d)
    return attn.out_proj(o.transpose(1, 2).reshape(b, t, h * d))


def online_weights(
    m_prev: torch.Tensor | None, logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Running-max step of an online softmax over the last axis: (new max, exp(logits - max),
    factor for what was accumulated so far, or None on the first chunk)."""
    m = logits.amax(-1, keepdim=True)
    if m_prev is not None:
        m = torch.maximum(m_prev, m)
    alpha = None if m_prev is None else torch.exp(m_prev - m)
    return m, torch.exp(logits - m), alpha


def online_softmax_step(acc: Acc | None, logits: torch.Tensor, values: torch.Tensor) -> Acc:
    """One chunk of a softmax(logits) @ values over the last axis, accumulated (flash-attention style)."""
    m, p, alpha = online_weights(None if acc is None else acc[0], logits)
    if acc is None or alpha is None:
        return [m, p.sum(-1, keepdim=True), torch.bmm(p, values)]
    return [m, acc[1] * alpha + p.sum(-1, keepdim=True), torch.baddbmm(acc[2] * alpha, p, values)]


def softmax_dim2(x: torch.Tensor) -> torch.Tensor:
    """Softmax over axis 2 of (B, H, T, n) with T = 7: along the long contiguous axis
    (``torch.softmax(dim=2)`` walks the short strided one, ~10x slower)."""
    e = torch.exp(x - x.amax(2, keepdim=True))
    return e.div_(e.sum(2, keepdim=True))


def lowrank(
    w: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, vo: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-side factors of ``w . LN(x + A^T vo)``: (w*g) vo^T (B, R, 56), w.g and w.beta (B, R, 1)."""
    wg = w * g
    return torch.bmm(wg, vo.transpose(1, 2)), wg.sum(-1, keepdim=True), torch.matmul(w, beta).unsqueeze(-1)


def lowrank_logits(
    f: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    wx: torch.Tensor,
    ac: torch.Tensor,
    mu: torch.Tensor,
    rstd: torch.Tensor,
) -> torch.Tensor:
    """``w . LN(x_i + A_i^T vo)`` for a chunk: wx = w.(g x_i) (B, R, n), ac (B, 56, n), mu / rstd (B, 1, n)."""
    m, u, cst = f
    return torch.baddbmm(wx, m, ac).sub_(u * mu).mul_(rstd).add_(cst)


def lowrank_values_step(
    acc: Acc | None,
    logits: torch.Tensor,
    rstd: torch.Tensor,
    mu: torch.Tensor,
    ac: torch.Tensor,
    xv: torch.Tensor,
    h: int,
    t: int,
) -> Acc:
    """One chunk of softmax(logits) @ W_v LN(x + A^T vo), kept as its factors and accumulated
    online: sum of p (B, R, 1), p rstd @ (x W_v g) per head (B, H, T, d), p rstd @ A^T (B, R, 56),
    p rstd . mu (B, R, 1)."""
    b, r, n = logits.shape
    m, p, alpha = online_weights(None if acc is None else acc[0], logits)
    pr = p * rstd
    parts = [
        p.sum(-1, keepdim=True),
        torch.matmul(pr.view(b, h, t, n), xv.unsqueeze(0)),
        torch.bmm(pr, ac.transpose(1, 2)),
        torch.bmm(pr, mu.transpose(1, 2)),
    ]
    if acc is None or alpha is None:
        return [m, *parts]
    return [
        m,
        acc[1] * alpha + parts[0],
        acc[2] * alpha.view(b, h, t, 1) + parts[1],
        acc[3] * alpha + parts[2],
        acc[4] * alpha + parts[3],
    ]
