"""Labeling sessions: work through a folder of images, save labels and records as you go.

A :class:`LabelingSession` lists the images of an input folder (or list file),
keeps a status per image (not started / in progress / done / skipped) and the
current position, and writes everything into one output folder::

    OUT/session.json             position, statuses, input
    OUT/labels/<name>.tif        labels (TIFF; NIfTI inputs: <name>.nii.gz with their affine)
    OUT/records/<name>.json      one annotation record per image (prompts, model, intensity...)
    OUT/.embeddings/             on-disk embedding cache of the session (size-capped)

``<name>`` mirrors the image's path relative to the input folder, without its
suffix (``scans/a.png`` -> ``labels/scans/a.tif``). Every file is written
atomically (temp file in the same folder, fsync, ``os.replace``): a crash or a
kill leaves either the previous or the new complete version, never a torn one.
Stray temp files of a killed process are removed when the session is opened
again. Opening an existing output folder resumes the session.

No Qt, no napari: usable from scripts and tests.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import ImageError, MedSAMError, ReadError
from .io import DICOM_SUFFIXES, NIFTI_SUFFIXES, PIL_SUFFIXES, TIFF_SUFFIXES, ImageData, _suffix, atomic_write_text, read_image, write_labels

PathLike = Union[str, "os.PathLike[str]"]
log = logging.getLogger(__name__)

NOT_STARTED, IN_PROGRESS, DONE, SKIPPED = "not started", "in progress", "done", "skipped"
STATUSES = (NOT_STARTED, IN_PROGRESS, DONE, SKIPPED)
SESSION_FILE = "session.json"
LABELS_DIR, RECORDS_DIR, CACHE_DIR = "labels", "records", ".embeddings"
SESSION_FORMAT, RECORD_FORMAT = "napari-medsam-session", "napari-medsam-record"
FORMAT_VERSION = 1
IMAGE_SUFFIXES = PIL_SUFFIXES + TIFF_SUFFIXES + NIFTI_SUFFIXES + DICOM_SUFFIXES
DEFAULT_CACHE_BYTES = 2 << 30


class SessionError(MedSAMError, ValueError):
    """The session cannot be opened or used as asked (bad input, index, status...)."""


def now_iso() -> str:
    """Local time with its UTC offset, e.g. ``2024-05-01T14:03:22.123+02:00``."""
    return _dt.datetime.now().astimezone().isoformat(timespec="milliseconds")


def package_version() -> str:
    try:
        from .. import __version__

        return str(__version__)
    except Exception:  # pragma: no cover - engine used without the package
        return "unknown"


# ---------------------------------------------------------------------------
# checkpoint digest, computed once per file
# ---------------------------------------------------------------------------
_SHA_CACHE: Dict[Tuple[str, int, int], str] = {}
_SHA_LOCK = threading.Lock()


def checkpoint_sha256(path: Optional[PathLike]) -> Optional[str]:
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
    from .models.checkpoints import digest_of

    digest = digest_of(p, "sha256")
    with _SHA_LOCK:
        _SHA_CACHE[key] = digest
    return digest


# ---------------------------------------------------------------------------
# listing inputs
# ---------------------------------------------------------------------------
@dataclass
class SessionItem:
    """One image (file or DICOM series folder) of a session.

    Attributes:
        path: where the image is.
        name: its path relative to the input folder (POSIX style); the key in ``session.json``.
        stem: ``name`` without its image suffix; output files are ``<stem>.<ext>``.
        status: one of :data:`STATUSES`.
    """

    path: Path
    name: str
    stem: str
    status: str = NOT_STARTED

    @property
    def is_nifti(self) -> bool:
        return _suffix(self.path) in NIFTI_SUFFIXES

    @property
    def labels_name(self) -> str:
        return f"{LABELS_DIR}/{self.stem}{'.nii.gz' if self.is_nifti else '.tif'}"

    @property
    def record_name(self) -> str:
        return f"{RECORDS_DIR}/{self.stem}.json"


def _hidden(p: Path) -> bool:
    return p.name.startswith(".")


def _is_dicom_file(p: Path) -> bool:
    if p.suffix.lower() in DICOM_SUFFIXES:
        return True
    if p.suffix:
        return False
    with contextlib.suppress(OSError), open(p, "rb") as fh:
        return fh.read(132)[128:132] == b"DICM"
    return False


def _holds_dicom(folder: Path) -> bool:
    files = [p for p in folder.iterdir() if p.is_file() and not _hidden(p)]
    return any(_is_dicom_file(p) for p in files[:64])


def _strip_suffix(name: str) -> str:
    low = name.lower()
    for suf in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if low.endswith(suf):
            return name[: -len(suf)]
    return name


def list_images(root: Path, exclude: Sequence[Path] = ()) -> List[Tuple[Path, str]]:
    """(path, relative name) of every image under ``root``, sorted by name.

    Image files (PNG/JPEG/BMP/TIFF/NIfTI, single DICOM files next to other
    images) are items; a folder holding DICOM files is one item (a series).
    Hidden files and folders and the ``exclude`` folders are skipped.
    """
    root = Path(root)
    excluded = {Path(e).resolve() for e in exclude}
    out: List[Tuple[Path, str]] = []
    if _holds_dicom(root):
        return [(root, root.name)]

    def walk(folder: Path) -> None:
        for p in sorted(folder.iterdir(), key=lambda q: q.name):
            if _hidden(p) or p.resolve() in excluded:
                continue
            if p.is_dir():
                if _holds_dicom(p):
                    out.append((p, p.relative_to(root).as_posix()))
                else:
                    walk(p)
            elif p.is_file() and _suffix(p) in IMAGE_SUFFIXES and not p.name.lower().endswith((".dcm", ".dicom")):
                out.append((p, p.relative_to(root).as_posix()))

    walk(root)
    return sorted(out, key=lambda t: t[1])


def read_list_file(path: Path) -> List[Tuple[Path, str]]:
    """Paths listed one per line (``#`` comments; CSV: first column, header skipped)."""
    base = path.parent
    out: List[Tuple[Path, str]] = []
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    is_csv = path.suffix.lower() == ".csv"
    for i, line in enumerate(lines):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if is_csv:
            import csv

            text = next(csv.reader([text]))[0].strip()
            if i == 0 and not (base / text).expanduser().exists() and not Path(text).expanduser().exists():
                continue  # header row
        p = Path(text).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.exists():
            raise SessionError(f"{path}: line {i + 1}: {p} does not exist")
        try:
            name = p.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            name = p.name
        out.append((p, name))
    names: Dict[str, int] = {}
    unique = []
    for p, name in out:  # the same file name from two folders: keep both
        n = names.get(name, 0)
        names[name] = n + 1
        unique.append((p, name if n == 0 else f"{_strip_suffix(name)}_{n + 1}{name[len(_strip_suffix(name)):]}"))
    return unique


def _make_items(entries: List[Tuple[Path, str]]) -> List[SessionItem]:
    stems = [_strip_suffix(name) for _, name in entries]
    counts: Dict[str, int] = {}
    for s in stems:
        counts[s.lower()] = counts.get(s.lower(), 0) + 1
    items = []
    for (p, name), stem in zip(entries, stems):
        if counts[stem.lower()] > 1:  # a.png and a.tif side by side: keep the suffix in the stem
            stem = stem + "_" + name[len(stem):].lstrip(".").replace(".", "_")
        items.append(SessionItem(Path(p), name, stem))
    return items


# ---------------------------------------------------------------------------
# boxes <-> records
# ---------------------------------------------------------------------------
def box_from_vertices(vertices) -> Tuple[Optional[int], List[float]]:
    """Rectangle vertices in data coords (..., row, col) -> (slice or None, [x0, y0, x1, y1])."""
    v = np.asarray(vertices, dtype=float)
    lead = [int(round(c)) for c in v[0, :-2]]
    v = np.round(v, 3)
    rows, cols = v[:, -2], v[:, -1]
    box = [float(cols.min()), float(rows.min()), float(cols.max()), float(rows.max())]
    return (lead[-1] if lead else None), box


def boxes_from_layer(data: Sequence, shape_types: Sequence[str], label_ids: Sequence[int]) -> List[Dict[str, Any]]:
    """A box layer's state (vertex arrays, shape types, label ids) -> JSON-ready box prompts.

    Each prompt keeps the exact vertices, so :func:`layer_from_boxes` gives the
    same layer state back bit for bit (float64 survives JSON exactly).
    """
    out = []
    for order, (verts, kind, label) in enumerate(zip(data, shape_types, label_ids)):
        z, box = box_from_vertices(verts)
        out.append({
            "order": order, "label": int(label), "type": str(kind), "slice": z, "box": box,
            "vertices": np.asarray(verts, dtype=float).tolist(),
        })
    return out


def layer_from_boxes(boxes: Sequence[Dict[str, Any]]) -> Tuple[List[np.ndarray], List[str], np.ndarray]:
    """Inverse of :func:`boxes_from_layer`: (vertex arrays, shape types, label ids) in layer order."""
    boxes = sorted(boxes, key=lambda b: b.get("order", 0))
    data = [np.asarray(b["vertices"], dtype=float) for b in boxes]
    types = [b.get("type", "rectangle") for b in boxes]
    labels = np.array([int(b.get("label", 0)) for b in boxes], dtype=np.int64)
    return data, types, labels


def _json_window(window) -> Optional[List[float]]:
    if window is None:
        return None
    if isinstance(window, str):
        from .intensity import parse_window

        window = parse_window(window)
    return [float(v) for v in window]


def _model_info(model) -> Dict[str, Any]:
    """A MedSAM object or a dict with ``name`` / ``checkpoint`` -> the record's model entry."""
    if model is None:
        return {"name": None, "checkpoint": None, "checkpoint_sha256": None}
    if isinstance(model, dict):
        name, ckpt, sha = model.get("name"), model.get("checkpoint"), model.get("checkpoint_sha256")
    else:
        name, ckpt, sha = getattr(model, "name", None), getattr(model, "checkpoint", None), None
    ckpt = str(ckpt) if ckpt else None
    return {"name": name, "checkpoint": ckpt, "checkpoint_sha256": sha or checkpoint_sha256(ckpt)}


def label_stats(labels: np.ndarray) -> Dict[int, Dict[str, Any]]:
    """Per label id > 0: pixel/voxel count and bounding box (``[[start, stop), ...]`` per axis)."""
    from scipy import ndimage

    lab = np.asarray(labels)
    if lab.size == 0 or int(lab.max()) <= 0:
        return {}
    ids = np.unique(lab)
    ids = ids[ids > 0]
    if int(ids[-1]) > 1_000_000:  # huge sparse ids: number them 1..n first
        dense = np.searchsorted(ids, lab).astype(np.int64) + 1
        dense[lab == 0] = 0
        lab, keys = dense, np.arange(1, len(ids) + 1)
    else:
        lab, keys = (lab if lab.dtype.itemsize <= 4 else lab.astype(np.int64)), ids
    counts = np.bincount(lab.ravel())
    slices = ndimage.find_objects(lab)
    return {
        int(i): {"pixels": int(counts[k]), "bbox": [[int(s.start), int(s.stop)] for s in slices[int(k) - 1]]}
        for i, k in zip(ids, keys)
    }


def build_objects(labels: np.ndarray, boxes: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One entry per object (label id in the labels or on a box): prompts, size, extent, propagation."""
    stats = label_stats(labels)
    ids = sorted(set(stats) | {b["label"] for b in boxes if b["label"] > 0})
    volume = np.ndim(labels) == 3
    objects = []
    for i in ids:
        prompts = [{k: b[k] for k in ("order", "type", "slice", "box")} for b in boxes if b["label"] == i]
        st = stats.get(i)
        obj: Dict[str, Any] = {"label": i, "prompts": prompts, "pixels": st["pixels"] if st else 0, "bbox": st["bbox"] if st else None}
        obj["propagation"] = None
        if volume and st:
            first, last = st["bbox"][0][0], st["bbox"][0][1] - 1
            prompt_slices = {p["slice"] for p in prompts if p["slice"] is not None}
            if first != last or (prompt_slices and prompt_slices != {first}):
                obj["propagation"] = {"first_slice": first, "last_slice": last, "from_slices": sorted(prompt_slices)}
        objects.append(obj)
    return objects


def compact_labels(labels: np.ndarray) -> np.ndarray:
    """Smallest unsigned dtype holding the ids (uint8, uint16, uint32)."""
    lab = np.asarray(labels)
    if lab.dtype == bool:
        return lab.astype(np.uint8)
    if not np.issubdtype(lab.dtype, np.integer):
        raise ImageError(f"labels must be integers, got dtype {lab.dtype}")
    lo, hi = (int(lab.min()), int(lab.max())) if lab.size else (0, 0)
    if lo < 0:
        raise ImageError(f"labels must not be negative (min {lo})")
    for dt in (np.uint8, np.uint16, np.uint32):
        if hi <= np.iinfo(dt).max:
            return lab if lab.dtype == dt else lab.astype(dt)
    return lab.astype(np.uint64)


# ---------------------------------------------------------------------------
# the session
# ---------------------------------------------------------------------------
@dataclass
class ImageInfo:
    """What saving needs to know about an image without keeping its pixels."""

    shape: Tuple[int, ...]  # spatial shape (labels shape)
    kind: str
    spacing: Optional[Tuple[float, ...]]
    affine: Optional[np.ndarray]
    meta: Dict[str, Any]

    def like(self, path: Optional[str] = None) -> ImageData:
        """An ImageData stand-in (zero-strided pixels) for :func:`write_labels`."""
        shape = self.shape + ((3,) if self.kind == "rgb" else ())
        return ImageData(np.broadcast_to(np.uint8(0), shape), self.spacing, self.affine, path, self.kind, dict(self.meta))


def _info_of(img: ImageData) -> ImageInfo:
    shape = img.array.shape[:2] if img.kind == "rgb" else img.array.shape
    aff = None if img.affine is None else np.array(img.affine, dtype=float)
    sp = None if img.spacing is None else tuple(float(s) for s in img.spacing)
    return ImageInfo(tuple(int(s) for s in shape), img.kind, sp, aff, dict(img.meta))


class LabelingSession:
    """A folder (or list file) of images annotated one after the other into ``output_dir``.

    Args:
        input: a folder of images (searched recursively; a folder of DICOM files is
            one series) or a text/CSV file listing image paths (relative to the file).
            May be None when ``output_dir`` holds a session (its input is reused).
        output_dir: where labels, records and ``session.json`` go. If it already holds
            a session, that session is resumed (statuses, position, labels, records).
        cache_max_bytes: size cap of the on-disk embedding cache ``output_dir/.embeddings``.

    Thread-safe: saves may come from a background thread.
    """

    def __init__(self, input: Optional[PathLike], output_dir: PathLike, cache_max_bytes: int = DEFAULT_CACHE_BYTES):
        self.output_dir = Path(output_dir).expanduser().resolve()
        self.cache_max_bytes = int(cache_max_bytes)
        self._lock = threading.RLock()
        self._infos: Dict[int, ImageInfo] = {}
        self._cache = None
        state = self._read_state()
        if input is None:
            if state is None or not state.get("input"):
                raise SessionError(f"{self.output_dir} holds no session: give the input folder or list file")
            input = state["input"]
        self.input = Path(input).expanduser().resolve()
        if not self.input.exists():
            raise SessionError(f"input {self.input} does not exist")
        if self.input.is_dir():
            entries = list_images(self.input, exclude=[self.output_dir])
        else:
            entries = read_list_file(self.input)
        if not entries:
            raise SessionError(f"{self.input}: no images found (supported: PNG, JPEG, BMP, TIFF, NIfTI, DICOM)")
        self.items = _make_items(entries)
        self._by_name = {it.name: i for i, it in enumerate(self.items)}
        self.position = 0
        self.created = now_iso()
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._clean_temp_files()
        self._resume(state)
        self._write_state()

    @classmethod
    def open(cls, output_dir: PathLike, input: Optional[PathLike] = None, **kwargs) -> "LabelingSession":
        """Open (resume) the session in ``output_dir``; ``input`` defaults to the one it was made from."""
        return cls(input, output_dir, **kwargs)

    # -- state ------------------------------------------------------------------
    @property
    def session_path(self) -> Path:
        return self.output_dir / SESSION_FILE

    def _read_state(self) -> Optional[Dict[str, Any]]:
        p = self.output_dir / SESSION_FILE
        if not p.exists():
            return None
        try:
            state = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:  # cannot happen with atomic writes, unless edited by hand
            raise SessionError(f"{p} is not a readable session file: {exc}") from exc
        if state.get("format") != SESSION_FORMAT:
            raise SessionError(f"{p} is not a napari-medsam session file")
        return state

    def _resume(self, state: Optional[Dict[str, Any]]) -> None:
        statuses = (state or {}).get("statuses", {})
        for i, it in enumerate(self.items):
            st = statuses.get(it.name, NOT_STARTED)
            it.status = st if st in STATUSES else NOT_STARTED
            if it.status == NOT_STARTED and (self.output_dir / it.record_name).exists():
                rec = self.load_record(i)  # saved, then killed before session.json was written
                it.status = rec.get("status", IN_PROGRESS) if rec else IN_PROGRESS
                if it.status == NOT_STARTED:
                    it.status = IN_PROGRESS
        if state:
            self.created = state.get("created", self.created)
            current = state.get("current")
            if current in self._by_name:
                self.position = self._by_name[current]
            else:
                self.position = min(max(int(state.get("position", 0)), 0), len(self.items) - 1)

    def _state(self) -> Dict[str, Any]:
        return {
            "format": SESSION_FORMAT,
            "format_version": FORMAT_VERSION,
            "input": str(self.input),
            "position": self.position,
            "current": self.items[self.position].name,
            "done": self.n_done,
            "total": len(self.items),
            "statuses": {it.name: it.status for it in self.items},
            "napari_medsam_version": package_version(),
            "created": self.created,
            "modified": now_iso(),
        }

    def _write_state(self) -> None:
        with self._lock:
            atomic_write_text(self.session_path, json.dumps(self._state(), indent=1))

    def _clean_temp_files(self) -> None:
        """Remove temp files a killed writer left behind (never a real output)."""
        for folder in (self.output_dir, self.output_dir / LABELS_DIR, self.output_dir / RECORDS_DIR, self.output_dir / CACHE_DIR):
            if not folder.is_dir():
                continue
            pattern = "**/.*.tmp*" if folder.name in (LABELS_DIR, RECORDS_DIR) else ".*.tmp*"
            for p in folder.glob(pattern):
                if p.is_file() and (".tmp-" in p.name or p.name.endswith(".tmp")):
                    with contextlib.suppress(OSError):
                        p.unlink()

    # -- listing and status -----------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    @property
    def total(self) -> int:
        return len(self.items)

    @property
    def n_done(self) -> int:
        return sum(it.status == DONE for it in self.items)

    def counts(self) -> Dict[str, int]:
        out = {s: 0 for s in STATUSES}
        for it in self.items:
            out[it.status] += 1
        return out

    def progress_text(self) -> str:
        c = self.counts()
        extra = f", {c[SKIPPED]} skipped" if c[SKIPPED] else ""
        return f"{c[DONE]}/{len(self.items)} done{extra}"

    @property
    def current(self) -> SessionItem:
        return self.items[self.position]

    def index_of(self, name: str) -> int:
        return self._by_name[name]

    def _check(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self.items):
            raise SessionError(f"image index {index} out of range 0..{len(self.items) - 1}")
        return index

    def status(self, index: int) -> str:
        return self.items[self._check(index)].status

    def set_status(self, index: int, status: str) -> None:
        if status not in STATUSES:
            raise SessionError(f"unknown status {status!r}; use one of {STATUSES}")
        with self._lock:
            self.items[self._check(index)].status = status
            rec = self.load_record(index)
            if rec is not None and rec.get("status") != status:  # keep the record's copy in step
                rec["status"] = status
                rec["modified"] = now_iso()
                atomic_write_text(self.output_dir / self.items[index].record_name, json.dumps(rec, indent=1))
            self._write_state()

    def mark_done(self, index: Optional[int] = None) -> None:
        self.set_status(self.position if index is None else index, DONE)

    def skip(self, index: Optional[int] = None) -> None:
        self.set_status(self.position if index is None else index, SKIPPED)

    # -- navigation -------------------------------------------------------------
    def jump(self, index: int) -> int:
        with self._lock:
            self.position = self._check(index)
            self._write_state()
            return self.position

    def next(self, pending_only: bool = False) -> int:
        """Move to the next image (``pending_only``: the next not done / skipped one); stays at the end."""
        for i in range(self.position + 1, len(self.items)):
            if not pending_only or self.items[i].status in (NOT_STARTED, IN_PROGRESS):
                return self.jump(i)
        return self.position

    def previous(self) -> int:
        return self.jump(max(self.position - 1, 0))

    # -- images -----------------------------------------------------------------
    def read(self, index: int) -> ImageData:
        """Read image ``index`` (and remember its shape, spacing and affine for saving)."""
        index = self._check(index)
        img = read_image(self.items[index].path)
        with self._lock:
            self._infos[index] = _info_of(img)
        return img

    def info(self, index: int) -> ImageInfo:
        index = self._check(index)
        with self._lock:
            info = self._infos.get(index)
        if info is None:
            self.read(index)
            info = self._infos[index]
        return info

    def labels_path(self, index: int) -> Path:
        return self.output_dir / self.items[self._check(index)].labels_name

    def record_path(self, index: int) -> Path:
        return self.output_dir / self.items[self._check(index)].record_name

    # -- saving -----------------------------------------------------------------
    def save(self, index: int, labels: np.ndarray, record: Optional[Dict[str, Any]] = None, status: Optional[str] = None) -> Dict[str, Any]:
        """Write labels and the annotation record of image ``index``; update ``session.json``.

        Args:
            index: the image.
            labels: integer label map of the image's spatial shape (0 = background).
            record: what the caller knows about the annotation (all optional):
                ``boxes`` (list from :func:`boxes_from_layer`), ``model`` (a MedSAM or
                ``{"name", "checkpoint"}``), ``intensity`` (``{"modality", "window", ...}``);
                any other key is kept as is.
            status: new status; by default a not-started image becomes in progress.

        Returns:
            (dict): the record as written.

        Order of writes: labels, record, session.json, each atomic; so the labels on
        disk are never older than the record's previous version.
        """
        index = self._check(index)
        item = self.items[index]
        info = self.info(index)
        lab = compact_labels(labels)
        if tuple(lab.shape) != info.shape:
            raise ImageError(f"{item.name}: labels shape {lab.shape} does not match image shape {info.shape}")
        rec_in = dict(record or {})
        boxes = [dict(b) for b in rec_in.pop("boxes", [])]
        with self._lock:
            old = self.load_record(index)
            if status is None:
                status = item.status if item.status != NOT_STARTED else IN_PROGRESS
            if status not in STATUSES:
                raise SessionError(f"unknown status {status!r}")
            from .cache import content_hash

            old_rec = old or {}
            # a record without model / intensity keeps what the previous version said
            intensity = dict(rec_in.pop("intensity", None) or old_rec.get("intensity") or {"modality": "auto", "window": None})
            intensity["window"] = _json_window(intensity.get("window"))
            model = _model_info(rec_in.pop("model", None) or old_rec.get("model"))
            for key in ("objects", "format", "format_version", "image", "labels", "status", "created", "modified"):
                rec_in.pop(key, None)
            out = {
                "format": RECORD_FORMAT,
                "format_version": FORMAT_VERSION,
                "image": item.name,
                "image_path": str(item.path),
                "labels": item.labels_name,
                "kind": info.kind,
                "shape": list(info.shape),
                "spacing": None if info.spacing is None else list(info.spacing),
                "status": status,
                "objects": build_objects(lab, boxes),
                "boxes": boxes,
                "model": model,
                "intensity": intensity,
                "labels_dtype": str(lab.dtype),
                "labels_hash": content_hash(lab),
                "napari_medsam_version": package_version(),
                "created": (old or {}).get("created") or now_iso(),
                "modified": now_iso(),
                **rec_in,
            }
            write_labels(self.output_dir / item.labels_name, lab, like=info.like(str(item.path)))
            atomic_write_text(self.output_dir / item.record_name, json.dumps(out, indent=1))
            item.status = status
            self._write_state()
        return out

    # -- loading ----------------------------------------------------------------
    def load_record(self, index: int) -> Optional[Dict[str, Any]]:
        """The saved record of image ``index``, or None."""
        p = self.record_path(index)
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable record %s: %s", p, exc)
            return None

    def load_labels(self, index: int) -> Optional[np.ndarray]:
        """The saved labels of image ``index`` (shape of the image), or None."""
        p = self.labels_path(index)
        if not p.exists():
            return None
        try:
            if _suffix(p) in NIFTI_SUFFIXES:
                arr = read_image(p).array
            else:
                import tifffile

                arr = tifffile.imread(p)
        except Exception as exc:
            raise ReadError(f"cannot read saved labels {p}: {exc}") from exc
        rec = self.load_record(index)
        shape = tuple(rec["shape"]) if rec and rec.get("shape") else None
        if shape is not None and arr.shape != shape and arr.size == int(np.prod(shape)):
            arr = arr.reshape(shape)  # e.g. a 1-slice volume
        return arr

    def layer_state(self, index: int) -> Tuple[List[np.ndarray], List[str], np.ndarray]:
        """The box layer state (vertices, shape types, label ids) saved for image ``index``."""
        rec = self.load_record(index) or {}
        return layer_from_boxes(rec.get("boxes", []))

    # -- embedding cache ----------------------------------------------------------
    @property
    def cache_dir(self) -> Path:
        return self.output_dir / CACHE_DIR

    def embedding_cache(self, max_bytes: int = 1 << 30, fp16: bool = False):
        """The session's :class:`EmbeddingCache` (memory LRU + ``.embeddings`` on disk, size-capped)."""
        with self._lock:
            if self._cache is None:
                from .cache import EmbeddingCache

                self._cache = EmbeddingCache(max_bytes=max_bytes, fp16=fp16, disk_dir=self.cache_dir, disk_max_bytes=self.cache_max_bytes)
            return self._cache

    def __repr__(self) -> str:
        return f"LabelingSession({str(self.input)!r}, {str(self.output_dir)!r}: {self.progress_text()}, at {self.position})"


def iter_saved(session: LabelingSession, statuses: Iterable[str] = (IN_PROGRESS, DONE)) -> Iterable[int]:
    """Indices of images with saved labels and one of ``statuses``."""
    wanted = set(statuses)
    for i, it in enumerate(session.items):
        if it.status in wanted and session.labels_path(i).exists():
            yield i
