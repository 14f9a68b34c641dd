"""The prompts CSV of a batch run: one box prompt per row, parsed into :class:`PromptRow`.

A prompts file has one box prompt per row::

    image,box,modality,window,slice,propagate,z_range,gt,gt_select,name
    scans/a.png,"10,20,110,140",,,,,,masks/a.png,,a_lesion
    ct.nii.gz,"44,27,104,81",ct,"40,400",24,true,,,,liver

Only ``image`` and ``box`` are required. Relative paths are resolved against the
folder of the CSV. ``box`` is ``x0,y0,x1,y1`` (x = column, y = row, inclusive
pixel bounds; for a volume on slice ``slice``). ``window`` is ``level,width`` or a
preset name; ``propagate`` (true/false) segments the whole object in 3D from the
key slice; ``z_range`` (``first,last``) bounds the propagation. ``gt`` is a ground
truth mask (``file.npz:key`` works too) and ``gt_select`` picks the object in it
(``nonzero`` (default), ``value:N`` or ``component:N``). ``name`` defaults to
``<image stem>_<row number>`` (rows counted from 1).
"""

from __future__ import annotations

import csv
import math
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from napari_medsam.engine.cases import safe_name
from napari_medsam.engine.errors import BatchError, MedSAMError, PromptError, ReadError
from napari_medsam.engine.io import strip_image_suffix
from napari_medsam.engine.segment import parse_box_text, parse_z_range

PathLike = Union[str, "os.PathLike[str]"]
Box = tuple[float, float, float, float]

_TRUE = {"1", "true", "yes", "y", "on", "t"}
_FALSE = {"", "0", "false", "no", "n", "off", "f"}


@dataclass
class PromptRow:
    """One parsed row of a prompts CSV.

    Attributes:
        row: 1-based data row number (header not counted).
        image: resolved image path (None when the cell was empty).
        box: (x0, y0, x1, y1) or None when it could not be parsed.
        name: output stem (file-name safe).
        error: why the row cannot run, found while parsing (else None).
    """

    row: int
    image: Path | None
    image_text: str
    box: Box | None
    name: str
    modality: str = "auto"
    window: str | None = None
    slice: int | None = None
    propagate: bool = False
    z_range: tuple[int, int] | None = None
    gt: str | None = None
    gt_select: str = "nonzero"
    error: str | None = None


def _parse_bool(text: str, column: str) -> bool:
    t = (text or "").strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise PromptError(f"{column} must be true or false, got {text!r}")


def _parse_slice(text: str) -> int:
    """A slice index cell: an integer (``12``, ``12.0``, ``1e2``); never truncated, never overflowing."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value.is_integer()):  # inf / 1e400 / nan / 2.7
        raise PromptError(f"slice must be an integer, got {text!r}")
    return int(value)


def _stem(path: Path) -> str:
    return strip_image_suffix(path.name)  # the session's rule too (engine.io)


def resolve(text: str, base: Path) -> Path:
    """``text`` as a path, relative ones taken from ``base``."""
    p = Path(text.strip()).expanduser()
    return p if p.is_absolute() else base / p


def read_prompts(prompts_csv: PathLike) -> list[PromptRow]:
    """Parse a prompts CSV. Row problems are recorded in ``PromptRow.error``; a file that
    cannot be read or lacks the ``image`` / ``box`` columns raises :class:`BatchError`."""
    path = Path(prompts_csv).expanduser()
    if path.is_dir():
        raise BatchError(f"{path} is a folder, not a prompts CSV: give the CSV file's path")
    if not path.is_file():
        what = "is not a regular file (a pipe, device or socket)" if path.exists() else "does not exist"
        raise ReadError(f"prompts file {path} {what}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            raw = list(reader)
            records = [
                {(k or "").strip().lower(): (v if isinstance(v, str) else "") for k, v in rec.items()} for rec in raw
            ]
            # fields beyond the header (csv puts them under None): most often a box written without quotes
            extra = [len(rec.get(None) or ()) for rec in raw]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BatchError(f"cannot read prompts file {path}: {exc}") from exc
    missing = [c for c in ("image", "box") if c not in header]
    if missing:
        raise BatchError(
            f"prompts file {path} lacks the column(s) {', '.join(missing)} (has: {', '.join(header) or 'none'})"
        )
    base = path.resolve().parent
    rows: list[PromptRow] = []
    seen: dict[str, int] = {}
    for i, rec in enumerate(records, start=1):
        row = _parse_row(i, rec, base, seen)
        if row.error is not None and extra[i - 1]:
            row.error += (
                f" (the row has {extra[i - 1]} more fields than the header: quote a box that holds commas,"
                ' "x0,y0,x1,y1")'
            )
        seen.setdefault(row.name, i)
        rows.append(row)
    return rows


def _parse_row(i: int, rec: dict[str, str], base: Path, seen: dict[str, int]) -> PromptRow:
    def get(k: str) -> str:
        return (rec.get(k) or "").strip()

    image_text = get("image")
    image = resolve(image_text, base) if image_text else None
    stem = _stem(image) if image is not None else "row"
    name = safe_name(get("name") or f"{stem}_{i}")
    row = PromptRow(i, image, image_text, None, name, modality=get("modality") or "auto", window=get("window") or None)
    try:
        if image is None:
            raise ReadError("image is empty")
        row.box = parse_box_text(get("box"))
        if get("slice"):
            row.slice = _parse_slice(get("slice"))
        row.propagate = _parse_bool(get("propagate"), "propagate")
        if get("z_range"):
            row.z_range = parse_z_range(get("z_range"))
        if get("gt"):
            row.gt = get("gt")
            row.gt_select = get("gt_select") or "nonzero"
        if name in seen:
            raise PromptError(f"name {name!r} is already used by row {seen[name]}: give unique names")
    except (MedSAMError, ValueError) as exc:
        row.error = str(exc)
    return row


def group_rows(rows: Sequence[PromptRow]) -> list[list[PromptRow]]:
    """Runnable rows grouped by image (groups in order of first appearance)."""
    groups: OrderedDict[str, list[PromptRow]] = OrderedDict()
    for r in rows:
        if r.error is None:
            groups.setdefault(str(r.image), []).append(r)
    return list(groups.values())
