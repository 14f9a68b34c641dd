"""Batch segmentation from a prompts CSV, on one process or a Dask cluster.

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
(``nonzero`` (default), ``value:N`` or ``component:N``); then Dice and NSD (2 px,
or 2 mm when the image has a spacing) are reported; for a volume row without
``propagate`` only the ``slice`` is scored. ``name`` defaults to ``<image stem>_<row number>`` (rows counted from 1).

:func:`run_batch` writes ``OUT/<name>.tif`` per row (uint8, 1 = object, the
image's spatial shape) and ``OUT/summary.csv``; rows sharing an image are read
and encoded once. A bad row is reported and skipped, never fatal. Every file is
written atomically. No Qt, no napari.
"""

from __future__ import annotations

import csv
import io as _stdio
import math
import os
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .cache import EmbeddingCache
from .errors import BoxError, ImageError, MedSAMError, ReadError
from .evaluation import dice, nsd, safe_name

PathLike = Union[str, "os.PathLike[str]"]

SUMMARY_NAME = "summary.csv"
SUMMARY_FIELDS = [
    "name", "image", "modality", "status", "error", "iou", "dice", "nsd",
    "encode_s", "decode_s", "total_s", "mask",
]
_TRUE = {"1", "true", "yes", "y", "on", "t"}
_FALSE = {"", "0", "false", "no", "n", "off", "f"}
_GROUP_CACHE_BYTES = 256 << 20  # in-memory embeddings of a batch run: rows are grouped, little reuse


class BatchError(MedSAMError, ValueError):
    """The batch as a whole cannot run (bad prompts file, unknown model, no dask...)."""


# ---------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------
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
    image: Optional[Path]
    image_text: str
    box: Optional[Tuple[float, float, float, float]]
    name: str
    modality: str = "auto"
    window: Optional[str] = None
    slice: Optional[int] = None
    propagate: bool = False
    z_range: Optional[Tuple[int, int]] = None
    gt: Optional[str] = None
    gt_select: str = "nonzero"
    error: Optional[str] = None


@dataclass
class RowResult:
    """The outcome of one prompt row (one line of ``summary.csv``)."""

    row: int
    name: str
    image: str
    modality: str
    status: str = "ok"
    error: str = ""
    iou: Optional[float] = None
    dice: Optional[float] = None
    nsd: Optional[float] = None
    encode_s: Optional[float] = None
    decode_s: Optional[float] = None
    total_s: Optional[float] = None
    mask: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def csv_row(self) -> Dict[str, str]:
        def fmt(v, digits=6):
            return "" if v is None else f"{v:.{digits}g}"

        return {
            "name": self.name, "image": self.image, "modality": self.modality, "status": self.status,
            "error": self.error, "iou": fmt(self.iou), "dice": fmt(self.dice), "nsd": fmt(self.nsd),
            "encode_s": fmt(self.encode_s, 4), "decode_s": fmt(self.decode_s, 4),
            "total_s": fmt(self.total_s, 4), "mask": self.mask,
        }


@dataclass
class BatchResult:
    """All row results (in prompts-file order) and where they were written."""

    rows: List[RowResult]
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
    def failed(self) -> List[RowResult]:
        return [r for r in self.rows if not r.ok]

    @property
    def exit_code(self) -> int:
        return 1 if self.n_failed else 0

    def by_name(self) -> Dict[str, RowResult]:
        return {r.name: r for r in self.rows}

    def by_modality(self) -> Dict[str, Dict[str, float]]:
        """Mean Dice / NSD per modality over the rows that have them (``n`` = such rows)."""
        out: Dict[str, Dict[str, float]] = {}
        for mod in sorted({r.modality for r in self.rows}):
            scored = [r for r in self.rows if r.modality == mod and r.ok and r.dice is not None]
            if scored:
                out[mod] = {
                    "n": len(scored),
                    "dice": float(np.mean([r.dice for r in scored])),
                    "nsd": float(np.mean([r.nsd for r in scored if r.nsd is not None])) if any(r.nsd is not None for r in scored) else float("nan"),
                }
        return out


def parse_box_text(text) -> Tuple[float, float, float, float]:
    """``"x0,y0,x1,y1"`` (or a 4-sequence) -> four finite floats; :class:`BoxError` otherwise."""
    if text is None or (isinstance(text, str) and not text.strip()):
        raise BoxError("box is empty: give 'x0,y0,x1,y1'")
    try:
        vals = [float(v) for v in (text.replace(" ", "").strip("()[]").split(",") if isinstance(text, str) else text)]
    except (TypeError, ValueError):
        raise BoxError(f"box {text!r} is not 'x0,y0,x1,y1' (four numbers)") from None
    if len(vals) != 4:
        raise BoxError(f"box {text!r} has {len(vals)} values; a box is 'x0,y0,x1,y1'")
    if not all(math.isfinite(v) for v in vals):
        raise BoxError(f"box {text!r} has NaN or infinite coordinates")
    return tuple(vals)


def _parse_bool(text: str, column: str) -> bool:
    t = (text or "").strip().lower()
    if t in _TRUE:
        return True
    if t in _FALSE:
        return False
    raise ValueError(f"{column} must be true or false, got {text!r}")


def _stem(path: Path) -> str:
    name = path.name
    for suf in (".nii.gz", ".ome.tiff", ".ome.tif"):
        if name.lower().endswith(suf):
            return name[: -len(suf)]
    return path.stem or name


def _resolve(text: str, base: Path) -> Path:
    p = Path(text.strip()).expanduser()
    return p if p.is_absolute() else base / p


def read_prompts(prompts_csv: PathLike) -> List[PromptRow]:
    """Parse a prompts CSV. Row problems are recorded in ``PromptRow.error``; a file that
    cannot be read or lacks the ``image`` / ``box`` columns raises :class:`BatchError`."""
    path = Path(prompts_csv).expanduser()
    if not path.is_file():
        raise ReadError(f"prompts file {path} does not exist")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [h.strip().lower() for h in (reader.fieldnames or [])]
            records = [{(k or "").strip().lower(): (v if isinstance(v, str) else "") for k, v in rec.items()} for rec in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise BatchError(f"cannot read prompts file {path}: {exc}") from exc
    missing = [c for c in ("image", "box") if c not in header]
    if missing:
        raise BatchError(f"prompts file {path} lacks the column(s) {', '.join(missing)} (has: {', '.join(header) or 'none'})")
    base = path.resolve().parent
    rows: List[PromptRow] = []
    seen: Dict[str, int] = {}
    for i, rec in enumerate(records, start=1):
        get = lambda k: (rec.get(k) or "").strip()  # noqa: E731
        image_text = get("image")
        image = _resolve(image_text, base) if image_text else None
        stem = _stem(image) if image is not None else "row"
        name = safe_name(get("name") or f"{stem}_{i}")
        row = PromptRow(i, image, image_text, None, name, modality=get("modality") or "auto", window=get("window") or None)
        try:
            if image is None:
                raise ReadError("image is empty")
            row.box = parse_box_text(get("box"))
            if get("slice"):
                try:
                    row.slice = int(float(get("slice")))
                except ValueError:
                    raise ValueError(f"slice must be an integer, got {get('slice')!r}") from None
            row.propagate = _parse_bool(get("propagate"), "propagate")
            if get("z_range"):
                try:
                    z = [int(float(v)) for v in get("z_range").split(",")]
                    assert len(z) == 2
                except (ValueError, AssertionError):
                    raise ValueError(f"z_range must be 'first,last', got {get('z_range')!r}") from None
                row.z_range = (min(z), max(z))
            if get("gt"):
                row.gt = get("gt")
                row.gt_select = get("gt_select") or "nonzero"
            if name in seen:
                raise ValueError(f"name {name!r} is already used by row {seen[name]}: give unique names")
        except (MedSAMError, ValueError) as exc:
            row.error = str(exc)
        seen.setdefault(name, i)
        rows.append(row)
    return rows


def group_rows(rows: Sequence[PromptRow]) -> List[List[PromptRow]]:
    """Runnable rows grouped by image (groups in order of first appearance)."""
    groups: "OrderedDict[str, List[PromptRow]]" = OrderedDict()
    for r in rows:
        if r.error is None:
            groups.setdefault(str(r.image), []).append(r)
    return list(groups.values())


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------
def check_device(device: str) -> str:
    import torch

    dev = (device or "auto").strip().lower()
    if dev == "auto":
        return dev
    try:
        d = torch.device(dev)
    except RuntimeError:
        raise BatchError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise BatchError(f"device {device!r} asked for but CUDA is not available here: use --device cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise BatchError(f"device {device!r} is not available: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if d.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BatchError(f"device {device!r} asked for but MPS is not available here: use --device cpu")
    return dev


def model_spec(name: str):
    from .models.registry import get_spec

    try:
        return get_spec(name)
    except KeyError as exc:
        raise BatchError(str(exc.args[0])) from None


def load_model(model="litemedsam", device: str = "auto", checkpoint: Optional[str] = None,
               cache: Optional[EmbeddingCache] = None, fast: bool = False):
    """A :class:`MedSAM` from a registry name (an existing instance is returned as is).

    ``fast``: the opt-in speed-ups of ``MedSAM.load(fast=True)`` (engine/fast.py).
    """
    from .predictor import MedSAM

    if isinstance(model, MedSAM):
        return model
    spec = model_spec(model)
    return MedSAM.load(spec.name, check_device(device), checkpoint, cache=cache, fast=True if fast else None)


# Worker-side model cache: one model per (model, device, checkpoint, fast) per process.
_WORKER_MODELS: Dict[Tuple[str, str, Optional[str], bool], object] = {}
_WORKER_CACHES: Dict[Optional[str], EmbeddingCache] = {}


def _worker_model(model: str, device: str, checkpoint: Optional[str], cache_dir: Optional[str], fast: bool = False):
    key = (model, device, checkpoint, fast)
    m = _WORKER_MODELS.get(key)
    if m is None:
        m = _WORKER_MODELS[key] = load_model(model, device, checkpoint, fast=fast)
    if cache_dir not in _WORKER_CACHES:
        _WORKER_CACHES[cache_dir] = EmbeddingCache(max_bytes=_GROUP_CACHE_BYTES, disk_dir=cache_dir)
    m.cache = _WORKER_CACHES[cache_dir]
    return m


# ---------------------------------------------------------------------------
# one image, one box
# ---------------------------------------------------------------------------
@dataclass
class Segmentation:
    """A mask for one prompt and what it cost.

    Attributes:
        mask: bool, the image's spatial shape ((H, W) or (Z, H, W)).
        iou: decoder's predicted IoU (3D propagation: on the key slice).
        encode_s / decode_s: seconds in the encoder (0 when the embedding was reused) and
            decoder; None for 3D propagation (many slices: see ``stats`` and the row's total).
    """

    mask: np.ndarray
    iou: Optional[float]
    encode_s: Optional[float]
    decode_s: Optional[float]
    box: Optional[np.ndarray] = None
    stats: Optional[dict] = None  # 3D propagation: encoder counters, per-slice trace (see engine.volume)


def _volume_api():
    try:
        from . import volume  # noqa: F401
    except ImportError as exc:
        raise MedSAMError(
            f"3D propagation is not available in this build (napari_medsam.engine.volume cannot be imported: {exc})"
        ) from None


class ImageSession:
    """One image read once, with its embeddings, answering many prompts."""

    def __init__(self, model, image):
        self.model = model
        self.image = image  # io.ImageData
        self._emb: Dict[tuple, object] = {}
        self._u8: Dict[tuple, np.ndarray] = {}

    @property
    def is_volume(self) -> bool:
        return self.image.kind == "volume"

    @property
    def spatial_shape(self) -> Tuple[int, ...]:
        a = self.image.array
        return tuple(a.shape[:2]) if self.image.kind == "rgb" else tuple(a.shape)

    def _embedding(self, key: tuple, make: Callable[[], object]) -> Tuple[object, float]:
        if key in self._emb:
            return self._emb[key], 0.0
        t0 = time.perf_counter()
        emb = make()
        self._emb[key] = emb
        return emb, time.perf_counter() - t0

    def _volume_u8(self, modality: str, window) -> np.ndarray:
        from .intensity import parse_window, resolve_modality, to_uint8

        key = (modality, parse_window(window))
        if key not in self._u8:
            vol = self.image.array
            if np.issubdtype(vol.dtype, np.floating) and not np.isfinite(vol).all():
                raise ImageError("volume has NaN or infinite voxels: fill or mask them first")
            self._u8[key] = to_uint8(vol, resolve_modality(vol, modality, window))
        return self._u8[key]

    def segment(self, box, modality: str = "auto", window=None, slice: Optional[int] = None,
                propagate: bool = False, z_range: Optional[Tuple[int, int]] = None) -> Segmentation:
        from .intensity import parse_window

        box = parse_box_text(box) if isinstance(box, str) else tuple(float(v) for v in box)
        if not all(math.isfinite(v) for v in box) or len(box) != 4:
            raise BoxError(f"box {list(box)} must be four finite numbers x0,y0,x1,y1")
        win = parse_window(window)
        if not self.is_volume:
            if slice is not None or propagate:
                raise ImageError(f"slice/propagate given but {self.image.path} is a 2D image of shape {self.image.array.shape}")
            emb, enc = self._embedding(("2d", modality, win), lambda: self.model.embed(self.image.array, modality, win))
            t0 = time.perf_counter()
            pred = self.model.predict(emb, box)
            return Segmentation(pred.masks[0], float(pred.iou[0]), enc, time.perf_counter() - t0, pred.boxes[0])
        depth = self.image.array.shape[0]
        if slice is None:
            raise ImageError(
                f"{self.image.path} is a volume of shape {self.image.array.shape}: give the slice (0..{depth - 1}) the box is on"
            )
        if not 0 <= slice < depth:
            raise ImageError(f"slice {slice} is outside the volume (0..{depth - 1})")
        if propagate:
            _volume_api()
            stats: dict = {}
            kwargs = {"modality": modality, "window": win, "stats": stats}
            if z_range is not None:
                kwargs["z_range"] = z_range
            out = self.model.segment_volume(self.image.array, box, slice, **kwargs)
            mask = getattr(out, "mask", getattr(out, "masks", out))
            mask = np.asarray(mask).astype(bool)
            if mask.shape != self.spatial_shape:
                raise ImageError(f"3D propagation returned shape {mask.shape}, expected {self.spatial_shape}")
            key = [s for s in stats.get("slices", []) if s.get("direction") == "key"]
            iou = float(key[0]["iou"]) if key and key[0].get("iou") is not None else None
            return Segmentation(mask, iou, None, None, np.asarray(box, float), stats)
        # one slice of a volume: intensity rule over the whole volume, as the authors do
        u8 = self._volume_u8(modality, win)[slice]
        if u8.min() == u8.max():
            raise ImageError(f"slice {slice} is constant after the intensity rule: nothing to segment")
        rgb = np.ascontiguousarray(np.repeat(u8[:, :, None], 3, axis=-1))
        emb, enc = self._embedding(("slice", modality, win, slice), lambda: self.model.embed_rgb(rgb))
        t0 = time.perf_counter()
        pred = self.model.predict(emb, box)
        mask = np.zeros(self.spatial_shape, bool)
        mask[slice] = pred.masks[0]
        return Segmentation(mask, float(pred.iou[0]), enc, time.perf_counter() - t0, pred.boxes[0])


# ---------------------------------------------------------------------------
# ground truth
# ---------------------------------------------------------------------------
def load_ground_truth(spec: str, base: Optional[Path], select: str = "nonzero", like_shape: Optional[Tuple[int, ...]] = None) -> Tuple[np.ndarray, Optional[tuple]]:
    """Read a ground-truth mask (``file`` or ``file.npz:key``) and pick ``select``; returns (bool mask, spacing)."""
    from .io import read_image

    text, key = spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and head.lower().endswith(".npz"):
        text, key = head, tail
    path = _resolve(text, base) if base is not None else Path(text).expanduser()
    spacing = None
    if path.name.lower().endswith(".npz"):
        if not path.is_file():
            raise ReadError(f"ground truth {path} does not exist")
        try:
            with np.load(path) as z:
                k = key or ("segs" if "segs" in z.files else z.files[0])
                m = np.asarray(z[k])
        except Exception as exc:
            raise ReadError(f"cannot read ground truth {path}: {exc}") from exc
    else:
        gt = read_image(path)
        m, spacing = gt.array, gt.spacing
    if like_shape is not None and m.ndim == 3 and len(like_shape) == 2 and m.shape[:2] == tuple(like_shape):
        m = m[..., 0]
    kind, _, val = (select or "nonzero").partition(":")
    try:
        if kind == "value":
            out = m == int(val)
        elif kind == "component":
            from scipy import ndimage

            lab, _ = ndimage.label(m > 0)
            out = lab == int(val)
        elif kind == "nonzero":
            out = m > 0
        else:
            raise ValueError
    except ValueError:
        raise ImageError(f"gt_select must be nonzero, value:N or component:N, got {select!r}") from None
    if like_shape is not None and out.shape != tuple(like_shape):
        raise ImageError(f"ground truth {path} has shape {out.shape}, the image {tuple(like_shape)}")
    return out, spacing


# ---------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------
def _base_result(r: PromptRow) -> RowResult:
    return RowResult(r.row, r.name, str(r.image) if r.image is not None else r.image_text, r.modality)


def _fail(res: RowResult, exc: BaseException) -> RowResult:
    res.status = "error"
    msg = str(exc) if isinstance(exc, MedSAMError) else f"{type(exc).__name__}: {exc}"
    res.error = " ".join(msg.split())  # one line
    return res


def run_group(model, rows: Sequence[PromptRow], out_dir: PathLike, base: Optional[Path] = None) -> List[RowResult]:
    """Run the rows of one image (read and encoded once); never raises for a row's problem."""
    from .io import read_image, write_labels

    out_dir = Path(out_dir)
    results = [_base_result(r) for r in rows]
    try:
        image = read_image(rows[0].image)
    except Exception as exc:  # unreadable image: every row of it fails alike
        return [_fail(res, exc) for res in results]
    session = ImageSession(model, image)
    for r, res in zip(rows, results):
        t0 = time.perf_counter()
        try:
            seg = session.segment(r.box, r.modality, r.window, r.slice, r.propagate, r.z_range)
            res.iou, res.encode_s, res.decode_s = seg.iou, seg.encode_s, seg.decode_s
            labels = seg.mask.astype(np.uint8)
            target = write_labels(out_dir / f"{r.name}.tif", labels, like=image)
            res.mask = target.name
            if r.gt:
                gt, gt_spacing = load_ground_truth(r.gt, base, r.gt_select, session.spatial_shape)
                spacing = image.spacing or gt_spacing
                pred = seg.mask
                if session.is_volume and not r.propagate:  # a single slice: score that slice
                    pred, gt = pred[r.slice], gt[r.slice]
                    spacing = spacing[1:] if spacing is not None else None
                if spacing is not None and len(spacing) != gt.ndim:
                    spacing = None
                res.dice = dice(pred, gt)
                res.nsd = nsd(pred, gt, spacing=spacing)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # a bad row is reported and skipped
            _fail(res, exc)
        res.total_s = time.perf_counter() - t0
    return results


def _run_group_task(rows, out_dir, base, model, device, checkpoint, cache_dir, fast=False):
    """Dask task: the worker's cached model runs one image group."""
    m = _worker_model(model, device, checkpoint, cache_dir, fast)
    return run_group(m, rows, out_dir, base)


def _stderr(msg: str) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)
    except ImportError:  # pragma: no cover
        print(msg, file=sys.stderr)


def write_summary(path: PathLike, results: Sequence[RowResult]) -> Path:
    """Write ``summary.csv`` atomically (one line per prompt row, in file order)."""
    from .io import atomic_write_text

    buf = _stdio.StringIO()
    w = csv.DictWriter(buf, fieldnames=SUMMARY_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in results:
        w.writerow(r.csv_row())
    return atomic_write_text(path, buf.getvalue())


def _dask_client(workers: Optional[int], scheduler: Optional[str]):
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError as exc:
        raise BatchError(
            f"--workers / --scheduler need dask.distributed ({exc}): pip install 'napari-medsam[dask]'"
        ) from None
    import logging

    try:
        if scheduler:
            return Client(scheduler, timeout="30s"), None
        cluster = LocalCluster(
            n_workers=int(workers), threads_per_worker=1, processes=True,
            dashboard_address=None, silence_logs=logging.ERROR,
        )
        return Client(cluster), cluster
    except (OSError, TimeoutError) as exc:
        raise BatchError(f"cannot reach the Dask scheduler {scheduler or '(local cluster)'}: {exc}") from None
    except RuntimeError as exc:  # e.g. "Nanny failed to start"
        raise BatchError(
            f"cannot start a local Dask cluster of {workers} workers ({exc}); from a script, call run_batch "
            "under `if __name__ == '__main__':` (worker processes re-import the main module)"
        ) from None


def run_batch(
    prompts_csv: PathLike,
    out_dir: PathLike,
    model="litemedsam",
    device: str = "auto",
    checkpoint: Optional[str] = None,
    workers: Optional[int] = None,
    scheduler: Optional[str] = None,
    cache_dir: Optional[PathLike] = None,
    progress: bool = True,
    log: Optional[Callable[[str], None]] = _stderr,
    fast: bool = False,
) -> BatchResult:
    """Segment every row of ``prompts_csv`` into ``out_dir``; see the module docstring.

    Args:
        model: registry name, or a loaded :class:`MedSAM` (single process only).
        workers: run on a local Dask cluster of this many single-threaded processes.
        scheduler: address of a running Dask scheduler (workers must see the same files).
        cache_dir: on-disk embedding cache shared by all workers (and later runs).
        progress: show a tqdm bar on stderr.
        log: called with one line per failed row (default: stderr); None for silence.
        fast: load the model with the opt-in speed-ups (``MedSAM.load(fast=True)``; ignored
            when ``model`` is already loaded).

    Raises:
        MedSAMError: the batch cannot start (prompts file, model, checkpoint, device, dask).
    """
    t_start = time.perf_counter()
    if workers is not None and scheduler:
        raise BatchError("give either workers or scheduler, not both")
    if workers is not None and int(workers) < 1:
        raise BatchError(f"workers must be at least 1, got {workers}")
    prompts_csv = Path(prompts_csv).expanduser()
    rows = read_prompts(prompts_csv)
    base = prompts_csv.resolve().parent
    out_dir = Path(out_dir).expanduser()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BatchError(f"cannot create output folder {out_dir}: {exc}") from None
    cache_dir = str(Path(cache_dir).expanduser().resolve()) if cache_dir else None
    distributed = workers is not None or bool(scheduler)

    results: Dict[int, RowResult] = {}
    for r in rows:
        if r.error is not None:
            results[r.row] = _fail(_base_result(r), BatchError(r.error))
    groups = group_rows(rows)

    # set up first (model or cluster), so setup errors come before any progress output
    m = client = cluster = None
    if not distributed:
        if isinstance(model, str):
            model_spec(model)
        if groups:
            cache = EmbeddingCache(max_bytes=_GROUP_CACHE_BYTES, disk_dir=cache_dir)
            m = load_model(model, device, checkpoint, cache=cache, fast=fast)
    else:
        if not isinstance(model, str):
            model = model.name  # workers load their own copy
        spec = model_spec(model)
        device = check_device(device)
        spec.locate_checkpoint(checkpoint)  # fail here, once, rather than on every worker
        if groups:
            client, cluster = _dask_client(workers, scheduler)

    from tqdm import tqdm

    bar = tqdm(total=len(rows), desc="napari-medsam batch", unit="row", disable=not progress, file=sys.stderr)
    bar.update(len(results))

    def report(res_list: List[RowResult]) -> None:
        for res in res_list:
            results[res.row] = res
            if not res.ok and log is not None:
                log(f"napari-medsam: row {res.row} ({res.name}): {res.error}")
        bar.update(len(res_list))

    if log is not None:
        for res in sorted(results.values(), key=lambda x: x.row):
            log(f"napari-medsam: row {res.row} ({res.name}): {res.error}")
    try:
        if m is not None:
            saved_cache = m.cache
            if cache_dir:
                m.cache = cache
            try:
                for g in groups:
                    report(run_group(m, g, out_dir, base))
            finally:
                m.cache = saved_cache
        elif client is not None:
            _run_distributed(client, groups, out_dir, base, spec.name, device, checkpoint, cache_dir, report, fast)
    finally:
        bar.close()
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()

    ordered = [results[r.row] for r in rows]
    summary = write_summary(out_dir / SUMMARY_NAME, ordered)
    return BatchResult(ordered, out_dir, summary, time.perf_counter() - t_start)


def _run_distributed(client, groups, out_dir, base, model, device, checkpoint, cache_dir, report, fast=False) -> None:
    """One task per image group; results reported as they complete."""
    from dask.distributed import as_completed

    out_abs = str(Path(out_dir).resolve())
    futures = {}
    for g in groups:
        fut = client.submit(_run_group_task, g, out_abs, base, model, device, checkpoint, cache_dir, fast, pure=False)
        futures[fut] = g
    for fut in as_completed(list(futures)):
        g = futures[fut]
        try:
            res = fut.result()
        except Exception as exc:  # the task itself died (worker lost, model failed to load there)
            res = [_fail(_base_result(r), exc) for r in g]
        report(res)


# ---------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------
DEMO_IMAGE = "busi_malignant_1.png"


@dataclass
class DemoResult:
    mask_path: Path
    overlay_path: Path
    box: Tuple[float, float, float, float]
    iou: float
    dice: float
    encode_s: float
    decode_s: float
    load_s: float
    model: str
    device: str
    checkpoint: Optional[str] = None
    extra: dict = field(default_factory=dict)


def overlay(image: np.ndarray, mask: np.ndarray, box=None, color=(255, 64, 32), alpha: float = 0.35) -> np.ndarray:
    """(H, W, 3) uint8: ``image`` with ``mask`` tinted, its outline drawn and ``box`` in green."""
    from scipy import ndimage

    img = np.asarray(image)
    if img.ndim == 3:
        img = img[..., :3]
    if img.dtype != np.uint8:
        f = img.astype(np.float64)
        img = ((f - f.min()) / max(f.max() - f.min(), 1e-8) * 255).astype(np.uint8)
    rgb = np.repeat(img[..., None], 3, -1) if img.ndim == 2 else img.copy()
    m = np.asarray(mask, bool)
    out = rgb.astype(np.float64)
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(color, float)
    edge = m & ~ndimage.binary_erosion(m, border_value=0)
    edge = ndimage.binary_dilation(edge)
    out[edge] = (255, 220, 0)
    out = out.astype(np.uint8)
    if box is not None:
        h, w = m.shape
        x0, y0, x1, y1 = [int(round(v)) for v in box]
        x0, x1 = max(0, min(x0, w - 1)), max(0, min(x1, w - 1))
        y0, y1 = max(0, min(y0, h - 1)), max(0, min(y1, h - 1))
        green = (0, 230, 0)
        out[y0, x0 : x1 + 1] = green
        out[y1, x0 : x1 + 1] = green
        out[y0 : y1 + 1, x0] = green
        out[y0 : y1 + 1, x1] = green
    return out


def samples_dir():
    """The bundled samples folder (a Traversable; a Path for normal installs)."""
    from importlib.resources import files

    return files("napari_medsam") / "samples"


def run_demo(out_dir: PathLike = "medsam-demo", model="litemedsam", device: str = "auto", checkpoint: Optional[str] = None) -> DemoResult:
    """Segment the bundled breast-ultrasound sample with its box; write mask TIFF + overlay PNG."""
    from importlib.resources import as_file

    from PIL import Image

    from .evaluation import load_cases
    from .io import atomic_write_bytes, read_image, write_labels

    out_dir = Path(out_dir).expanduser()
    with as_file(samples_dir()) as sdir:
        cases = [c for c in load_cases(Path(sdir), dims=2) if c.image.name == DEMO_IMAGE]
        if not cases:
            raise BatchError(f"the bundled samples have no case for {DEMO_IMAGE}: reinstall napari-medsam")
        case = cases[0]
        image = read_image(case.image)
        gt = case.ground_truth()
    t0 = time.perf_counter()
    m = load_model(model, device, checkpoint)
    load_s = time.perf_counter() - t0
    session = ImageSession(m, image)
    seg = session.segment(case.box, "auto")
    stem = Path(DEMO_IMAGE).stem
    mask_path = write_labels(out_dir / f"{stem}_mask.tif", seg.mask.astype(np.uint8), like=image)
    buf = _stdio.BytesIO()
    Image.fromarray(overlay(image.array, seg.mask, case.box)).save(buf, format="PNG")
    overlay_path = atomic_write_bytes(out_dir / f"{stem}_overlay.png", buf.getvalue())
    return DemoResult(
        mask_path, overlay_path, case.box, float(seg.iou), dice(seg.mask, gt), float(seg.encode_s), float(seg.decode_s),
        load_s, m.name, str(m.device), m.checkpoint, {"case": case.case},
    )


__all__ = [
    "BatchError", "PromptRow", "RowResult", "BatchResult", "Segmentation", "ImageSession", "DemoResult",
    "read_prompts", "group_rows", "parse_box_text", "load_model", "load_ground_truth", "run_group",
    "run_batch", "write_summary", "overlay", "run_demo", "samples_dir", "SUMMARY_FIELDS",
]
