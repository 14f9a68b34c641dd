"""Metrics (Dice, NSD) and the box-prompted case list format (``cases.csv``).

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
from typing import List, Optional, Sequence, Tuple

import numpy as np


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two masks; 1.0 when both are empty."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def _surface(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def nsd(a: np.ndarray, b: np.ndarray, tolerance: float = 2.0, spacing: Optional[Sequence[float]] = None) -> float:
    """Normalised surface Dice at ``tolerance`` (in units of ``spacing``, default pixels)."""
    from scipy import ndimage

    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if not a.any() and not b.any():
        return 1.0
    if not a.any() or not b.any():
        return 0.0
    sa, sb = _surface(a), _surface(b)
    da = ndimage.distance_transform_edt(~sa, sampling=spacing)
    db = ndimage.distance_transform_edt(~sb, sampling=spacing)
    close = (db[sa] <= tolerance).sum() + (da[sb] <= tolerance).sum()
    return float(close / (sa.sum() + sb.sum()))


def safe_name(case: str) -> str:
    """Case id -> file-name-safe stem (every char outside [A-Za-z0-9_.-] becomes _)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", case)


def parse_box(text: str) -> Tuple[float, float, float, float]:
    vals = [float(v) for v in str(text).replace(" ", "").split(",")]
    if len(vals) != 4:
        raise ValueError(f"a box is 'x0,y0,x1,y1', got {text!r}")
    return tuple(vals)


@dataclass
class Case:
    """One box-prompted task of a cases file."""

    case: str
    modality: str
    dims: int
    image: Path
    mask: Path
    select: str
    box: Tuple[float, float, float, float]
    key_slice: Optional[int]
    z_range: Optional[Tuple[int, int]]

    @property
    def name(self) -> str:
        return safe_name(self.case)

    def ground_truth(self) -> np.ndarray:
        """The selected object of the mask file as a bool array (same axes as the image)."""
        from .io import read_image

        m = read_image(self.mask).array
        if m.ndim == 3 and self.dims == 2:
            m = m[..., 0]
        kind, _, val = self.select.partition(":")
        if kind == "value":
            return m == int(val)
        if kind == "component":
            from scipy import ndimage

            lab, _ = ndimage.label(m > 0)
            return lab == int(val)
        return m > 0

    def short_side_at(self, input_size: int, image_shape: Tuple[int, ...]) -> float:
        """Short side of the box in pixels at a longest-side-``input_size`` model input."""
        x0, y0, x1, y1 = self.box
        h, w = image_shape[-2:] if self.dims == 3 else image_shape[:2]
        return min(x1 - x0, y1 - y0) * input_size / max(h, w)


def load_cases(root: Path, dims: Optional[int] = None, cases_file: str = "cases.csv") -> List[Case]:
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
                    r["case"], r["modality"], d, root / r["image"], root / r["mask"], r["select"],
                    parse_box(r["box"]), int(r["key_slice"]) if r.get("key_slice") else None, zr,
                )
            )
    return out
