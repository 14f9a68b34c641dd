"""Label maps: boxes <-> drawn rectangles, writing one object, undo patches, dtypes, statistics.

Pure numpy (scipy for :func:`label_stats`); no Qt, no napari. The plugin's
annotator, the labeling session, export and 3D propagation all go through here.

**Label dtype rule** (:func:`compact_labels`, used by every writer): label ids
are non-negative integers, 0 is background. A label map is stored in the
smallest *unsigned* type holding its largest id: uint8, uint16, uint32, then
uint64. Booleans become uint8. Negative ids and non-integer arrays raise
:class:`ImageError`. A format with a narrower limit passes ``max_dtype``
(MedSAM's npz export: ``np.uint16``); ids above it raise :class:`ImageError`
instead of wrapping around. Before this module, the TIFF/NIfTI writer kept
int16/int32 and only shrank 64-bit maps, the session shrank to unsigned types,
and the export capped at uint16: the same labels were stored three ways.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from .errors import ImageError
from .types import Box, Region

LABEL_DTYPES = (np.uint8, np.uint16, np.uint32, np.uint64)
#: above this id, :func:`label_stats` renumbers ids densely first (bincount would allocate per id).
SPARSE_ID_THRESHOLD = 1_000_000
#: vertex coordinates are rounded to this many decimals: float32 vertices (293.99988) are the pixel drawn (294).
VERTEX_DECIMALS = 3


class BoxOnPlane(NamedTuple):
    """A rectangle from a Shapes layer: the plane it lies on and its (x0, y0, x1, y1) box.

    Attributes:
        plane: the leading (non-displayed) indices, ``()`` for a 2D image, ``(z,)`` for a volume.
        box: (x0, y0, x1, y1) in image pixels, x = column, y = row.
    """

    plane: tuple[int, ...]
    box: Box

    @property
    def slice(self) -> int | None:
        """The last leading index (the slice of a volume), or None for a 2D image."""
        return self.plane[-1] if self.plane else None


def box_from_vertices(vertices: Any) -> BoxOnPlane:
    """Rectangle vertices in data coordinates ``(..., row, col)`` -> :class:`BoxOnPlane`.

    The leading coordinates (of the first vertex) are rounded to integer plane
    indices; the box is the min/max of the last two coordinates, rounded to
    :data:`VERTEX_DECIMALS` decimals. Unpacks as ``plane, box = ...``.
    """
    v = np.asarray(vertices, dtype=float)
    if v.ndim != 2 or v.shape[0] < 1 or v.shape[1] < 2:
        raise ImageError(f"rectangle vertices must be an (N, >=2) array, got shape {v.shape}")
    plane = tuple(round(float(c)) for c in v[0, :-2])
    v = np.round(v, VERTEX_DECIMALS)
    rows, cols = v[:, -2], v[:, -1]
    return BoxOnPlane(plane, (float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())))


def vertices_from_box(box: Any, plane: Any = ()) -> list[list[float]]:
    """(x0, y0, x1, y1) -> the rectangle's four vertices ``[*plane, row, col]``, as a Shapes layer holds them.

    Corners in napari's order: (y0, x0), (y0, x1), (y1, x1), (y1, x0), each prefixed by
    the ``plane`` indices (``()`` for a 2D image, ``(z,)`` on a volume's slice).
    :func:`box_from_vertices` gives back ``(plane, box)``.
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    lead = [float(i) for i in plane]
    return [[*lead, r, c] for r, c in ((y0, x0), (y0, x1), (y1, x1), (y1, x0))]


def bounding_region(mask: np.ndarray, leading: tuple[int, ...] = ()) -> Region | None:
    """Smallest slice tuple covering ``mask`` (prefixed by fixed ``leading`` indices), or None when empty."""
    if not mask.any():
        return None
    region = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        region.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(slice(i, i + 1) for i in leading) + tuple(region)


@dataclass
class LabelPatch:
    """The values of a rectangular region of a label array before and after an edit."""

    region: Region
    before: np.ndarray
    after: np.ndarray

    def undo(self, labels: np.ndarray) -> None:
        labels[self.region] = self.before

    def redo(self, labels: np.ndarray) -> None:
        labels[self.region] = self.after


def check_label_id(labels: np.ndarray, label_id: Any) -> int:
    """``label_id`` as an int that ``labels``' dtype can hold (1..max), else :class:`ImageError`."""
    dtype = getattr(labels, "dtype", None)
    if dtype is None or not np.issubdtype(dtype, np.integer):
        raise ImageError(f"labels must be an integer array, got {dtype or type(labels).__name__}")
    if isinstance(label_id, (bool, np.bool_)) or not isinstance(label_id, (int, np.integer)):
        raise ImageError(f"label id must be an integer, got {label_id!r}")
    label_id = int(label_id)
    info = np.iinfo(dtype)
    if label_id <= 0 or label_id > info.max:
        raise ImageError(
            f"label id {label_id} does not fit a {dtype} label map (1..{info.max}): "
            "use a wider type such as uint16 or uint32"
        )
    return label_id


def apply_mask(
    labels: np.ndarray,
    region: Region | None,
    new: np.ndarray,
    label_id: int,
    clear_id: bool = True,
    overwrite: bool = False,
) -> LabelPatch:
    """Write ``label_id`` where ``new`` is set inside ``region``, in place; return the patch for undo.

    Args:
        labels: the integer label array, edited in place.
        region: where ``new`` lies (``labels[region]`` has ``new``'s size); None = the whole array.
        new: bool mask of the object within the region.
        label_id: id to write (must fit ``labels``' dtype).
        clear_id: first clear pixels of ``label_id`` inside the region (re-segmentation).
        overwrite: paint over other objects; by default they are kept.
    """
    label_id = check_label_id(labels, label_id)
    if region is None:
        region = tuple(slice(None) for _ in range(labels.ndim))
    view = labels[region]
    new = np.asarray(new, dtype=bool)
    if new.size != view.size:
        raise ImageError(f"mask of shape {new.shape} does not fill the region of shape {view.shape}")
    before = view.copy()
    after = before.copy()
    if clear_id:
        after[after == label_id] = 0
    paint = new.reshape(after.shape)
    if not overwrite:
        paint = paint & (after == 0)
    after[paint] = label_id
    labels[region] = after
    return LabelPatch(region, before, after)


def compact_labels(labels: Any, max_dtype: type | None = None) -> np.ndarray:
    """The label map in the smallest unsigned dtype holding its ids (see the module docstring).

    Arguments:
      labels (array): bool or integer ids >= 0.
      max_dtype (numpy unsigned type or None): the widest type the target format holds.

    Returns:
      (np.ndarray): ``labels`` itself when already of the chosen dtype, else a converted copy.

    Raises:
      ImageError: non-integer labels, negative ids, or ids above ``max_dtype``.
    """
    lab = np.asarray(labels)
    if lab.dtype == bool:
        return lab.astype(np.uint8)
    if not np.issubdtype(lab.dtype, np.integer):
        raise ImageError(f"labels must be integers, got dtype {lab.dtype}")
    lo, hi = (int(lab.min()), int(lab.max())) if lab.size else (0, 0)
    if lo < 0:
        raise ImageError(f"label ids must not be negative (0 is background), got minimum {lo}")
    allowed: tuple[type[np.unsignedinteger], ...] = LABEL_DTYPES
    if max_dtype is not None:
        limit = np.iinfo(max_dtype).max
        allowed = tuple(dt for dt in LABEL_DTYPES if np.iinfo(dt).max <= limit)
    for dt in allowed:
        if hi <= np.iinfo(dt).max:
            return lab if lab.dtype == dt else lab.astype(dt)
    raise ImageError(f"label ids up to {hi} do not fit {np.dtype(allowed[-1]).name}, the widest this format holds")


def label_stats(labels: np.ndarray) -> dict[int, dict[str, Any]]:
    """Per label id > 0: pixel/voxel count and bounding box (``[[start, stop), ...]`` per axis)."""
    from scipy import ndimage

    lab = np.asarray(labels)
    if lab.size == 0 or int(lab.max()) <= 0:
        return {}
    ids = np.unique(lab)
    ids = ids[ids > 0]
    if int(ids[-1]) > SPARSE_ID_THRESHOLD:  # huge sparse ids: number them 1..n first
        dense = np.searchsorted(ids, lab).astype(np.int64) + 1
        dense[lab <= 0] = 0
        lab, keys = dense, np.arange(1, len(ids) + 1)
    else:
        lab, keys = (lab if lab.dtype.itemsize <= 4 else lab.astype(np.int64)), ids
    if int(lab.min()) < 0:  # negative ids are not objects
        lab = np.where(lab < 0, 0, lab)
    counts = np.bincount(lab.ravel())
    slices = ndimage.find_objects(lab)
    return {
        int(i): {"pixels": int(counts[k]), "bbox": [[int(s.start), int(s.stop)] for s in slices[int(k) - 1]]}
        for i, k in zip(ids, keys, strict=True)
    }


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Inclusive (x0, y0, x1, y1) bounds of a 2D mask, or None when empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


__all__ = [
    "LABEL_DTYPES",
    "BoxOnPlane",
    "LabelPatch",
    "apply_mask",
    "bounding_region",
    "box_from_vertices",
    "check_label_id",
    "compact_labels",
    "label_stats",
    "mask_box",
    "vertices_from_box",
]
