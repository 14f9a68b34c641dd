"""The one-command demo: segment the bundled breast-ultrasound sample, write a mask and an overlay."""

from __future__ import annotations

import io as _stdio
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib.resources import as_file, files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image
from scipy import ndimage

from .cases import load_cases
from .errors import BatchError
from .io import atomic_write_bytes, read_image, write_labels
from .metrics import dice
from .predictor import MedSAM
from .segment import ImageSegmenter, load_model

PathLike = Union[str, "os.PathLike[str]"]
DEMO_IMAGE = "busi_malignant_1.png"


@dataclass
class DemoResult:
    mask_path: Path
    overlay_path: Path
    box: tuple[float, float, float, float]
    iou: float
    dice: float
    encode_s: float
    decode_s: float
    load_s: float
    model: str
    device: str
    checkpoint: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def overlay(
    image: np.ndarray,
    mask: np.ndarray,
    box: Sequence[float] | None = None,
    color: tuple[int, int, int] = (255, 64, 32),
    alpha: float = 0.35,
) -> np.ndarray:
    """(H, W, 3) uint8: ``image`` with ``mask`` tinted, its outline drawn and ``box`` in green."""
    img = np.asarray(image)
    if img.ndim == 3:
        img = img[..., :3]
    if img.dtype != np.uint8:
        f = img.astype(np.float64)
        img = ((f - f.min()) / max(f.max() - f.min(), 1e-8) * 255).astype(np.uint8)
    rgb = np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img.copy()
    m = np.asarray(mask, bool)
    out = rgb.astype(np.float64)
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(color, float)
    edge = m & ~ndimage.binary_erosion(m, border_value=0)
    edge = ndimage.binary_dilation(edge)
    out[edge] = (255, 220, 0)
    out = out.astype(np.uint8)
    if box is not None:
        h, w = m.shape
        x0, y0, x1, y1 = [round(float(v)) for v in box]
        x0, x1 = max(0, min(x0, w - 1)), max(0, min(x1, w - 1))
        y0, y1 = max(0, min(y0, h - 1)), max(0, min(y1, h - 1))
        green = (0, 230, 0)
        out[y0, x0 : x1 + 1] = green
        out[y1, x0 : x1 + 1] = green
        out[y0 : y1 + 1, x0] = green
        out[y0 : y1 + 1, x1] = green
    return out


def samples_dir() -> Traversable:
    """The bundled samples folder (a Traversable; a Path for normal installs)."""
    return files("napari_medsam") / "samples"


def run_demo(
    out_dir: PathLike = "medsam-demo",
    model: str | MedSAM = "litemedsam",
    device: str = "auto",
    checkpoint: str | None = None,
) -> DemoResult:
    """Segment the bundled breast-ultrasound sample with its box; write mask TIFF + overlay PNG."""
    out = Path(out_dir).expanduser()
    with as_file(samples_dir()) as sdir:
        cases = [c for c in load_cases(Path(sdir), dims=2) if c.image.name == DEMO_IMAGE]
        if not cases:
            raise BatchError(f"the bundled samples have no case for {DEMO_IMAGE}: reinstall napari-medsam")
        case = cases[0]
        image = read_image(case.image)
        gt = case.ground_truth()
    t0 = time.perf_counter()
    m = load_model(model, device, checkpoint)
    load_s = time.perf_counter() - t0
    seg = ImageSegmenter(m, image).segment(case.box, "auto")
    stem = Path(DEMO_IMAGE).stem
    mask_path = write_labels(out / f"{stem}_mask.tif", seg.mask.astype(np.uint8), like=image)
    buf = _stdio.BytesIO()
    Image.fromarray(overlay(image.array, seg.mask, case.box)).save(buf, format="PNG")
    overlay_path = atomic_write_bytes(out / f"{stem}_overlay.png", buf.getvalue())
    return DemoResult(
        mask_path,
        overlay_path,
        case.box,
        float(seg.iou or 0.0),
        dice(seg.mask, gt),
        float(seg.encode_s or 0.0),
        float(seg.decode_s or 0.0),
        load_s,
        m.name,
        str(m.device),
        m.checkpoint,
        {"case": case.case},
    )


__all__ = ["DEMO_IMAGE", "DemoResult", "overlay", "run_demo", "samples_dir"]
