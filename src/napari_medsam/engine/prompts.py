"""Old home of image and box validation; kept so ``engine.prompts`` imports keep working.

Everything moved to :mod:`napari_medsam.engine.validate`.
"""

from __future__ import annotations

from .validate import MIN_SIDE, check_image, normalize_boxes

__all__ = ["MIN_SIDE", "check_image", "normalize_boxes"]
