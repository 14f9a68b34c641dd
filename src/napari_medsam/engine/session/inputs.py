"""What a labeling session works through: its images (files or DICOM series folders) and their names.

Also the session's vocabulary: image statuses and the output folder layout.
"""

from __future__ import annotations

import csv
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Union

from napari_medsam.engine.errors import SessionError
from napari_medsam.engine.io import (
    DICOM_SUFFIXES,
    NIFTI_SUFFIXES,
    PIL_SUFFIXES,
    TIFF_SUFFIXES,
    _suffix,
    holds_dicom,
    is_dicom_file,
    strip_image_suffix,
)

PathLike = Union[str, "os.PathLike[str]"]


class Status(str, Enum):
    """An image's annotation status; the members are strings, so JSON holds the plain words."""

    NOT_STARTED = "not started"
    IN_PROGRESS = "in progress"
    DONE = "done"
    SKIPPED = "skipped"

    def __str__(self) -> str:
        return self.value


NOT_STARTED, IN_PROGRESS, DONE, SKIPPED = Status.NOT_STARTED, Status.IN_PROGRESS, Status.DONE, Status.SKIPPED
STATUSES = tuple(Status)
SESSION_FILE = "session.json"
LABELS_DIR, RECORDS_DIR, CACHE_DIR = "labels", "records", ".embeddings"
IMAGE_SUFFIXES = PIL_SUFFIXES + TIFF_SUFFIXES + NIFTI_SUFFIXES + DICOM_SUFFIXES
DICOM_SAMPLE = 64  # files looked at to decide whether a folder is a DICOM series


def as_status(value: object) -> Status:
    """``value`` as a :class:`Status`; :class:`SessionError` naming the allowed words otherwise."""
    try:
        return Status(value)
    except ValueError:
        raise SessionError(f"unknown status {value!r}; use one of {[s.value for s in Status]}") from None


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
    status: Status = NOT_STARTED

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


def _holds_dicom(folder: Path) -> bool:
    # engine.io's one DICOM rule (a .dcm/.dicom suffix or the 128-byte preamble + DICM), as read_image uses
    return holds_dicom(folder, DICOM_SAMPLE)


_strip_suffix = strip_image_suffix  # engine.io's one suffix rule (also batch's default row names)


def list_images(root: Path, exclude: Sequence[Path] = ()) -> list[tuple[Path, str]]:
    """(path, relative name) of every image under ``root``, sorted by name.

    Image files (PNG/JPEG/BMP/TIFF/NIfTI, single DICOM files next to other
    images) are items; a folder holding DICOM files is one item (a series).
    Hidden files and folders and the ``exclude`` folders are skipped.
    """
    root = Path(root)
    excluded = {Path(e).resolve() for e in exclude}
    out: list[tuple[Path, str]] = []
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


def session_entries(source: Path, exclude: Sequence[Path] = ()) -> list[tuple[Path, str]]:
    """What a session's input holds: a folder's images, one image file, or the images a list file names."""
    if source.is_dir():
        return list_images(source, exclude=exclude)
    if not source.is_file():  # reading a pipe or a device would block
        raise SessionError(f"input {source} is not a folder, an image or a list file (a pipe, device or socket)")
    if _suffix(source) in IMAGE_SUFFIXES or is_dicom_file(source):
        return [(source, source.name)]  # one image: a session of one
    try:
        return read_list_file(source)
    except (OSError, UnicodeDecodeError, ValueError, csv.Error) as exc:  # binary, NUL bytes, unreadable
        raise SessionError(f"cannot read the list file {source} (one image path per line): {exc}") from None


def make_output_dir(path: Path) -> None:
    """Create a session's output folder and prove a file can be written there; :class:`SessionError` if not."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        what = "create" if not path.is_dir() else "write into"
        raise SessionError(f"cannot {what} the output folder {path}: {exc.strerror or exc}") from None


def read_list_file(path: Path) -> list[tuple[Path, str]]:
    """Paths listed one per line (``#`` comments; CSV: first column, header skipped)."""
    base = path.parent
    out: list[tuple[Path, str]] = []
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    is_csv = path.suffix.lower() == ".csv"
    for i, line in enumerate(lines):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if is_csv:
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
    names: dict[str, int] = {}
    unique = []
    for p, name in out:  # the same file name from two folders: keep both
        n = names.get(name, 0)
        names[name] = n + 1
        unique.append((p, name if n == 0 else f"{_strip_suffix(name)}_{n + 1}{name[len(_strip_suffix(name)) :]}"))
    return unique


def _make_items(entries: list[tuple[Path, str]]) -> list[SessionItem]:
    stems = [_strip_suffix(name) for _, name in entries]
    counts: dict[str, int] = {}
    for s in stems:
        counts[s.lower()] = counts.get(s.lower(), 0) + 1
    items = []
    for (p, name), stem in zip(entries, stems, strict=True):
        if counts[stem.lower()] > 1:  # a.png and a.tif side by side: keep the suffix in the stem
            stem = stem + "_" + name[len(stem) :].lstrip(".").replace(".", "_")
        items.append(SessionItem(Path(p), name, stem))
    return items
