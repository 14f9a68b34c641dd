"""Where the tests find real data: the shared test data (optional) and the bundled samples."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import numpy as np

SHARED = Path(os.environ.get("MEDSAM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SAMPLES = Path(str(files("napari_medsam") / "samples"))


def require_shared() -> Path:
    """The shared data folder, or skip the test saying where it was looked for."""
    if not (SHARED / "cases.csv").is_file():
        pytest.skip(f"shared test data not found at {SHARED} (set MEDSAM_SHARED_DATA to its folder)")
    return SHARED


def read_gray(path) -> np.ndarray:
    """A sample image as one 2D plane (its first channel if it was stored as RGB)."""
    from napari_medsam.engine.io import read_image

    img = read_image(path).array
    return img[..., 0] if img.ndim == 3 else img
