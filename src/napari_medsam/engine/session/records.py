"""Annotation records: box prompts <-> JSON, per-object summaries, and what a record says about its model.

No Qt, no napari.
"""

from __future__ import annotations

import datetime as _dt
import os
import threading
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Union

import numpy as np

from napari_medsam.engine.cache import content_hash
from napari_medsam.engine.errors import SessionError
from napari_medsam.engine.intensity import parse_window
from napari_medsam.engine.labels import box_from_vertices, label_stats, vertices_from_box  # their one home
from napari_medsam.engine.labels import compact_labels as compact_labels  # re-exported (session uses it)
from napari_medsam.engine.models import checkpoints
from napari_medsam.engine.session.inputs import SessionItem, Status
from napari_medsam.engine.session.store import BOX_KINDS, RECORD_FORMAT, ImageInfo, _box_problem

PathLike = Union[str, "os.PathLike[str]"]
SESSION_FORMAT = "napari-medsam-session"
FORMAT_VERSION = 1


def now_iso() -> str:
    """Local time with its UTC offset, e.g. ``2024-05-01T14:03:22.123+02:00``."""
    return _dt.datetime.now().astimezone().isoformat(timespec="milliseconds")


def package_version() -> str:
    """The installed napari-medsam version (from the package metadata; never imports the package)."""
    try:
        return version("napari-medsam")
    except PackageNotFoundError:  # pragma: no cover - engine used from a source tree
        return "unknown"


# ---------------------------------------------------------------------------
# checkpoint digest, computed once per file
# ---------------------------------------------------------------------------
_SHA_CACHE: dict[tuple[str, int, int], str] = {}
_SHA_LOCK = threading.Lock()


def checkpoint_sha256(path: PathLike | None) -> str | None:
    """sha256 of a checkpoint file, cached per (path, size, mtime); None without a file."""
    if not path:
        return None
    p = Path(path).expanduser().resolve()
    try:
        st = p.stat()
    except OSError:
        return None
    key = (str(p), st.st_size, st.st_mtime_ns)
    with _SHA_LOCK:
        if key in _SHA_CACHE:
            return _SHA_CACHE[key]
    digest = checkpoints.digest_of(p, "sha256")
    with _SHA_LOCK:
        _SHA_CACHE[key] = digest
    return digest


# ---------------------------------------------------------------------------
# boxes <-> records
# ---------------------------------------------------------------------------
def record_input(record: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``LabelingSession.save``'s ``record`` -> (its other keys, its boxes), checked before anything is written.

    Raises :class:`SessionError` unless ``record`` is None or a dict whose ``boxes`` (if
    any) meet the schema resume reads records with (``store.record_problem``), so every
    saved box can be read back.
    """
    if record is None:
        return {}, []
    if not isinstance(record, Mapping):
        raise SessionError(f"record must be a dict (boxes, model, intensity...), got a {type(record).__name__}")
    rec = dict(record)
    boxes = rec.pop("boxes", None)
    boxes = [] if boxes is None else boxes
    if not isinstance(boxes, list | tuple):
        raise SessionError(f"record boxes must be a list of boxes (see boxes_from_layer), got a {type(boxes).__name__}")
    out = [dict(b) if isinstance(b, Mapping) else b for b in boxes]
    for i, b in enumerate(out):
        if problem := _box_problem(i, b):
            raise SessionError(f"record boxes cannot be saved: {problem}")
    return rec, out


def boxes_from_layer(
    data: Sequence, shape_types: Sequence[str], label_ids: Sequence[int], kinds: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """A box layer's state (vertex arrays, shape types, label ids[, kinds]) -> JSON-ready box prompts.

    Each prompt keeps the exact vertices, so :func:`layer_from_boxes` gives the
    same layer state back bit for bit (float64 survives JSON exactly). ``kinds``
    (:data:`BOX_KINDS`, one per box): saved as each prompt's ``kind`` (:func:`box_kinds_of`).
    """
    out = []
    for order, (verts, kind, label) in enumerate(zip(data, shape_types, label_ids, strict=False)):
        drawn = box_from_vertices(verts)
        z, box = drawn.slice, list(drawn.box)
        rec = {
            "order": order,
            "label": int(label),
            "type": str(kind),
            "slice": z,
            "box": box,
            "vertices": np.asarray(verts, dtype=float).tolist(),
        }
        if kinds is not None and order < len(kinds):
            rec["kind"] = str(kinds[order])
        out.append(rec)
    return out


def box_kinds_of(boxes: Sequence[dict[str, Any]]) -> list[str]:
    """Each saved box's kind in :func:`layer_from_boxes`'s order (``key`` where none was saved)."""
    kinds = [b.get("kind", "key") for b in sorted(boxes, key=lambda b: b.get("order", 0))]
    return [k if k in BOX_KINDS else "key" for k in kinds]


def layer_from_boxes(boxes: Sequence[dict[str, Any]]) -> tuple[list[np.ndarray], list[str], np.ndarray]:
    """Inverse of :func:`boxes_from_layer`: (vertex arrays, shape types, label ids) in layer order."""
    boxes = sorted(boxes, key=lambda b: b.get("order", 0))
    data = [np.asarray(b["vertices"], dtype=float) for b in boxes]
    types = [b.get("type", "rectangle") for b in boxes]
    labels = np.array([int(b.get("label", 0)) for b in boxes], dtype=np.int64)
    return data, types, labels


def _json_window(window: Any) -> list[float] | None:
    if window is None:
        return None
    if isinstance(window, str):
        window = parse_window(window)
    return [float(v) for v in window]


def _model_info(model: Any) -> dict[str, Any]:
    """A MedSAM object or a dict with ``name`` / ``checkpoint`` -> the record's model entry."""
    if model is None:
        return {"name": None, "checkpoint": None, "checkpoint_sha256": None}
    if isinstance(model, dict):
        name, ckpt, sha = model.get("name"), model.get("checkpoint"), model.get("checkpoint_sha256")
    else:
        name, ckpt, sha = getattr(model, "name", None), getattr(model, "checkpoint", None), None
    ckpt = str(ckpt) if ckpt else None
    return {"name": name, "checkpoint": ckpt, "checkpoint_sha256": sha or checkpoint_sha256(ckpt)}


def build_objects(labels: np.ndarray, boxes: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per object (label id in the labels or on a box): prompts, size, extent, propagation."""
    stats = label_stats(labels)
    ids = sorted(set(stats) | {b["label"] for b in boxes if b["label"] > 0})
    volume = np.ndim(labels) == 3
    objects = []
    for i in ids:
        prompts = [{k: b.get(k) for k in ("order", "type", "slice", "box")} for b in boxes if b["label"] == i]
        st = stats.get(i)
        obj: dict[str, Any] = {
            "label": i,
            "prompts": prompts,
            "pixels": st["pixels"] if st else 0,
            "bbox": st["bbox"] if st else None,
        }
        obj["propagation"] = None
        if volume and st:
            first, last = st["bbox"][0][0], st["bbox"][0][1] - 1
            prompt_slices = {p["slice"] for p in prompts if p["slice"] is not None}
            if first != last or (prompt_slices and prompt_slices != {first}):
                obj["propagation"] = {"first_slice": first, "last_slice": last, "from_slices": sorted(prompt_slices)}
        objects.append(obj)
    return objects


def build_record(
    item: SessionItem,
    info: ImageInfo,
    labels: np.ndarray,
    boxes: list[dict[str, Any]],
    extra: dict[str, Any],
    old: dict[str, Any] | None,
    status: Status,
) -> dict[str, Any]:
    """The record saved next to ``labels``; ``extra`` is what the caller passed (model, intensity, own keys).

    A record without model / intensity keeps what the previous version (``old``) said.
    """
    rec_in = dict(extra)
    old_rec = old or {}
    intensity = dict(rec_in.pop("intensity", None) or old_rec.get("intensity") or {"modality": "auto", "window": None})
    intensity["window"] = _json_window(intensity.get("window"))
    model = _model_info(rec_in.pop("model", None) or old_rec.get("model"))
    for key in ("objects", "format", "format_version", "image", "labels", "status", "created", "modified"):
        rec_in.pop(key, None)
    return {
        "format": RECORD_FORMAT,
        "format_version": FORMAT_VERSION,
        "image": item.name,
        "image_path": str(item.path),
        "labels": item.labels_name,
        "kind": info.kind,
        "shape": list(info.shape),
        "spacing": None if info.spacing is None else list(info.spacing),
        "status": status,
        "objects": build_objects(labels, boxes),
        "boxes": boxes,
        "model": model,
        "intensity": intensity,
        "labels_dtype": str(labels.dtype),
        "labels_hash": content_hash(labels),
        "napari_medsam_version": package_version(),
        "created": old_rec.get("created") or now_iso(),
        "modified": now_iso(),
        **rec_in,
    }


def _box_of_object(labels: np.ndarray, label: int, bbox: list[list[int]]) -> list[list[float]]:
    """Rectangle vertices around object ``label`` (3D: on its middle slice), as a box layer holds them."""
    if labels.ndim == 3:
        z = (bbox[0][0] + bbox[0][1] - 1) // 2
        rows, cols = np.nonzero(labels[z] == label)
        plane: tuple[int, ...] = (z,)
        (r0, r1), (c0, c1) = (int(rows.min()), int(rows.max())), (int(cols.min()), int(cols.max()))
    else:
        plane = ()
        (r0, r1), (c0, c1) = (bbox[0][0], bbox[0][1] - 1), (bbox[1][0], bbox[1][1] - 1)
    return vertices_from_box((c0, r0, c1, r1), plane)


def rebuild_from_labels(rec: dict[str, Any], labels: np.ndarray) -> tuple[int, int]:
    """Make ``rec`` describe ``labels`` (the labels win): objects, hash and dtype from them.

    Boxes whose label id is not in the labels are kept with ``"unmatched": true``; an
    object without a box gets one around it, marked ``"recovered": true``. Returns
    (boxes flagged, boxes recovered).
    """
    stats = label_stats(labels)
    boxes = [{**b, "unmatched": True} if b["label"] not in stats else b for b in rec.get("boxes", [])]
    have = {b["label"] for b in boxes}
    recovered = []
    for i, st in stats.items():
        if i not in have:
            verts = _box_of_object(labels, i, st["bbox"])
            drawn = box_from_vertices(verts)
            z, box = drawn.slice, list(drawn.box)
            recovered.append({"label": i, "type": "rectangle", "slice": z, "box": box, "vertices": verts})
    boxes += recovered
    for order, b in enumerate(boxes):
        b["order"] = order
    rec.update(
        boxes=boxes,
        objects=build_objects(labels, boxes),
        labels_hash=content_hash(labels),
        labels_dtype=str(labels.dtype),
        repaired=now_iso(),
    )
    for b in recovered:
        b["recovered"] = True
    return sum(bool(b.get("unmatched")) for b in boxes), len(recovered)
