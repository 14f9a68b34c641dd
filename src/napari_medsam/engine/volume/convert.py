"""A whole volume to 8-bit at once, as the authors do before propagating."""

from __future__ import annotations

import numpy as np

from napari_medsam.engine.intensity import Intensity, WindowLike, convert


# -- input checks -------------------------------------------------------------
# check_volume, the slice-index and box checks live in engine/validate.py.
def volume_to_uint8(
    volume: np.ndarray, modality: str = "auto", window: WindowLike = None
) -> tuple[np.ndarray, Intensity, bool]:
    """Validate and convert a whole volume to 8-bit at once (volume-wide percentiles).

    Returns ((D, H, W) or (D, H, W, 3) uint8, the rule applied, is_rgb); see
    :func:`engine.intensity.convert`.
    """
    r = convert(volume, "volume", modality, window)
    return r.pixels, r.intensity, r.rgb
