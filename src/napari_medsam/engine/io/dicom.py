"""DICOM readers: one file (single or multi-frame) or a folder holding one series."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from napari_medsam.engine.errors import ImageError, ReadError

from .formats import DICOM_SUFFIXES, ImageData, _kind, _suffix

log = logging.getLogger(__name__)


def _rescale(stack: np.ndarray, slopes: np.ndarray, intercepts: np.ndarray) -> np.ndarray:
    """Apply per-slice RescaleSlope/Intercept; int16 when exact, else float32."""
    if np.all(slopes == 1) and np.all(intercepts == 0):
        return stack
    shape = (-1,) + (1,) * (stack.ndim - 1)
    out = stack.astype(np.float64) * slopes.reshape(shape) + intercepts.reshape(shape)
    exact = np.all(slopes == np.round(slopes)) and np.all(intercepts == np.round(intercepts))
    if exact and out.min() >= -32768 and out.max() <= 32767:
        return out.astype(np.int16)
    return out.astype(np.float32)


def _dicom_meta(ds: Any, n_files: int) -> dict[str, Any]:
    modality = str(ds.get("Modality", "")).upper()
    uid = str(ds.get("SeriesInstanceUID", ""))
    meta = {"format": "dicom", "modality": modality, "series_uid": uid, "n_files": n_files}
    if modality in ("CT", "MR"):
        meta["modality_hint"] = modality.lower()
    return meta


def _slope_inter(ds: Any) -> tuple[float, float]:
    return float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)


def _pixel_spacing(ds: Any) -> tuple[float, float] | None:
    ps = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    return (float(ps[0]), float(ps[1])) if ps else None


def _read_dicom_file(path: Path) -> ImageData:
    import pydicom

    ds = pydicom.dcmread(path, force=_suffix(path) in DICOM_SUFFIXES)
    if "PixelData" not in ds:
        raise ReadError(f"{path}: DICOM file holds no pixel data")
    array = ds.pixel_array
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    stack = array if frames > 1 else array[None]
    slope, inter = _slope_inter(ds)
    stack = _rescale(stack, np.full(len(stack), slope), np.full(len(stack), inter))
    array = stack if frames > 1 else stack[0]
    rgb = int(ds.get("SamplesPerPixel", 1)) > 1
    kind = "rgb" if rgb and array.ndim == 3 else _kind(array, path)
    yx = _pixel_spacing(ds)
    spacing: tuple[float, ...] | None = yx
    if yx and kind == "volume":
        dz = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0
        spacing = (float(dz),) + yx
    return ImageData(array, spacing, None, str(path), kind, _dicom_meta(ds, 1))


def _slice_positions(headers: Any) -> np.ndarray | None:
    """Slice positions along the normal of ImageOrientationPatient, or None."""
    try:
        iop = np.asarray(headers[0].ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        return np.array([np.dot(normal, np.asarray(h.ImagePositionPatient, dtype=float)) for h in headers])
    except (AttributeError, TypeError, ValueError, IndexError):
        return None


def _read_dicom_dir(path: Path) -> ImageData:
    import pydicom

    series: dict[str, list[tuple[Path, Any]]] = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            hdr = pydicom.dcmread(f, stop_before_pixels=True, force=f.suffix.lower() in DICOM_SUFFIXES)
        except Exception as exc:  # noqa: BLE001 - any failure means "not DICOM": skip it, like ITK's series reader
            log.debug("skipping %s: not a readable DICOM header (%s)", f, exc)
            continue
        if "Rows" in hdr and "Columns" in hdr:
            series.setdefault(str(hdr.get("SeriesInstanceUID", "")), []).append((f, hdr))
    if not series:
        raise ReadError(f"{path}: folder holds no DICOM image files")
    if len(series) > 1:
        listing = ", ".join(f"{uid or '(no UID)'} ({len(v)} files)" for uid, v in series.items())
        raise ReadError(f"{path}: folder holds {len(series)} DICOM series; pick one folder per series: {listing}")
    items = next(iter(series.values()))
    sizes = sorted({(int(h.Rows), int(h.Columns)) for _, h in items})
    if len(sizes) > 1:
        raise ImageError(f"{path}: DICOM series mixes slice sizes (rows, columns) {sizes}")
    if len(items) == 1:
        return _read_dicom_file(items[0][0])
    headers = [h for _, h in items]
    pos = _slice_positions(headers)
    keys = pos if pos is not None else [int(h.get("InstanceNumber", 0) or 0) for h in headers]
    order = np.argsort(keys, kind="stable")
    files = [items[i][0] for i in order]
    datasets = [pydicom.dcmread(f, force=f.suffix.lower() in DICOM_SUFFIXES) for f in files]
    if any(int(d.get("SamplesPerPixel", 1)) > 1 or int(d.get("NumberOfFrames", 1) or 1) > 1 for d in datasets):
        raise ImageError(f"{path}: colour or multi-frame DICOM series are not supported")
    stack = np.stack([d.pixel_array for d in datasets])
    slopes, inters = np.array([_slope_inter(d) for d in datasets]).T
    stack = _rescale(stack, slopes, inters)
    first = datasets[0]
    meta = _dicom_meta(first, len(files))
    gaps = np.abs(np.diff(pos[order])) if pos is not None else np.zeros(0)
    dz = float(np.median(gaps)) if gaps.size else 0.0
    if dz > 0:  # slice spacing from positions, as ITK does; SliceThickness can differ
        meta["irregular_slice_spacing"] = bool(np.ptp(gaps) > 0.01 * dz)
    else:
        dz = float(first.get("SpacingBetweenSlices") or first.get("SliceThickness") or 1.0)
    yx = _pixel_spacing(first)
    return ImageData(stack, (dz,) + yx if yx else None, None, str(path), "volume", meta)
