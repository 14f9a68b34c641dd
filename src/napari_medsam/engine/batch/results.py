"""What a batch run reports: one :class:`RowResult` per prompt row, the :class:`BatchResult`, ``summary.csv``."""

from __future__ import annotations

import csv
import io as _stdio
import os
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Union

import numpy as np

from napari_medsam.engine.io import atomic_write_text

PathLike = Union[str, "os.PathLike[str]"]
SUMMARY_NAME = "summary.csv"
SUMMARY_FIELDS = [
    "name",
    "image",
    "modality",
    "status",
    "error",
    "iou",
    "dice",
    "nsd",
    "encode_s",
    "decode_s",
    "total_s",
    "mask",
]


class RowStatus(str, Enum):
    """A row's outcome, the ``status`` column of ``summary.csv``."""

    OK = "ok"
    ERROR = "error"


@dataclass
class RowResult:
    """The outcome of one prompt row (one line of ``summary.csv``)."""

    row: int
    name: str
    image: str
    modality: str
    status: RowStatus = RowStatus.OK
    error: str = ""
    iou: float | None = None
    dice: float | None = None
    nsd: float | None = None
    encode_s: float | None = None
    decode_s: float | None = None
    total_s: float | None = None
    mask: str = ""

    @property
    def ok(self) -> bool:
        return self.status == RowStatus.OK  # also when set as the text "ok"

    def csv_row(self) -> dict[str, str]:
        def fmt(v: float | None, digits: int = 6) -> str:
            return "" if v is None else f"{v:.{digits}g}"

        return {
            "name": self.name,
            "image": self.image,
            "modality": self.modality,
            "status": RowStatus(self.status).value,
            "error": self.error,
            "iou": fmt(self.iou),
            "dice": fmt(self.dice),
            "nsd": fmt(self.nsd),
            "encode_s": fmt(self.encode_s, 4),
            "decode_s": fmt(self.decode_s, 4),
            "total_s": fmt(self.total_s, 4),
            "mask": self.mask,
        }


@dataclass
class BatchResult:
    """All row results (in prompts-file order) and where they were written."""

    rows: list[RowResult]
    out_dir: Path
    summary_path: Path
    seconds: float = 0.0

    @property
    def n_ok(self) -> int:
        return sum(r.ok for r in self.rows)

    @property
    def n_failed(self) -> int:
        return len(self.rows) - self.n_ok

    @property
    def failed(self) -> list[RowResult]:
        return [r for r in self.rows if not r.ok]

    @property
    def exit_code(self) -> int:
        return 1 if self.n_failed else 0

    def by_name(self) -> dict[str, RowResult]:
        return {r.name: r for r in self.rows}

    def by_modality(self) -> dict[str, dict[str, float]]:
        """Mean Dice / NSD per modality over the rows that have them (``n`` = such rows)."""
        out: dict[str, dict[str, float]] = {}
        for mod in sorted({r.modality for r in self.rows}):
            scored = [r for r in self.rows if r.modality == mod and r.ok and r.dice is not None]
            if scored:
                out[mod] = {
                    "n": len(scored),
                    "dice": float(np.mean([r.dice for r in scored])),
                    "nsd": float(np.mean([r.nsd for r in scored if r.nsd is not None]))
                    if any(r.nsd is not None for r in scored)
                    else float("nan"),
                }
        return out


def write_summary(path: PathLike, results: Sequence[RowResult]) -> Path:
    """Write ``summary.csv`` atomically (one line per prompt row, in file order)."""
    buf = _stdio.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in results:
        w.writerow(r.csv_row())
    return atomic_write_text(path, buf.getvalue())


__all__ = ["SUMMARY_FIELDS", "SUMMARY_NAME", "BatchResult", "RowResult", "write_summary"]
