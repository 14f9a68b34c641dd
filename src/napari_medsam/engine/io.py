"""Read images (PNG/JPEG/BMP, TIFF, NIfTI, DICOM) and write label maps atomically.

Arrays come back in the axis order SimpleITK's ``GetArrayFromImage`` uses:
``(y, x)``, ``(y, x, 3|4)`` or ``(z, y, x)``, never reoriented. Writers go through a
temporary file in the target directory followed by ``os.replace``, so a crash
never leaves a half-written target behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import numpy as np

from .errors import ImageError, MedSAMError, ReadError

PathLike = Union[str, "os.PathLike[str]"]
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
SUPPORTED = "PNG, JPEG, BMP, TIFF (.tif/.tiff), NIfTI (.nii/.nii.gz), DICOM file or folder"
_MM_PER_UNIT = {2: 25.4, 3: 10.0}  # TIFF ResolutionUnit: inch, centimetre


@dataclass
class ImageData:
    """An image as read from disk.

    Attributes:
      array (np.ndarray): pixels, ``(H, W)``, ``(H, W, 3|4)`` or ``(Z, Y, X)``.
      spacing (tuple(float) or None): pixel size per spatial array axis, in array
        axis order (mm for medical formats, the file's unit otherwise).
      affine (np.ndarray or None): 4x4 source affine of a NIfTI file.
      path (str or None): where the image came from.
      kind (str): ``"2d"``, ``"rgb"`` or ``"volume"``.
      meta (dict): extra facts, e.g. ``{"modality_hint": "ct"}``.
    """

    array: np.ndarray
    spacing: Optional[Tuple[float, ...]] = None
    affine: Optional[np.ndarray] = None
    path: Optional[str] = None
    kind: str = "2d"
    meta: Dict = field(default_factory=dict)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _kind(array: np.ndarray, path: Path) -> str:
    """Classify an array as 2d/rgb/volume, raising ImageError on anything else."""
    if array.size == 0:
        raise ImageError(f"{path}: image is empty (shape {array.shape})")
    if array.ndim == 2:
        return "2d"
    if array.ndim == 3:
        return "volume"
    raise ImageError(f"{path}: unsupported image shape {array.shape}; expected 2D or 3D")


def read_image(path: PathLike) -> ImageData:
    """Read an image file or a DICOM series folder.

    Arguments:
      path (str or Path): a PNG/JPEG/BMP, TIFF, NIfTI or DICOM file, or a folder
        holding a single DICOM series.

    Returns:
      (ImageData): the pixels, spacing and source metadata.

    Raises:
      ReadError: the path is missing, unreadable, corrupt or of an unknown type.
      ImageError: the file was read but its contents cannot be used.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise ReadError(f"{p} does not exist")
    suffix = _suffix(p)
    reader = _read_dicom_dir if p.is_dir() else _READERS.get(suffix)
    if reader is None and _has_dicom_preamble(p):
        reader = _read_dicom_file
    if reader is None:
        raise ReadError(f"{p}: unknown file type '{suffix or '(no suffix)'}'; supported: {SUPPORTED}")
    try:
        return reader(p)
    except (MedSAMError, MemoryError):
        raise
    except Exception as exc:  # any library failure means the file is unreadable
        raise ReadError(f"cannot read {p}: {type(exc).__name__}: {exc}") from exc


def _has_dicom_preamble(path: Path) -> bool:
    with contextlib.suppress(OSError), open(path, "rb") as fh:
        return fh.read(132)[128:132] == b"DICM"
    return False


def _read_pil(path: Path) -> ImageData:
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im.load()
        fmt = im.format
        im = ImageOps.exif_transpose(im)
        if im.mode in ("1", "LA"):
            im = im.convert("L")
        elif im.mode in ("P", "PA"):
            im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
        elif im.mode not in ("L", "RGB", "RGBA", "I", "F") and not im.mode.startswith("I;16"):
            im = im.convert("RGB")
        array = np.asarray(im)
        if im.mode == "I" and fmt == "PNG" and array.size and 0 <= array.min() and array.max() <= 65535:
            array = array.astype(np.uint16)  # older Pillow opens 16-bit PNG as int32
    if array.dtype.byteorder == ">":  # I;16B
        array = array.astype(array.dtype.newbyteorder("="))
    kind = "rgb" if array.ndim == 3 else _kind(array, path)
    return ImageData(np.ascontiguousarray(array), None, None, str(path), kind, {"format": "pil"})


def _read_tiff(path: Path) -> ImageData:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        series = tf.series[0]
        array, axes = series.asarray(), series.axes
        ij = tf.imagej_metadata or {}
        tags = tf.pages[0].tags
        res = [tags[t].value if t in tags else None for t in ("YResolution", "XResolution")]
        unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 1
    keep = [i for i, n in enumerate(array.shape) if n > 1 or axes[i] in "YX"]
    array, axes = array.reshape([array.shape[i] for i in keep]), "".join(axes[i] for i in keep)
    if array.ndim == 3 and axes.endswith("S") and array.shape[-1] in (3, 4):
        kind = "rgb"
    else:
        kind = _kind(array, path)
    meta = {"format": "tiff", "axes": axes}
    yx: List[Optional[float]] = []
    for r in res:
        known = r is not None and r[0] > 0 and tuple(r) != (1, 1)
        yx.append(r[1] / r[0] * _MM_PER_UNIT.get(unit, 1.0) if known else None)
    z = ij.get("spacing") if kind == "volume" else None
    spatial = ([z] if kind == "volume" else []) + yx
    spacing = None
    if any(s is not None for s in spatial):
        spacing = tuple(float(s) if s is not None else 1.0 for s in spatial)
        meta["spacing_unit"] = "mm" if unit in _MM_PER_UNIT else ij.get("unit", "pixel")
    return ImageData(array, spacing, None, str(path), kind, meta)


def _read_nifti(path: Path) -> ImageData:
    import nibabel as nib

    img = nib.load(str(path))
    array = np.asarray(img.dataobj)  # applies scl_slope/scl_inter like nibabel does
    zooms = tuple(float(z) for z in img.header.get_zooms())
    while array.ndim > 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3):
        raise ImageError(f"{path}: NIfTI has shape {array.shape}; only 2D and 3D images are supported")
    array = np.ascontiguousarray(array.T)  # (x, y[, z]) -> ([z,] y, x)
    spacing = zooms[: array.ndim][::-1]
    affine = np.array(img.affine, dtype=float)
    return ImageData(array, spacing, affine, str(path), _kind(array, path), {"format": "nifti"})


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


def _dicom_meta(ds, n_files: int) -> Dict:
    modality = str(ds.get("Modality", "")).upper()
    uid = str(ds.get("SeriesInstanceUID", ""))
    meta = {"format": "dicom", "modality": modality, "series_uid": uid, "n_files": n_files}
    if modality in ("CT", "MR"):
        meta["modality_hint"] = modality.lower()
    return meta


def _slope_inter(ds) -> Tuple[float, float]:
    return float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)


def _pixel_spacing(ds) -> Optional[Tuple[float, float]]:
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
    spacing = _pixel_spacing(ds)
    if spacing and kind == "volume":
        dz = ds.get("SpacingBetweenSlices") or ds.get("SliceThickness") or 1.0
        spacing = (float(dz),) + spacing
    return ImageData(array, spacing, None, str(path), kind, _dicom_meta(ds, 1))


def _slice_positions(headers) -> Optional[np.ndarray]:
    """Slice positions along the normal of ImageOrientationPatient, or None."""
    try:
        iop = np.asarray(headers[0].ImageOrientationPatient, dtype=float)
        normal = np.cross(iop[:3], iop[3:])
        return np.array([np.dot(normal, np.asarray(h.ImagePositionPatient, dtype=float)) for h in headers])
    except (AttributeError, TypeError, ValueError, IndexError):
        return None


def _read_dicom_dir(path: Path) -> ImageData:
    import pydicom

    series: Dict[str, List[Tuple[Path, object]]] = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        try:
            hdr = pydicom.dcmread(f, stop_before_pixels=True, force=f.suffix.lower() in DICOM_SUFFIXES)
        except Exception:  # not DICOM (or unreadable): skip it, like ITK's series reader
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


def _atomic_write(path: PathLike, writer: Callable[[Path], None]) -> Path:
    """Call ``writer(tmp)`` on a sibling temp file, fsync it, then replace ``path``."""
    target = Path(path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = _suffix(target)
    stem = target.name[: len(target.name) - len(suffix)] if suffix else target.name
    while True:
        tmp = target.with_name(f".{stem}.tmp-{secrets.token_hex(4)}{suffix}")
        with contextlib.suppress(FileExistsError):
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # mode follows umask
            break
    try:
        writer(tmp)
        _fsync(tmp, os.O_RDWR)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX only)
        with contextlib.suppress(OSError):
            _fsync(target.parent, os.O_RDONLY | os.O_DIRECTORY)
    return target


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file, fsync, ``os.replace``).

    Arguments:
      path (str or Path): target file; parent folders are created.
      data (bytes): the full new contents.

    Returns:
      (Path): the target path.
    """
    return _atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; see :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode(encoding))


def _compact(labels: np.ndarray) -> np.ndarray:
    """Shrink bool/64-bit label maps to the smallest integer dtype holding their ids."""
    if labels.dtype == bool:
        return labels.astype(np.uint8)
    if labels.dtype.itemsize < 8 or labels.size == 0:
        return labels
    lo, hi = int(labels.min()), int(labels.max())
    for dt in (np.uint8, np.uint16, np.int16, np.uint32, np.int32):
        if np.iinfo(dt).min <= lo and hi <= np.iinfo(dt).max:
            return labels.astype(dt)
    return labels


def _nifti_affine(labels: np.ndarray, like: Optional[ImageData]) -> np.ndarray:
    if like is not None and like.affine is not None:
        return np.asarray(like.affine, dtype=float)
    affine = np.eye(4)
    if like is not None and like.spacing is not None and len(like.spacing) == labels.ndim:
        affine[np.arange(labels.ndim), np.arange(labels.ndim)] = like.spacing[::-1]
    return affine


def write_labels(path: PathLike, labels: np.ndarray, like: Optional[ImageData] = None) -> Path:
    """Write a label map atomically as TIFF, NIfTI or PNG, chosen by suffix.

    Arguments:
      path (str or Path): target ``.tif/.tiff``, ``.nii/.nii.gz`` or ``.png``.
      labels (np.ndarray): integer or bool ids, ``(y, x)`` or ``(z, y, x)``.
      like (ImageData or None): the source image; gives the NIfTI affine (or
        spacing) and must match the labels' spatial shape.

    Returns:
      (Path): the written path.

    Raises:
      ImageError: labels are not integers, do not match ``like``, or do not fit PNG.
      ReadError: the suffix is not a supported label format.
    """
    target = Path(path).expanduser()
    labels = np.asarray(labels)
    if not (labels.dtype == bool or np.issubdtype(labels.dtype, np.integer)):
        raise ImageError(f"{target}: labels must be integers, got dtype {labels.dtype}")
    if labels.ndim not in (2, 3):
        raise ImageError(f"{target}: labels must be 2D or 3D, got shape {labels.shape}")
    if like is not None:
        shape = like.array.shape[:2] if like.kind == "rgb" else like.array.shape
        if tuple(shape) != labels.shape:
            raise ImageError(f"{target}: labels shape {labels.shape} does not match image shape {tuple(shape)}")
    labels = _compact(labels)
    suffix = _suffix(target)
    if suffix in TIFF_SUFFIXES:
        import tifffile

        return _atomic_write(target, lambda tmp: tifffile.imwrite(tmp, labels, compression="zlib"))
    if suffix in NIFTI_SUFFIXES:
        import nibabel as nib

        data = labels.T if labels.ndim == 3 else labels.T[:, :, None]
        img = nib.Nifti1Image(np.ascontiguousarray(data), _nifti_affine(labels, like), dtype=data.dtype)
        img.header.set_xyzt_units("mm")
        return _atomic_write(target, lambda tmp: nib.save(img, str(tmp)))
    if suffix == ".png":
        if labels.ndim != 2:
            raise ImageError(f"{target}: PNG holds 2D labels only, got shape {labels.shape}; use .tif or .nii.gz")
        lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ImageError(f"{target}: label ids {lo}..{hi} do not fit a PNG (0..65535); use .tif or .nii.gz")
        from PIL import Image

        img8 = Image.fromarray(labels.astype(np.uint8 if hi <= 255 else np.uint16))
        return _atomic_write(target, lambda tmp: img8.save(tmp, format="PNG"))
    raise ReadError(f"{target}: cannot write labels as '{suffix or '(no suffix)'}'; use .tif, .nii.gz or .png")


_READERS: Dict[str, Callable[[Path], ImageData]] = {
    **{s: _read_pil for s in PIL_SUFFIXES},
    **{s: _read_tiff for s in TIFF_SUFFIXES},
    **{s: _read_nifti for s in NIFTI_SUFFIXES},
    **{s: _read_dicom_file for s in DICOM_SUFFIXES},
}
