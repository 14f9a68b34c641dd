"""Box-prompted cases (``cases.csv``) and ground-truth masks with an object picked out of them.

A cases file has one task per row: ``case, modality, dims, image, mask, select,
box, key_slice, z_range`` with paths relative to its folder (see the data README
of the project's test data). ``select`` picks the object in the mask file:
``nonzero``, ``value:N`` or ``component:N`` (N-th connected component as
``scipy.ndimage.label`` numbers them).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from .errors import ImageError, ReadError
from .io import read_image
from .validate import parse_box as _parse_box

Box = tuple[float, float, float, float]


def safe_name(case: str) -> str:
    """Case id -> file-name-safe stem (every char outside [A-Za-z0-9_.-] becomes _)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", case)


def parse_box(text: str) -> Box:
    """``"x0,y0,x1,y1"`` of a cases file -> four floats; :class:`BoxError` (a ValueError) otherwise.

    The one box-text parser, :func:`engine.validate.parse_box`.
    """
    return _parse_box(text)


def select_object(mask: np.ndarray, select: str = "nonzero") -> np.ndarray:
    """The object ``select`` names in a label/mask array: ``nonzero``, ``value:N`` or ``component:N``."""
    kind, _, val = (select or "nonzero").partition(":")
    try:
        if kind == "value":
            return np.asarray(mask == int(val))
        if kind == "component":
            lab, _ = ndimage.label(mask > 0)
            return np.asarray(lab == int(val))
        if kind == "nonzero":
            return np.asarray(mask > 0)
    except ValueError:
        pass
    raise ImageError(f"gt_select must be nonzero, value:N or component:N, got {select!r}")


def load_ground_truth(
    spec: str, base: Path | None, select: str = "nonzero", like_shape: tuple[int, ...] | None = None
) -> tuple[np.ndarray, tuple | None]:
    """Read a ground-truth mask (``file`` or ``file.npz:key``) and pick ``select``; returns (bool mask, spacing)."""
    text, key = spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and head.lower().endswith(".npz"):
        text, key = head, tail
    path = Path(text.strip()).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    spacing = None
    if path.name.lower().endswith(".npz"):
        if not path.is_file():
            raise ReadError(f"ground truth {path} does not exist")
        try:
            with np.load(path) as z:
                k = key or ("segs" if "segs" in z.files else z.files[0])
                m = np.asarray(z[k])
        except Exception as exc:
            raise ReadError(f"cannot read ground truth {path}: {exc}") from exc
    else:
        gt = read_image(path)
        m, spacing = gt.array, gt.spacing
    if like_shape is not None and m.ndim == 3 and len(like_shape) == 2 and m.shape[:2] == tuple(like_shape):
        m = m[..., 0]
    out = select_object(m, select)
    if like_shape is not None and out.shape != tuple(like_shape):
        raise ImageError(f"ground truth {path} has shape {out.shape}, the image {tuple(like_shape)}")
    return out, spacing


@dataclass
class Case:
    """One box-prompted task of a cases file."""

    case: str
    modality: str
    dims: int
    image: Path
    mask: Path
    select: str
    box: Box
    key_slice: int | None
    z_range: tuple[int, int] | None

    @property
    def name(self) -> str:
        return safe_name(self.case)

    def ground_truth(self) -> np.ndarray:
        """The selected object of the mask file as a bool array (same axes as the image)."""
        m = read_image(self.mask).array
        if m.ndim == 3 and self.dims == 2:
            m = m[..., 0]
        kind = self.select.partition(":")[0]
        return select_object(m, self.select if kind in ("value", "component") else "nonzero")

    def short_side_at(self, input_size: int, image_shape: tuple[int, ...]) -> float:
        """Short side of the box in pixels at a longest-side-``input_size`` model input."""
        x0, y0, x1, y1 = self.box
        h, w = image_shape[-2:] if self.dims == 3 else image_shape[:2]
        return min(x1 - x0, y1 - y0) * input_size / max(h, w)


def load_cases(root: Path, dims: int | None = None, cases_file: str = "cases.csv") -> list[Case]:
    """Read ``root/cases_file``; optionally only 2D or 3D rows."""
    root = Path(root)
    out = []
    with open(root / cases_file, newline="") as f:
        for r in csv.DictReader(f):
            d = int(r["dims"])
            if dims is not None and d != dims:
                continue
            zr = tuple(int(v) for v in r["z_range"].split(",")) if r.get("z_range") else None
            out.append(
                Case(
                    r["case"],
                    r["modality"],
                    d,
                    root / r["image"],
                    root / r["mask"],
                    r["select"],
                    parse_box(r["box"]),
                    int(r["key_slice"]) if r.get("key_slice") else None,
                    (zr[0], zr[1]) if zr else None,
                )
            )
    return out


__all__ = ["Case", "load_cases", "load_ground_truth", "parse_box", "safe_name", "select_object"]
