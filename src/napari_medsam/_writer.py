"""napari writers for label layers: NIfTI (keeping the source affine) and TIFF."""

from __future__ import annotations

import numpy as np

from .engine.io import ImageData, write_labels


def write_labels_layer(path: str, data, meta: dict):
    """Write a Labels layer; atomic (temporary file, then rename)."""
    meta = meta or {}
    source = meta.get("metadata", {}) or {}
    scale = meta.get("scale")
    like = ImageData(np.asarray(data), spacing=tuple(scale) if scale is not None else None, affine=source.get("affine"))
    return [str(write_labels(path, np.asarray(data), like=like))]
