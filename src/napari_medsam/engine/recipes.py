"""Per-model geometry: 8-bit RGB image -> encoder input, boxes -> model space, logits -> mask.

Each recipe reproduces its authors' code path (see docs/accuracy.md):

* :class:`LiteMedSAMRecipe`: OpenCV ``INTER_AREA`` resize of the longest side to 256,
  min-max to [0, 1], zero-pad bottom/right; boxes times 256 / max(H, W) truncated to
  integers; logits cropped to the unpadded area, bilinearly upsampled, sigmoid > 0.5.
* :class:`MedSAMRecipe`: bicubic stretch to 1024 x 1024 (scikit-image, as in
  ``MedSAM_Inference.py``), min-max to [0, 1]; boxes scaled per axis; sigmoid,
  bilinear upsample, > 0.5.
* :class:`SAMRecipe`: segment-anything's own ``ResizeLongestSide`` + ImageNet
  normalisation + padding, and its ``postprocess_masks`` with threshold 0.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

Size = tuple[int, int]
Region = tuple[int, int, int, int]  # y0, y1, x0, x1


def longest_side_shape(h: int, w: int, target: int) -> Size:
    """(h, w) scaled so the longest side is ``target``, rounded as the authors do."""
    scale = target / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def minmax01(x: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] in float64, with the authors' 1e-8 floor on the range."""
    x = x.astype(np.float64)
    lo = x.min()
    return (x - lo) / np.clip(x.max() - lo, 1e-8, None)


class Recipe:
    """Geometry of one model family. Subclasses fill in the three steps."""

    name = "base"
    input_size = 1024

    def preprocess(self, rgb: np.ndarray) -> tuple[torch.Tensor, Size]:
        """(H, W, 3) uint8 -> ((1, 3, S, S) float32 tensor, unpadded (h, w) at model scale)."""
        raise NotImplementedError

    def scale_boxes(self, boxes: np.ndarray, original: Size, resized: Size) -> torch.Tensor:
        """(N, 4) x0, y0, x1, y1 in image pixels -> (N, 4) float32 in model input pixels."""
        raise NotImplementedError

    def model_scale(self, original: Size) -> tuple[float, float]:
        """Image pixel -> model input pixel factors (sx, sy): the longest side resized, aspect kept."""
        h, w = original
        s = float(self.input_size) / max(h, w)
        return s, s

    @property
    def chain_margin(self) -> float:
        """The authors' 3D chaining margin in model input pixels: 3 px at 256, 5 px at 1024."""
        return 3.0 if self.input_size <= 256 else 5.0 * self.input_size / 1024.0

    def postprocess(
        self, logits: torch.Tensor, resized: Size, original: Size, region: Region | None = None
    ) -> torch.Tensor:
        """(N, 1, 256, 256) logits -> (N, H, W) bool masks (or only ``region`` = y0, y1, x0, x1)."""
        raise NotImplementedError


def _upsample_region(prob: torch.Tensor, original: Size, region: Region | None) -> torch.Tensor:
    """Bilinear (align_corners=False) upsample of ``prob`` to ``original``, evaluated only in ``region``.

    Gives the same values as ``F.interpolate(prob, original, mode="bilinear")[..., y0:y1, x0:x1]``
    by sampling the source at the exact coordinates interpolate uses.
    """
    H, W = original
    if region is None:
        return F.interpolate(prob, size=(H, W), mode="bilinear", align_corners=False)
    y0, y1, x0, x1 = region
    h_in, w_in = prob.shape[-2:]
    device, dtype = prob.device, prob.dtype

    def axis(n_in: int, n_out: int, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        scale = n_in / n_out
        src = ((torch.arange(start, stop, device=device, dtype=torch.float32) + 0.5) * scale - 0.5).clamp(min=0)
        i0 = src.floor().long().clamp(max=n_in - 1)
        i1 = (i0 + 1).clamp(max=n_in - 1)
        frac = (src - i0.to(src.dtype)).to(dtype)
        return i0, i1, frac

    r0, r1, fy = axis(h_in, H, y0, y1)
    c0, c1, fx = axis(w_in, W, x0, x1)
    top = prob[..., r0, :]
    bot = prob[..., r1, :]
    rows = top + (bot - top) * fy[:, None]
    left = rows[..., c0]
    right = rows[..., c1]
    return left + (right - left) * fx


class LiteMedSAMRecipe(Recipe):
    name = "litemedsam"
    input_size = 256

    def preprocess(self, rgb: np.ndarray) -> tuple[torch.Tensor, Size]:
        import cv2

        h, w = rgb.shape[:2]
        nh, nw = longest_side_shape(h, w, self.input_size)
        small = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_AREA)
        norm = minmax01(small)
        padded = np.zeros((self.input_size, self.input_size, 3), np.float32)
        padded[:nh, :nw] = norm
        return torch.from_numpy(padded).permute(2, 0, 1)[None].contiguous(), (nh, nw)

    def scale_boxes(self, boxes: np.ndarray, original: Size, resized: Size) -> torch.Tensor:
        ratio = self.input_size / max(original)
        return torch.as_tensor(np.trunc(boxes * ratio), dtype=torch.float32)

    def postprocess(
        self, logits: torch.Tensor, resized: Size, original: Size, region: Region | None = None
    ) -> torch.Tensor:
        nh, nw = resized
        logits = logits[..., :nh, :nw]
        up = _upsample_region(logits, original, region)
        return (torch.sigmoid(up) > 0.5)[:, 0]


class MedSAMRecipe(Recipe):
    name = "medsam"
    input_size = 1024

    def preprocess(self, rgb: np.ndarray) -> tuple[torch.Tensor, Size]:
        from skimage import transform

        big = transform.resize(
            rgb, (self.input_size, self.input_size), order=3, preserve_range=True, anti_aliasing=True
        ).astype(np.uint8)
        norm = minmax01(big).astype(np.float32)
        return torch.from_numpy(norm).permute(2, 0, 1)[None].contiguous(), (self.input_size, self.input_size)

    def model_scale(self, original: Size) -> tuple[float, float]:
        """Stretched to a square: one factor per axis."""
        h, w = original
        return self.input_size / w, self.input_size / h

    def scale_boxes(self, boxes: np.ndarray, original: Size, resized: Size) -> torch.Tensor:
        h, w = original
        scale = np.array([w, h, w, h], np.float64)
        return torch.as_tensor(boxes / scale * self.input_size, dtype=torch.float32)

    def postprocess(
        self, logits: torch.Tensor, resized: Size, original: Size, region: Region | None = None
    ) -> torch.Tensor:
        prob = torch.sigmoid(logits)
        return (_upsample_region(prob, original, region) > 0.5)[:, 0]


class SAMRecipe(Recipe):
    """Vanilla SAM exactly as ``segment_anything.SamPredictor`` feeds it."""

    name = "sam"
    input_size = 1024
    pixel_mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    pixel_std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)

    def preprocess(self, rgb: np.ndarray) -> tuple[torch.Tensor, Size]:
        from segment_anything.utils.transforms import ResizeLongestSide

        resized = ResizeLongestSide(self.input_size).apply_image(rgb)
        nh, nw = resized.shape[:2]
        x = torch.from_numpy(resized).permute(2, 0, 1)[None].float()
        x = (x - self.pixel_mean) / self.pixel_std
        x = F.pad(x, (0, self.input_size - nw, 0, self.input_size - nh))
        return x.contiguous(), (nh, nw)

    def scale_boxes(self, boxes: np.ndarray, original: Size, resized: Size) -> torch.Tensor:
        h, w = original
        nh, nw = longest_side_shape(h, w, self.input_size)
        scale = np.array([nw / w, nh / h, nw / w, nh / h])
        return torch.as_tensor(boxes * scale, dtype=torch.float32)

    def postprocess(
        self, logits: torch.Tensor, resized: Size, original: Size, region: Region | None = None
    ) -> torch.Tensor:
        nh, nw = resized
        up = F.interpolate(logits, (self.input_size, self.input_size), mode="bilinear", align_corners=False)
        up = up[..., :nh, :nw]
        return (_upsample_region(up, original, region) > 0.0)[:, 0]
