"""Writing a 3D object into an integer label volume."""

from __future__ import annotations

import numpy as np

from napari_medsam.engine.errors import ImageError
from napari_medsam.engine.labels import apply_mask


# -- labels -------------------------------------------------------------------
def paste_object(labels: np.ndarray, mask3d: np.ndarray, label_id: int, overwrite: bool = False) -> np.ndarray:
    """Write ``mask3d`` into the integer label volume ``labels`` as ``label_id``, in place.

    Voxels already holding another object are left alone unless ``overwrite``;
    voxels of ``label_id`` outside the new mask are kept (call with a cleared
    object to replace it). Returns ``labels``. Raises ``ValueError`` when the id
    does not fit the label dtype (use uint16/uint32 for ids > 255).
    """
    if not isinstance(labels, np.ndarray):
        raise ImageError(f"labels must be an integer numpy array, got {type(labels).__name__}")
    mask3d = np.asarray(mask3d, dtype=bool)
    if mask3d.shape != labels.shape:
        raise ImageError(f"mask shape {mask3d.shape} differs from labels shape {labels.shape}")
    apply_mask(labels, None, mask3d, label_id, clear_id=False, overwrite=overwrite)  # the one writer of objects
    return labels
