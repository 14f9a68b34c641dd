"""TinyViT image encoder as used by LiteMedSAM (256 x 256 input, 64 x 64 embedding).

Written for this project from the architecture in the LiteMedSAM paper and code
(no timm). Module and parameter names follow the authors' checkpoint so that the
official ``lite_medsam.pth`` loads with ``strict=True``.

Differences from MobileSAM's TinyViT, all required by the checkpoint:

* the patch embedding is two 1x1, stride-1 conv-BN layers, so stage 0 runs on
  the full 256 x 256 grid;
* the patch merging into the last stage has stride 1 (grids 256 -> 128 -> 64 -> 64);
* a SAM-style neck turns the 320-channel tokens into a (256, 64, 64) embedding.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from segment_anything.modeling.common import LayerNorm2d
from torch import nn
from torch.nn import functional as F


class ConvBN(nn.Sequential):
    """Conv2d without bias followed by BatchNorm2d (keys ``c`` and ``bn``)."""

    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, pad: int = 0, groups: int = 1):
        super().__init__()
        self.add_module("c", nn.Conv2d(cin, cout, kernel, stride, pad, groups=groups, bias=False))
        self.add_module("bn", nn.BatchNorm2d(cout))


class PatchEmbed(nn.Module):
    def __init__(self, in_chans: int, dim: int):
        super().__init__()
        self.seq = nn.Sequential(ConvBN(in_chans, dim // 2), nn.GELU(), ConvBN(dim // 2, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, 3x3 depthwise, 1x1 project."""

    def __init__(self, dim: int, expand: float):
        super().__init__()
        hidden = int(dim * expand)
        self.conv1 = ConvBN(dim, hidden)
        self.conv2 = ConvBN(hidden, hidden, 3, 1, 1, groups=hidden)
        self.conv3 = ConvBN(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.conv1(x))
        y = self.act(self.conv2(y))
        return self.act(self.conv3(y) + x)


class PatchMerging(nn.Module):
    """Token grid (B, C, H, W) or (B, H*W, C) to (B, H'*W', C') tokens."""

    def __init__(self, resolution: tuple[int, int], dim: int, out_dim: int, stride: int):
        super().__init__()
        self.resolution = resolution
        self.conv1 = ConvBN(dim, out_dim)
        self.conv2 = ConvBN(out_dim, out_dim, 3, stride, 1, groups=out_dim)
        self.conv3 = ConvBN(out_dim, out_dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            h, w = self.resolution
            x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.conv3(x)
        return x.flatten(2).transpose(1, 2)


class ConvStage(nn.Module):
    def __init__(self, dim: int, depth: int, expand: float, downsample: nn.Module | None):
        super().__init__()
        self.blocks = nn.ModuleList(MBConv(dim, expand) for _ in range(depth))
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.act = nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(x))))


class WindowAttention(nn.Module):
    """Multi-head attention inside a window with a learned relative-offset bias."""

    attention_bias_idxs: torch.Tensor  # buffer registered in __init__

    def __init__(self, dim: int, num_heads: int, window: int):
        super().__init__()
        self.num_heads = num_heads
        self.key_dim = dim // num_heads
        self.scale = self.key_dim**-0.5
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        points = list(itertools.product(range(window), range(window)))
        offsets: dict = {}
        idxs = []
        for p in points:
            for q in points:
                off = (abs(p[0] - q[0]), abs(p[1] - q[1]))
                idxs.append(offsets.setdefault(off, len(offsets)))
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, len(offsets)))
        self.register_buffer(
            "attention_bias_idxs", torch.tensor(idxs, dtype=torch.long).view(len(points), len(points)), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(self.norm(x)).view(b, n, self.num_heads, 3 * self.key_dim)
        q, k, v = qkv.split(self.key_dim, dim=3)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        bias = self.attention_biases[:, self.attention_bias_idxs]
        attn = (q @ k.transpose(-2, -1)) * self.scale + bias
        out = (attn.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj(out)


class TinyViTBlock(nn.Module):
    def __init__(
        self, dim: int, resolution: tuple[int, int], num_heads: int, window: int, mlp_ratio: float, local_conv: int
    ):
        super().__init__()
        self.resolution = resolution
        self.window = window
        self.attn = WindowAttention(dim, num_heads, window)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.local_conv = ConvBN(dim, dim, local_conv, 1, local_conv // 2, groups=dim)

    def _windowed_attention(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.resolution
        b, n, c = x.shape
        ws = self.window
        if h == ws and w == ws:
            return self.attn(x)
        x = x.view(b, h, w, c)
        pad_b, pad_r = (ws - h % ws) % ws, (ws - w % ws) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        ph, pw = h + pad_b, w + pad_r
        nh, nw = ph // ws, pw // ws
        x = x.view(b, nh, ws, nw, ws, c).transpose(2, 3).reshape(b * nh * nw, ws * ws, c)
        x = self.attn(x)
        x = x.view(b, nh, nw, ws, ws, c).transpose(2, 3).reshape(b, ph, pw, c)
        if pad_b or pad_r:
            x = x[:, :h, :w].contiguous()
        return x.view(b, n, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.resolution
        b, n, c = x.shape
        x = x + self._windowed_attention(x)
        x = self.local_conv(x.transpose(1, 2).reshape(b, c, h, w)).view(b, c, n).transpose(1, 2)
        return x + self.mlp(x)


class AttentionStage(nn.Module):
    def __init__(
        self,
        dim: int,
        resolution: tuple[int, int],
        depth: int,
        num_heads: int,
        window: int,
        mlp_ratio: float,
        local_conv: int,
        downsample: nn.Module | None,
    ):
        super().__init__()
        self.blocks = nn.ModuleList(
            TinyViTBlock(dim, resolution, num_heads, window, mlp_ratio, local_conv) for _ in range(depth)
        )
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x if self.downsample is None else self.downsample(x)


class TinyViT(nn.Module):
    """LiteMedSAM's image encoder: (B, 3, 256, 256) in [0, 1] -> (B, 256, 64, 64)."""

    def __init__(
        self,
        img_size: int = 256,
        in_chans: int = 3,
        embed_dims: Sequence[int] = (64, 128, 160, 320),
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (2, 4, 5, 10),
        window_sizes: Sequence[int] = (7, 7, 14, 7),
        mlp_ratio: float = 4.0,
        mbconv_expand_ratio: float = 4.0,
        local_conv_size: int = 3,
        out_chans: int = 256,
    ):
        super().__init__()
        self.img_size = img_size
        self.patch_embed = PatchEmbed(in_chans, embed_dims[0])
        # token grid per stage: stages 0..2 halve it, the last merge keeps it
        grids = [img_size, img_size // 2, img_size // 4, img_size // 4]
        self.grid = grids[-1]
        self.layers = nn.ModuleList()
        for i, dim in enumerate(embed_dims):
            res = (grids[i], grids[i])
            last = i == len(embed_dims) - 1
            down = None
            if not last:
                stride = grids[i] // grids[i + 1]
                down = PatchMerging(res, dim, embed_dims[i + 1], stride)
            if i == 0:
                self.layers.append(ConvStage(dim, depths[i], mbconv_expand_ratio, down))
            else:
                self.layers.append(
                    AttentionStage(dim, res, depths[i], num_heads[i], window_sizes[i], mlp_ratio, local_conv_size, down)
                )
        self.neck = nn.Sequential(
            nn.Conv2d(embed_dims[-1], out_chans, 1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        for layer in self.layers:
            x = layer(x)
        b, _, c = x.shape
        x = x.view(b, self.grid, self.grid, c).permute(0, 3, 1, 2)
        return self.neck(x)
