"""Export a labeling session as MedSAM training data (npz) plus a CSV summary.

One ``.npz`` per annotated image, in the layout of the MedSAM / LiteMedSAM
training data (``npz/`` files of the CVPR 2024 challenge, ``pre_CT_MR.py``):

| key | content |
|---|---|
| ``imgs`` | uint8 as the model sees it (recorded intensity): 2D ``(H, W, 3)``, 3D ``(D, H, W)`` |
| ``gts`` | the labels, ``uint8`` (ids <= 255) or ``uint16``, same spatial shape |
| ``spacing`` | float64 pixel size, SimpleITK order ``(x, y[, z])``; ones without a spacing |

2D gray is repeated to 3 channels (alpha dropped); a volume uses the whole-volume
intensity rule. The spacing order is the one MedSAM's scripts store.

The CSV summary has one row per object (one row with no label for an image
without objects): its pixel/voxel count and its area in mm^2 (2D) or volume in
mm^3 (3D) from the spacing, or in pixels / voxels when the image has no spacing.
No Qt, no napari; every file is written atomically.
"""

from __future__ import annotations

import csv
import io as _stdio
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np

from napari_medsam.engine.errors import ImageError, MedSAMError
from napari_medsam.engine.intensity import model_input as _model_input
from napari_medsam.engine.io import atomic_write_bytes, atomic_write_text

from .inputs import DONE, IN_PROGRESS
from .records import compact_labels, label_stats
from .session import LabelingSession

PathLike = Union[str, "os.PathLike[str]"]
log = logging.getLogger(__name__)
EXPORT_DIR = "export"
SUMMARY_NAME = "summary.csv"
SUMMARY_FIELDS = [
    "image",
    "npz",
    "status",
    "kind",
    "shape",
    "spacing_xyz",
    "n_objects",
    "label",
    "pixels",
    "size",
    "unit",
]


@dataclass
class ExportResult:
    """What :func:`export_session` wrote."""

    out_dir: Path
    files: list[Path] = field(default_factory=list)
    summary_path: Path | None = None
    rows: list[dict[str, str]] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)


def model_input(array: np.ndarray, kind: str, modality: str = "auto", window: Any = None) -> np.ndarray:
    """The uint8 image the model sees: 2D ``(H, W, 3)``, volume ``(D, H, W)``.

    The engine's one image -> uint8 path (:func:`engine.intensity.model_input`): the
    intensity rule is resolved and applied on the whole image (whole volume for 3D).
    """
    return _model_input(array, kind, modality or "auto", window)


def gts_dtype(labels: np.ndarray) -> np.ndarray:
    """MedSAM's npz ``gts``: the one label dtype rule (:func:`engine.labels.compact_labels`) capped at uint16."""
    try:
        return compact_labels(labels, max_dtype=np.uint16)
    except ImageError as exc:
        raise ImageError(f"{exc} (MedSAM's npz format)") from None


def _size_unit(ndim: int, spacing: Any, spacing_unit: str | None) -> tuple[float, str]:
    """(physical size of one pixel/voxel, unit name): mm2 / mm3, else px / voxels."""
    unit = spacing_unit or "mm"
    if spacing is None or unit == "pixel":
        return 1.0, "px" if ndim == 2 else "voxels"
    return float(np.prod(spacing)), f"{unit}{ndim}"


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = _stdio.BytesIO()
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


def iter_saved(session: LabelingSession, statuses: Iterable[str] = (IN_PROGRESS, DONE)) -> Iterable[int]:
    """Indices of images with saved labels and one of ``statuses``."""
    wanted = set(statuses)
    for i, it in enumerate(session.items):
        if it.status in wanted and session.labels_path(i).exists():
            yield i


def export_session(
    session: LabelingSession,
    out_dir: PathLike | None = None,
    statuses: Sequence[str] = (DONE, IN_PROGRESS),
    indices: Iterable[int] | None = None,
) -> ExportResult:
    """Write ``<out_dir>/<name>.npz`` per image with saved labels, and ``summary.csv``.

    Args:
        session: the labeling session.
        out_dir: target folder (default ``<session output>/export``).
        statuses: export images with one of these statuses (skipped ones are left out by default).
        indices: export exactly these images instead (those with saved labels).

    Returns:
        (ExportResult): files written, CSV rows, and per-image errors (an image that
        cannot be read is reported and skipped, never fatal).
    """
    out = Path(out_dir) if out_dir is not None else session.output_dir / EXPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    result = ExportResult(out)
    if indices is None:
        todo = list(iter_saved(session, statuses))
    else:
        todo = [i for i in indices if session.labels_path(i).exists()]
    for i in todo:
        item = session.items[i]
        try:
            img = session.read(i)
            labels = session.load_labels(i)
            rec = session.load_record(i) or {}
            inten = rec.get("intensity") or {}
            kind = img.kind
            spatial = img.spatial_shape
            if labels is None or tuple(labels.shape) != tuple(spatial):
                raise ImageError(
                    f"saved labels {None if labels is None else labels.shape} do not match the image {spatial}"
                )
            imgs = model_input(img.array, kind, inten.get("modality", "auto"), inten.get("window"))
            gts = gts_dtype(labels)
            ndim = len(spatial)
            spacing = img.spacing
            sp_xyz = np.asarray(spacing[::-1] if spacing is not None else np.ones(ndim), dtype=np.float64)
            target = out / f"{item.stem}.npz"
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(target, _npz_bytes(imgs=imgs, gts=gts, spacing=sp_xyz))
            result.files.append(target)
        except Exception as exc:
            if not isinstance(exc, (MedSAMError, OSError)):
                log.warning("export of %s failed", item.name, exc_info=True)
            result.errors[item.name] = f"{type(exc).__name__}: {exc}"
            continue
        per, unit = _size_unit(ndim, spacing, img.meta.get("spacing_unit"))
        base = {
            "image": item.name,
            "npz": target.relative_to(out).as_posix(),
            "status": item.status,
            "kind": kind,
            "shape": "x".join(str(s) for s in spatial),
            "spacing_xyz": "" if spacing is None else ",".join(f"{s:g}" for s in sp_xyz),
        }
        stats = label_stats(gts)
        base["n_objects"] = str(len(stats))
        if not stats:
            result.rows.append({**base, "label": "", "pixels": "0", "size": "0", "unit": unit})
        for label, st in stats.items():
            result.rows.append(
                {
                    **base,
                    "label": str(label),
                    "pixels": str(st["pixels"]),
                    "size": f"{st['pixels'] * per:.6g}",
                    "unit": unit,
                }
            )
    buf = _stdio.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, lineterminator="\n")
    w.writeheader()
    w.writerows(result.rows)
    result.summary_path = atomic_write_text(out / SUMMARY_NAME, buf.getvalue())
    return result
