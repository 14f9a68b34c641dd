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
import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Union

import numpy as np

from napari_medsam.engine.cache import EmbeddingCache
from napari_medsam.engine.errors import ImageError, SessionError
from napari_medsam.engine.io import ImageData, atomic_write_text, read_image, write_labels

from .inputs import (
    CACHE_DIR,
    DONE,
    IN_PROGRESS,
    LABELS_DIR,
    NOT_STARTED,
    RECORDS_DIR,
    SESSION_FILE,
    SKIPPED,
    STATUSES,
    SessionItem,
    Status,
    _make_items,
    as_status,
    list_images,
    read_list_file,
)
from .records import (
    FORMAT_VERSION,
    SESSION_FORMAT,
    build_record,
    compact_labels,
    layer_from_boxes,
    now_iso,
    package_version,
)
from .store import ImageInfo, info_of, read_labels_file

PathLike = Union[str, "os.PathLike[str]"]
log = logging.getLogger(__name__)
DEFAULT_CACHE_BYTES = 2 << 30
DEFAULT_MEMORY_CACHE_BYTES = 1 << 30


# ---------------------------------------------------------------------------
# the session
# ---------------------------------------------------------------------------
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

    def __init__(self, input: PathLike | None, output_dir: PathLike, cache_max_bytes: int = DEFAULT_CACHE_BYTES):
        self.output_dir = Path(output_dir).expanduser().resolve()
        self.cache_max_bytes = int(cache_max_bytes)
        self._lock = threading.RLock()
        self._infos: dict[int, ImageInfo] = {}
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
    def open(cls, output_dir: PathLike, input: PathLike | None = None, **kwargs) -> LabelingSession:
        """Open (resume) the session in ``output_dir``; ``input`` defaults to the one it was made from."""
        return cls(input, output_dir, **kwargs)

    # -- state ------------------------------------------------------------------
    @property
    def session_path(self) -> Path:
        return self.output_dir / SESSION_FILE

    def _read_state(self) -> dict[str, Any] | None:
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

    def _resume(self, state: dict[str, Any] | None) -> None:
        statuses = (state or {}).get("statuses", {})
        for i, it in enumerate(self.items):
            st = statuses.get(it.name, NOT_STARTED)
            it.status = Status(st) if isinstance(st, str) and st in STATUSES else NOT_STARTED
            if it.status == NOT_STARTED and (self.output_dir / it.record_name).exists():
                rec = self.load_record(i)  # saved, then killed before session.json was written
                it.status = Status(rec["status"]) if rec and rec.get("status") in STATUSES else IN_PROGRESS
                if it.status == NOT_STARTED:
                    it.status = IN_PROGRESS
        if state:
            self.created = state.get("created", self.created)
            current = state.get("current")
            if current in self._by_name:
                self.position = self._by_name[current]
            else:
                self.position = min(max(int(state.get("position", 0)), 0), len(self.items) - 1)

    def _state(self) -> dict[str, Any]:
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
        for folder in (
            self.output_dir,
            self.output_dir / LABELS_DIR,
            self.output_dir / RECORDS_DIR,
            self.output_dir / CACHE_DIR,
        ):
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

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(STATUSES, 0)
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

    def _check(self, index: int) -> int:
        index = int(index)
        if not 0 <= index < len(self.items):
            raise SessionError(f"image index {index} out of range 0..{len(self.items) - 1}")
        return index

    def status(self, index: int) -> Status:
        return self.items[self._check(index)].status

    def set_status(self, index: int, status: str) -> None:
        status = as_status(status)
        with self._lock:
            self.items[self._check(index)].status = status
            rec = self.load_record(index)
            if rec is not None and rec.get("status") != status:  # keep the record's copy in step
                rec["status"] = status
                rec["modified"] = now_iso()
                atomic_write_text(self.output_dir / self.items[index].record_name, json.dumps(rec, indent=1))
            self._write_state()

    def mark_done(self, index: int | None = None) -> None:
        self.set_status(self.position if index is None else index, DONE)

    def skip(self, index: int | None = None) -> None:
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
            self._infos[index] = info_of(img)
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
    def save(
        self, index: int, labels: np.ndarray, record: dict[str, Any] | None = None, status: str | None = None
    ) -> dict[str, Any]:
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
            status = as_status(status)
            out = build_record(item, info, lab, boxes, rec_in, old, status)
            write_labels(self.output_dir / item.labels_name, lab, like=info.like(str(item.path)))
            atomic_write_text(self.output_dir / item.record_name, json.dumps(out, indent=1))
            item.status = status
            self._write_state()
        return out

    # -- loading ----------------------------------------------------------------
    def load_record(self, index: int) -> dict[str, Any] | None:
        """The saved record of image ``index``, or None."""
        p = self.record_path(index)
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable record %s: %s", p, exc)
            return None

    def load_labels(self, index: int) -> np.ndarray | None:
        """The saved labels of image ``index`` (shape of the image), or None."""
        p = self.labels_path(index)
        if not p.exists():
            return None
        arr = read_labels_file(p)
        rec = self.load_record(index)
        shape = tuple(rec["shape"]) if rec and rec.get("shape") else None
        if shape is not None and arr.shape != shape and arr.size == int(np.prod(shape)):
            arr = arr.reshape(shape)  # e.g. a 1-slice volume
        return arr

    def layer_state(self, index: int) -> tuple[list[np.ndarray], list[str], np.ndarray]:
        """The box layer state (vertices, shape types, label ids) saved for image ``index``."""
        rec = self.load_record(index) or {}
        return layer_from_boxes(rec.get("boxes", []))

    # -- embedding cache ----------------------------------------------------------
    @property
    def cache_dir(self) -> Path:
        return self.output_dir / CACHE_DIR

    def embedding_cache(self, max_bytes: int = DEFAULT_MEMORY_CACHE_BYTES, fp16: bool = False):
        """The session's :class:`EmbeddingCache` (memory LRU + ``.embeddings`` on disk, size-capped)."""
        with self._lock:
            if self._cache is None:
                self._cache = EmbeddingCache(
                    max_bytes=max_bytes, fp16=fp16, disk_dir=self.cache_dir, disk_max_bytes=self.cache_max_bytes
                )
            return self._cache

    def __repr__(self) -> str:
        return f"LabelingSession({str(self.input)!r}, {str(self.output_dir)!r}: {self.progress_text()}, at {self.position})"


def iter_saved(session: LabelingSession, statuses: Iterable[str] = (IN_PROGRESS, DONE)) -> Iterable[int]:
    """Indices of images with saved labels and one of ``statuses``."""
    wanted = set(statuses)
    for i, it in enumerate(session.items):
        if it.status in wanted and session.labels_path(i).exists():
            yield i
