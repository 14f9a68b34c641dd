"""Atomic file writes: the one temp-file + fsync + ``os.replace`` in the engine.

A writer never touches the target until the new contents are complete and on
disk. The temporary file lives in the target's folder (``os.replace`` is only
atomic within one file system), is created exclusively (``O_EXCL``, so two
writers never share one), is fsynced before the rename, and is removed when
anything fails, ``KeyboardInterrupt`` included. After the rename the folder is
fsynced too (POSIX), so the rename itself survives a power cut.

A crash or SIGKILL at any instant therefore leaves the previous complete file
or the new complete file, plus at worst one stray ``.<name>.tmp-<hex><suffix>``
file next to it (:func:`is_temp_name` recognises them, so a caller can clean up).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Union

PathLike = Union[str, "os.PathLike[str]"]
TEMP_MARK = ".tmp-"
_TEMP_RE = re.compile(r"^\..+\.tmp-[0-9a-f]{8}")
_DOUBLE_SUFFIXES = (".nii.gz", ".ome.tiff", ".ome.tif", ".tar.gz")


def _split_suffix(name: str) -> tuple[str, str]:
    low = name.lower()
    for suf in _DOUBLE_SUFFIXES:
        if low.endswith(suf) and len(name) > len(suf):
            return name[: -len(suf)], name[-len(suf) :]
    stem, dot, ext = name.rpartition(".")
    if dot and stem:
        return stem, "." + ext
    return name, ""


def temp_path_for(target: Path, suffix: str | None = None) -> Path:
    """A fresh, exclusively created sibling temp file for ``target``.

    It ends in ``target``'s suffix (format sniffers such as ``nib.save`` need it) unless
    ``suffix`` is given (a cache that tells temp files from entries by their ending).
    """
    stem, own = _split_suffix(target.name)
    suffix = own if suffix is None else suffix
    while True:
        tmp = target.with_name(f".{stem}{TEMP_MARK}{secrets.token_hex(4)}{suffix}")
        with contextlib.suppress(FileExistsError):
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # mode follows umask
            return tmp


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is a temp file left by an interrupted atomic write."""
    return bool(_TEMP_RE.match(name))


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(
    path: PathLike, writer: Callable[[Path], object], durable: bool = True, temp_suffix: str | None = None
) -> Path:
    """Call ``writer(tmp)`` on a sibling temp file, fsync it, then replace ``path`` with it.

    Arguments:
      path (str or Path): the target; parent folders are created.
      writer (callable): writes the complete contents to the temp path it is given
        (``tifffile.imwrite``, ``nib.save``, ``Path.write_bytes``...).
      durable (bool): fsync the file and its folder. ``False`` keeps the atomic
        replace (never a torn file) but not durability across a power cut: for caches
        whose entries are checksummed and can be recomputed.
      temp_suffix (str or None): the temp file's ending (default: the target's suffix).

    Returns:
      (Path): the target path.

    Raises:
      OSError: the folder cannot be written (the target is then untouched and no temp file is left).
    """
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path_for(target, temp_suffix)
    try:
        writer(tmp)
        if durable:
            _fsync(tmp, os.O_RDWR)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable and hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX only)
        with contextlib.suppress(OSError):
            _fsync(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    return target


def atomic_write_bytes(path: PathLike, data: bytes, durable: bool = True, temp_suffix: str | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (temp file, fsync, ``os.replace``).

    Arguments:
      path (str or Path): target file; parent folders are created.
      data (bytes): the full new contents.

    Returns:
      (Path): the target path.
    """
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), durable, temp_suffix)


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; see :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode(encoding))


__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text", "is_temp_name", "temp_path_for"]
