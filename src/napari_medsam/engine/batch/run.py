"""Running a batch: each image group read and encoded once, rows written as masks plus ``summary.csv``.

:func:`run_batch` writes ``OUT/<name>.tif`` per row (uint8, 1 = object, the
image's spatial shape) and ``OUT/summary.csv``; rows sharing an image are read
and encoded once. A bad row is reported and skipped, never fatal. Every file is
written atomically. With ``gt``, Dice and NSD (2 px, or 2 mm when the image has a
spacing) are reported; for a volume row without ``propagate`` only the ``slice``
is scored. Runs on one process or a Dask cluster. No Qt, no napari.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

from napari_medsam.engine.cache import EmbeddingCache
from napari_medsam.engine.cases import load_ground_truth
from napari_medsam.engine.errors import BatchError, MedSAMError
from napari_medsam.engine.io import read_image, write_labels
from napari_medsam.engine.metrics import dice, nsd
from napari_medsam.engine.predictor import MedSAM
from napari_medsam.engine.segment import ImageSegmenter, check_device, load_model, model_spec
from napari_medsam.engine.types import Segmenter

from .prompts import PromptRow, group_rows, read_prompts
from .results import SUMMARY_FIELDS, SUMMARY_NAME, BatchResult, RowResult, RowStatus, write_summary

PathLike = Union[str, "os.PathLike[str]"]

log = logging.getLogger("napari_medsam.engine.batch")
_GROUP_CACHE_BYTES = 256 << 20  # in-memory embeddings of a batch run: rows are grouped, little reuse


# Worker-side model cache: one model per (model, device, checkpoint, exact) per process.
_WORKER_MODELS: dict[tuple[str, str, str | None, bool], MedSAM] = {}
_WORKER_CACHES: dict[str | None, EmbeddingCache] = {}
_WORKER_LOCK = threading.Lock()  # a threaded Dask worker runs several tasks in one process


def _worker_model(
    model: str, device: str, checkpoint: str | None, cache_dir: str | None, exact: bool = False
) -> MedSAM:
    key = (model, device, checkpoint, exact)
    with _WORKER_LOCK:
        m = _WORKER_MODELS.get(key)
        if m is None:
            m = _WORKER_MODELS[key] = load_model(model, device, checkpoint, exact=exact)
        if cache_dir not in _WORKER_CACHES:
            _WORKER_CACHES[cache_dir] = EmbeddingCache(
                max_bytes=_GROUP_CACHE_BYTES, disk_dir=Path(cache_dir) if cache_dir else None
            )
        m.cache = _WORKER_CACHES[cache_dir]
    return m


def check_output_dir(out_dir: Path) -> Path:
    """Create ``out_dir`` and prove a file can be written there; :class:`BatchError` naming why not.

    Run before the model is loaded, so an unwritable output fails the batch at once
    instead of after every row.
    """
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BatchError(f"cannot create output folder {out_dir}: {exc}") from None
    if (out_dir / SUMMARY_NAME).is_dir():
        raise BatchError(f"cannot write the summary into output folder {out_dir}: {SUMMARY_NAME} there is a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=out_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise BatchError(f"cannot write into output folder {out_dir}: {exc.strerror or exc}") from None
    return out_dir


# ---------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------
def _base_result(r: PromptRow) -> RowResult:
    return RowResult(r.row, r.name, str(r.image) if r.image is not None else r.image_text, r.modality)


def _fail(res: RowResult, exc: BaseException) -> RowResult:
    res.status = RowStatus.ERROR
    msg = str(exc) if isinstance(exc, MedSAMError) else f"{type(exc).__name__}: {exc}"
    res.error = " ".join(msg.split())  # one line
    return res


def _log_unexpected(exc: BaseException, what: str) -> None:
    """A row error that is not a MedSAMError may be a bug: keep its traceback in the log."""
    if not isinstance(exc, MedSAMError):
        log.warning("napari-medsam batch: %s failed unexpectedly", what, exc_info=exc)


def run_group(
    model: Segmenter, rows: Sequence[PromptRow], out_dir: PathLike, base: Path | None = None
) -> list[RowResult]:
    """Run the rows of one image (read and encoded once); never raises for a row's problem."""
    out_dir = Path(out_dir)
    results = [_base_result(r) for r in rows]
    try:
        image = read_image(rows[0].image)  # type: ignore[arg-type]  # runnable rows have an image
    except Exception as exc:  # noqa: BLE001 - unreadable image: every row of it fails alike (logged)
        _log_unexpected(exc, f"image {rows[0].image}")
        return [_fail(res, exc) for res in results]
    session = ImageSegmenter(model, image)
    for r, res in zip(rows, results, strict=True):
        t0 = time.perf_counter()
        try:
            if r.box is None:  # group_rows keeps only rows that parsed
                raise BatchError(f"row {r.row} has no box")
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
        except Exception as exc:  # noqa: BLE001 - a bad row is reported and skipped (logged if unexpected)
            _log_unexpected(exc, f"row {r.row} ({r.name})")
            _fail(res, exc)
        res.total_s = time.perf_counter() - t0
    return results


def _run_group_task(
    rows: list[PromptRow],
    out_dir: str,
    base: Path,
    model: str,
    device: str,
    checkpoint: str | None,
    cache_dir: str | None,
    exact: bool = False,
) -> list[RowResult]:
    """Dask task: the worker's cached model runs one image group."""
    m = _worker_model(model, device, checkpoint, cache_dir, exact)
    return run_group(m, rows, out_dir, base)


def _stderr(msg: str) -> None:
    try:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)
    except ImportError:  # pragma: no cover
        print(msg, file=sys.stderr)


def _dask_client(workers: int | None, scheduler: str | None) -> tuple[Any, Any]:
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError as exc:
        raise BatchError(
            f"--workers / --scheduler need dask.distributed ({exc}): pip install 'napari-medsam[dask]'"
        ) from None
    try:
        if scheduler:
            return Client(scheduler, timeout="30s"), None
        cluster = LocalCluster(
            n_workers=int(workers or 1),
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
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
    model: str | MedSAM = "litemedsam",
    device: str = "auto",
    checkpoint: str | None = None,
    workers: int | None = None,
    scheduler: str | None = None,
    cache_dir: PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = _stderr,
    fast: bool = False,
    exact: bool = False,
) -> BatchResult:
    """Segment every row of ``prompts_csv`` into ``out_dir``; see the module docstring.

    Args:
        model: registry name, or a loaded :class:`MedSAM` (single process only).
        workers: run on a local Dask cluster of this many single-threaded processes.
        scheduler: address of a running Dask scheduler (workers must see the same files).
        cache_dir: on-disk embedding cache shared by all workers (and later runs).
        progress: show a tqdm bar on stderr.
        log: called with one line per failed row (default: stderr); None for silence.
        exact: load the model with the authors' pipeline end to end (``MedSAM.load(exact=True)``);
            default: the fastest path that keeps the masks. Ignored when ``model`` is already loaded.
        fast: accepted for compatibility, no effect (the fast path is the default).

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
    out_dir = check_output_dir(Path(out_dir).expanduser())
    cache_dir = str(Path(cache_dir).expanduser().resolve()) if cache_dir else None
    distributed = workers is not None or bool(scheduler)

    results: dict[int, RowResult] = {}
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
            cache = EmbeddingCache(max_bytes=_GROUP_CACHE_BYTES, disk_dir=Path(cache_dir) if cache_dir else None)
            m = load_model(model, device, checkpoint, cache=cache, exact=exact)
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

    def report(res_list: list[RowResult]) -> None:
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
            _run_distributed(client, groups, out_dir, base, spec.name, device, checkpoint, cache_dir, report, exact)
    finally:
        bar.close()
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()

    ordered = [results[r.row] for r in rows]
    summary = write_summary(out_dir / SUMMARY_NAME, ordered)
    return BatchResult(ordered, out_dir, summary, time.perf_counter() - t_start)


def _run_distributed(
    client: Any,
    groups: list[list[PromptRow]],
    out_dir: Path,
    base: Path,
    model: str,
    device: str,
    checkpoint: str | None,
    cache_dir: str | None,
    report: Callable[[list[RowResult]], None],
    exact: bool = False,
) -> None:
    """One task per image group; results reported as they complete."""
    from dask.distributed import as_completed

    out_abs = str(Path(out_dir).resolve())
    futures = {}
    for g in groups:
        fut = client.submit(_run_group_task, g, out_abs, base, model, device, checkpoint, cache_dir, exact, pure=False)
        futures[fut] = g
    for fut in as_completed(list(futures)):
        g = futures[fut]
        try:
            res = fut.result()
        except Exception as exc:  # noqa: BLE001 - the task died (worker lost, model failed to load there)
            _log_unexpected(exc, f"task of {g[0].image}")
            res = [_fail(_base_result(r), exc) for r in g]
        report(res)


__all__ = ["SUMMARY_FIELDS", "SUMMARY_NAME", "BatchResult", "RowResult", "run_batch", "run_group", "write_summary"]
