"""The files of one image in a session's output folder: what saving needs to know, and reading labels back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from napari_medsam.engine.errors import ReadError
from napari_medsam.engine.io import NIFTI_SUFFIXES, ImageData, _suffix, read_image


@dataclass
class ImageInfo:
    """What saving needs to know about an image without keeping its pixels."""

    shape: tuple[int, ...]  # spatial shape (labels shape)
    kind: str
    spacing: tuple[float, ...] | None
    affine: np.ndarray | None
    meta: dict[str, Any]

    def like(self, path: str | None = None) -> ImageData:
        """An ImageData stand-in (zero-strided pixels) for :func:`write_labels`."""
        shape = self.shape + ((3,) if self.kind == "rgb" else ())
        return ImageData(
            np.broadcast_to(np.uint8(0), shape), self.spacing, self.affine, path, self.kind, dict(self.meta)
        )


def info_of(img: ImageData) -> ImageInfo:
    shape = img.array.shape[:2] if img.kind == "rgb" else img.array.shape
    aff = None if img.affine is None else np.array(img.affine, dtype=float)
    sp = None if img.spacing is None else tuple(float(s) for s in img.spacing)
    return ImageInfo(tuple(int(s) for s in shape), img.kind, sp, aff, dict(img.meta))


def read_labels_file(path: Path) -> np.ndarray:
    """The label map saved at ``path`` (TIFF or NIfTI); :class:`ReadError` when it cannot be read."""
    try:
        if _suffix(path) in NIFTI_SUFFIXES:
            return np.asarray(read_image(path).array)
        return np.asarray(tifffile.imread(path))
    except Exception as exc:
        raise ReadError(f"cannot read saved labels {path}: {exc}") from exc
