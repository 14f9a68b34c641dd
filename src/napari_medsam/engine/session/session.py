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
Opening an existing output folder resumes the session: stray temp files of a
killed process are removed, interrupted saves finished or undone (``store``).
No Qt, no napari.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Any, Union

import numpy as np

from napari_medsam.engine.cache import EmbeddingCache
from napari_medsam.engine.errors import ImageError, SessionError
from napari_medsam.engine.io import ImageData, atomic_write_text, read_image

from . import store
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
    make_output_dir,
    session_entries,
)
from .records import (
    FORMAT_VERSION,
    SESSION_FORMAT,
    build_record,
    compact_labels,
    layer_from_boxes,
    now_iso,
    package_version,
    rebuild_from_labels,
    record_input,
)
from .store import ImageInfo

PathLike = Union[str, "os.PathLike[str]"]
log = logging.getLogger(__name__)
DEFAULT_CACHE_BYTES = 2 << 30
DEFAULT_MEMORY_CACHE_BYTES = 1 << 30


class LabelingSession:
    """A folder (or list file) of images annotated one after the other into ``output_dir``.

    Args:
        input: a folder of images (searched recursively; a folder of DICOM files is
            one series), one image file, or a text/CSV file listing image paths (relative to it).
            May be None when ``output_dir`` holds a session (its input is reused).
        output_dir: where labels, records and ``session.json`` go. If it already holds
            a session, that session is resumed (statuses, position, labels, records).
        cache_max_bytes: size cap of the on-disk embedding cache ``output_dir/.embeddings``.

    Thread-safe: saves may come from a background thread.
    """

    def __init__(self, input: PathLike | None, output_dir: PathLike, cache_max_bytes: int = DEFAULT_CACHE_BYTES):
        if output_dir is None:
            raise SessionError("give an output folder for the labels and records (or one holding a session)")
        self.output_dir = Path(output_dir).expanduser().resolve()
        self.cache_max_bytes = int(cache_max_bytes)
        self._lock = threading.RLock()
        self._infos: dict[int, ImageInfo] = {}
        self._cache: EmbeddingCache | None = None
        self.warnings: list[str] = []  # what the user should be told (records set aside, saves repaired)
        state = self._read_state(input is not None)
        if input is None and (state is None or not isinstance(state.get("input"), str) or not state["input"]):
            raise SessionError(f"{self.output_dir} holds no session: give the input folder or list file")
        source = input if input is not None else state["input"]  # type: ignore[index]
        self.input = Path(source).expanduser().resolve()
        if not self.input.exists():
            raise SessionError(f"input {self.input} does not exist")
        entries = session_entries(self.input, exclude=[self.output_dir])  # a folder, one image or a list file
        if not entries:
            raise SessionError(f"{self.input}: no images found (supported: PNG, JPEG, BMP, TIFF, NIfTI, DICOM)")
        self.items = _make_items(entries)
        self._by_name = {it.name: i for i, it in enumerate(self.items)}
        self.position = 0
        self.created = now_iso()
        make_output_dir(self.output_dir)
        store.clean_temp_files(self.output_dir, (LABELS_DIR, RECORDS_DIR, CACHE_DIR))
        for it in self.items:  # finish or undo saves a kill interrupted, before anything reads the pairs
            if done := store.settle_pair(self.output_dir / it.labels_name, self.output_dir / it.record_name):
                self._warn(done)
        self._resume(state)
        self._write_state()

    @classmethod
    def open(cls, output_dir: PathLike, input: PathLike | None = None, **kwargs: Any) -> LabelingSession:
        """Open (resume) the session in ``output_dir``; ``input`` defaults to the one it was made from."""
        return cls(input, output_dir, **kwargs)

    @property
    def session_path(self) -> Path:
        return self.output_dir / SESSION_FILE

    def _warn(self, message: str) -> None:
        log.warning("%s", message)
        if message not in self.warnings:
            self.warnings.append(message)

    def _read_state(self, have_input: bool) -> dict[str, Any] | None:
        """``session.json``; a damaged one is set aside when the input is known (statuses come from records)."""
        p = self.output_dir / SESSION_FILE
        if not p.exists():
            return None
        try:
            state, problem = store.read_json(p, SESSION_FORMAT)
        except OSError as exc:
            raise SessionError(f"cannot read the session file {p}: {exc}") from exc
        if problem is None:
            return state
        if not have_input:
            raise SessionError(f"{p} is not a usable session file ({problem}): give the input folder or list file")
        aside = store.set_aside(p)
        self._warn(f"{p.name} was damaged ({problem}); moved aside as {aside.name}, statuses rebuilt from records")
        return None

    def _resume(self, state: dict[str, Any] | None) -> None:
        statuses = (state or {}).get("statuses")
        statuses = statuses if isinstance(statuses, dict) else {}
        for i, it in enumerate(self.items):
            st = statuses.get(it.name, NOT_STARTED)
            it.status = Status(st) if isinstance(st, str) and st in STATUSES else NOT_STARTED
            if it.status == NOT_STARTED and (self.output_dir / it.record_name).exists():
                rec = self.load_record(i)  # saved, then killed before session.json was written
                it.status = Status(rec["status"]) if rec and rec.get("status") in STATUSES else IN_PROGRESS
                if it.status == NOT_STARTED:
                    it.status = IN_PROGRESS
        if state:
            created, current, position = state.get("created"), state.get("current"), state.get("position")
            self.created = created if isinstance(created, str) else self.created
            if isinstance(current, str) and current in self._by_name:
                self.position = self._by_name[current]
            elif isinstance(position, int):
                self.position = min(max(position, 0), len(self.items) - 1)

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
        out: dict[str, int] = dict.fromkeys(STATUSES, 0)
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
            self._infos[index] = store.info_of(img)
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
        rec_in, boxes = record_input(record)  # SessionError before anything is written
        with self._lock:
            old = self.load_record(index, strict=True)
            if status is None:
                status = item.status if item.status != NOT_STARTED else IN_PROGRESS
            status = as_status(status)
            out = build_record(item, info, lab, boxes, rec_in, old, status)
            store.write_pair(self.labels_path(index), lab, info.like(str(item.path)), self.record_path(index), out)
            item.status = status
            self._write_state()
        return out

    # -- loading ----------------------------------------------------------------
    def load_record(self, index: int, strict: bool = False) -> dict[str, Any] | None:
        """The saved record of image ``index``, or None.

        A record that is not JSON or does not meet the schema (see ``store.record_problem``)
        is moved aside as ``<name>.json.corrupt-<UTC time>`` and reported in :attr:`warnings`;
        then there is no record (None). A record that exists but cannot be read (permissions,
        I/O error) is left alone: None, or :class:`SessionError` with ``strict`` (saving
        then refuses to overwrite it).
        """
        p = self.record_path(index)
        with self._lock:
            if not p.exists():
                return None
            try:
                rec, problem = store.read_json(p)
                problem = problem or store.record_problem(rec)
            except OSError as exc:
                msg = f"cannot read the record {p}: {exc}"
                if strict:
                    raise SessionError(f"{msg}; not overwriting it") from exc
                self._warn(msg)
                return None
            if problem is None:
                return rec
            aside = store.set_aside(p)
            self._warn(f"{self.items[index].name}: its record was unusable ({problem}); moved aside as {aside.name}")
            return None

    def load_labels(self, index: int) -> np.ndarray | None:
        """The saved labels of image ``index`` (shape of the image), or None.

        The labels win over their record: when the record's ``labels_hash`` does not
        match them, the record is rewritten to describe these labels (its boxes kept,
        those whose label id is gone flagged ``"unmatched": true``) and a warning is added.
        """
        p = self.labels_path(index)
        if not p.exists():
            return None
        arr = store.read_labels_file(p)
        with self._lock:
            rec = self.load_record(index)
            shape = tuple(rec["shape"]) if rec and rec.get("shape") else None
            if shape is not None and arr.shape != shape and arr.size == int(np.prod(shape)):
                arr = arr.reshape(shape)  # e.g. a 1-slice volume
            if (
                rec
                and rec.get("labels_hash")
                and store.labels_digest(arr, None, rec.get("labels_dtype")) != rec["labels_hash"]
            ):
                self._repair(index, rec, arr)
        return arr

    def _repair(self, index: int, rec: dict[str, Any], labels: np.ndarray) -> None:
        lost, found = rebuild_from_labels(rec, compact_labels(labels))
        atomic_write_text(self.record_path(index), json.dumps(rec, indent=1))
        what = f"{lost} box(es) without their object flagged 'unmatched', {found} box(es) recovered from the labels"
        self._warn(f"{self.items[index].name}: its record was out of step with its labels; rebuilt from them ({what})")

    def layer_state(self, index: int) -> tuple[list[np.ndarray], list[str], np.ndarray]:
        """The box layer state (vertices, shape types, label ids) saved for image ``index``."""
        rec = self.load_record(index) or {}
        return layer_from_boxes(rec.get("boxes", []))

    # -- embedding cache ----------------------------------------------------------
    @property
    def cache_dir(self) -> Path:
        return self.output_dir / CACHE_DIR

    def embedding_cache(self, max_bytes: int = DEFAULT_MEMORY_CACHE_BYTES, fp16: bool = False) -> EmbeddingCache:
        """The session's :class:`EmbeddingCache` (memory LRU + ``.embeddings`` on disk, size-capped)."""
        with self._lock:
            if self._cache is None:
                self._cache = EmbeddingCache(
                    max_bytes=max_bytes, fp16=fp16, disk_dir=self.cache_dir, disk_max_bytes=self.cache_max_bytes
                )
            return self._cache

    def __repr__(self) -> str:
        where = f"{str(self.input)!r}, {str(self.output_dir)!r}"
        return f"LabelingSession({where}: {self.progress_text()}, at {self.position})"
