"""The files of one image in a session's output folder: the labels/record pair, written so a kill at
any instant leaves it in step or repairable, and the schema a record must meet to be used."""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tifffile

from napari_medsam.engine.cache import content_hash
from napari_medsam.engine.errors import ReadError, SessionError
from napari_medsam.engine.io import NIFTI_SUFFIXES, ImageData, _suffix, atomic_write_text, read_image, write_labels
from napari_medsam.engine.session.inputs import Status


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


# ---------------------------------------------------------------------------
# the labels / record pair
# ---------------------------------------------------------------------------
# A save writes, each atomically: the new record as ``<record>.pending``, then the
# labels, then the record, then removes ``.pending``. After a kill at any instant,
# :func:`settle_pair` finds either no pending record (the pair on disk is whole and
# in step) or a pending one whose ``labels_hash`` says whether the labels were
# already replaced: if so the pending record is the one that belongs to them and
# becomes the record, else it is dropped and the previous pair stands.
PENDING_SUFFIX = ".pending"
RECORD_FORMAT = "napari-medsam-record"
STATUS_WORDS = tuple(s.value for s in Status)
CORRUPT_MARK = ".corrupt-"


def pending_path(record_path: Path) -> Path:
    return record_path.with_name(record_path.name + PENDING_SUFFIX)


def labels_digest(labels: np.ndarray, shape: Any = None, dtype: Any = None) -> str:
    """The ``labels_hash`` of a label map as read back: reshaped to ``shape`` and cast to ``dtype`` first."""
    arr = np.asarray(labels)
    if shape is not None and tuple(arr.shape) != tuple(shape) and arr.size == int(np.prod(shape)):
        arr = arr.reshape(tuple(shape))
    if dtype is not None:
        with contextlib.suppress(TypeError):
            arr = arr.astype(np.dtype(dtype), copy=False)
    return content_hash(np.ascontiguousarray(arr))


def write_pair(
    labels_path: Path, labels: np.ndarray, like: ImageData, record_path: Path, record: dict[str, Any]
) -> None:
    """Write labels and record so that :func:`settle_pair` can put them in step after a kill at any instant."""
    try:
        text = json.dumps(record, indent=1)
    except (TypeError, ValueError) as exc:  # before any write: the pair on disk stays as it was
        raise SessionError(f"record {record_path.name} cannot be stored as JSON: {exc}") from None
    pending = pending_path(record_path)
    atomic_write_text(pending, text)
    write_labels(labels_path, labels, like=like)
    atomic_write_text(record_path, text)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(pending)


def settle_pair(labels_path: Path, record_path: Path) -> str | None:
    """Finish or undo a save a kill interrupted; returns what was done (None: nothing to do)."""
    pending = pending_path(record_path)
    if not pending.exists():
        return None
    try:
        rec = json.loads(pending.read_text(encoding="utf-8"))
        want = rec["labels_hash"]
        shape, dtype = rec.get("shape"), rec.get("labels_dtype")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        rec = None
    have = None
    if rec is not None and labels_path.exists():
        with contextlib.suppress(ReadError):
            have = labels_digest(read_labels_file(labels_path), shape, dtype)
    if rec is not None and have == want:
        os.replace(pending, record_path)  # the labels are the new ones: their record is the pending one
        return f"{record_path.name}: completed a save that was interrupted after its labels were written"
    os.unlink(pending)  # the labels were not replaced: the previous pair stands
    return f"{record_path.name}: dropped a save that was interrupted before its labels were written"


def set_aside(path: Path) -> Path:
    """Move an unusable file out of the way as ``<name>.corrupt-<UTC time>`` (never deleted)."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    target = path.with_name(f"{path.name}{CORRUPT_MARK}{stamp}")
    os.replace(path, target)
    return target


# ---------------------------------------------------------------------------
# record schema
# ---------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


#: who made a box: the user (``key``) or a 3D propagation (``propagated``; the viewer's steering)
BOX_KINDS = ("key", "propagated")


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _box_problem(i: int, b: Any) -> str | None:
    if not isinstance(b, dict):
        return f"boxes[{i}] is {type(b).__name__}, not an object"
    v = b.get("vertices")
    if not isinstance(v, list) or not v or not all(isinstance(p, list) for p in v):
        return f"boxes[{i}].vertices is not a list of points"
    n = len(v[0])
    if n < 2 or any(len(p) != n or not all(_is_num(c) for c in p) for p in v):
        return f"boxes[{i}].vertices holds points of unequal length or non-numbers"
    if not _is_int(b.get("label")) or b["label"] < 0:
        return f"boxes[{i}].label is not a label id (an integer >= 0)"
    if "type" in b and not isinstance(b["type"], str):
        return f"boxes[{i}].type is not a shape type name"
    if "kind" in b and b["kind"] not in BOX_KINDS:
        return f"boxes[{i}].kind is {b['kind']!r}, not one of {list(BOX_KINDS)}"
    if "order" in b and not _is_int(b["order"]):
        return f"boxes[{i}].order is not an integer"
    if b.get("slice") is not None and not _is_int(b["slice"]):
        return f"boxes[{i}].slice is not an integer or null"
    if "box" in b and not (isinstance(b["box"], list) and len(b["box"]) == 4 and all(map(_is_num, b["box"]))):
        return f"boxes[{i}].box is not four numbers"
    return None


def record_problem(
    rec: Any, record_format: str = RECORD_FORMAT, statuses: tuple[str, ...] = STATUS_WORDS
) -> str | None:
    """Why ``rec`` (parsed JSON) is not a usable record, or None when it is one."""
    if not isinstance(rec, dict):
        return f"it holds a JSON {type(rec).__name__}, not an object"
    if rec.get("format") != record_format:
        return f"its format is {rec.get('format')!r}, not {record_format!r}"
    if "status" in rec and rec["status"] not in statuses:
        return f"its status {rec['status']!r} is not one of {list(statuses)}"
    boxes = rec.get("boxes", [])
    if not isinstance(boxes, list):
        return f"its boxes are a {type(boxes).__name__}, not a list"
    for i, b in enumerate(boxes):
        problem = _box_problem(i, b)
        if problem:
            return problem
    shape = rec.get("shape")
    if shape is not None and not (isinstance(shape, list) and shape and all(_is_int(s) and s > 0 for s in shape)):
        return "its shape is not a list of positive integers"
    for key in ("labels_hash", "labels_dtype", "created", "modified", "image"):
        if rec.get(key) is not None and not isinstance(rec[key], str):
            return f"its {key} is not a string"
    for key in ("intensity", "model"):
        if rec.get(key) is not None and not isinstance(rec[key], dict):
            return f"its {key} is not an object"
    inten = rec.get("intensity") or {}
    if inten.get("modality") is not None and not isinstance(inten["modality"], str):
        return "its intensity.modality is not a string"
    win = inten.get("window")
    if win is not None and not (isinstance(win, list) and len(win) == 2 and all(map(_is_num, win))):
        return "its intensity.window is not [level, width]"
    if "version" in rec and not _is_int(rec["version"]):
        return "its version is not an integer"
    return None


def read_json(path: Path, session_format: str | None = None) -> tuple[Any, str | None]:
    """(parsed JSON, None) or (None, why it is not JSON); OSError when the file cannot be read at all.

    With ``session_format``, also why it is not a session file of that format.
    """
    data = path.read_bytes()
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return None, f"it is not JSON ({exc})"
    if session_format is not None and not isinstance(obj, dict):
        return None, f"it holds a JSON {type(obj).__name__}, not an object"
    if session_format is not None and obj.get("format") != session_format:
        return None, "it is not a napari-medsam session file"
    return obj, None


def clean_temp_files(output_dir: Path, subfolders: tuple[str, ...]) -> None:
    """Remove temp files a killed writer left behind (never a real output) in ``output_dir`` and ``subfolders``."""
    labels_dir, records_dir = subfolders[0], subfolders[1]
    for folder in (output_dir, *(output_dir / f for f in subfolders)):
        if not folder.is_dir():
            continue
        pattern = "**/.*.tmp*" if folder.name in (labels_dir, records_dir) else ".*.tmp*"
        for p in folder.glob(pattern):
            if p.is_file() and (".tmp-" in p.name or p.name.endswith(".tmp")):
                with contextlib.suppress(OSError):
                    p.unlink()
