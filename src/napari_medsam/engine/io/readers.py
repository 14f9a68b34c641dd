"""Readers: PNG/JPEG/BMP, TIFF, NIfTI and DICOM (file or series folder) -> :class:`ImageData`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from napari_medsam.engine.errors import ImageError, MedSAMError, ReadError

from .dicom import _read_dicom_dir, _read_dicom_file
from .formats import (
    _MM_PER_UNIT,
    DICOM_SUFFIXES,
    NIFTI_SUFFIXES,
    PIL_SUFFIXES,
    SUPPORTED,
    TIFF_SUFFIXES,
    ImageData,
    PathLike,
    _kind,
    _suffix,
    is_dicom_file,
)


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
    if not (p.is_file() or p.is_dir()):  # opening a pipe or a device would block or never end
        raise ReadError(f"{p} is not a regular file or a folder (a pipe, device or socket): nothing to read")
    suffix = _suffix(p)
    reader = _read_dicom_dir if p.is_dir() else _READERS.get(suffix)
    if reader is None and is_dicom_file(p):
        reader = _read_dicom_file
    if reader is None:
        raise ReadError(f"{p}: unknown file type '{suffix or '(no suffix)'}'; supported: {SUPPORTED}")
    try:
        return reader(p)
    except (MedSAMError, MemoryError):
        raise
    except Exception as exc:  # any library failure means the file is unreadable
        raise ReadError(f"cannot read {p}: {type(exc).__name__}: {exc}") from exc


def _read_pil(path: Path) -> ImageData:
    from PIL import Image, ImageOps

    im: Any
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
        if im.mode == "I" and fmt == "PNG" and array.size and array.min() >= 0 and array.max() <= 65535:
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
        ij: dict[str, Any] = tf.imagej_metadata or {}
        tags: Any = tf.pages[0].tags  # type: ignore[union-attr]
        res = [tags[t].value if t in tags else None for t in ("YResolution", "XResolution")]
        unit = int(tags["ResolutionUnit"].value) if "ResolutionUnit" in tags else 1
    keep = [i for i, n in enumerate(array.shape) if n > 1 or axes[i] in "YX"]
    array, axes = array.reshape([array.shape[i] for i in keep]), "".join(axes[i] for i in keep)
    if array.ndim == 3 and axes.endswith("S") and array.shape[-1] in (3, 4):
        kind = "rgb"
    else:
        kind = _kind(array, path)
    meta = {"format": "tiff", "axes": axes}
    yx: list[float | None] = []
    for r in res:
        known = r is not None and r[0] > 0 and tuple(r) != (1, 1)
        yx.append(r[1] / r[0] * _MM_PER_UNIT.get(unit, 1.0) if known and r is not None else None)
    z = ij.get("spacing") if kind == "volume" else None
    spatial = ([z] if kind == "volume" else []) + yx
    spacing = None
    if any(s is not None for s in spatial):
        spacing = tuple(float(s) if s is not None else 1.0 for s in spatial)
        meta["spacing_unit"] = "mm" if unit in _MM_PER_UNIT else ij.get("unit", "pixel")
    return ImageData(array, spacing, None, str(path), kind, meta)


def _read_nifti(path: Path) -> ImageData:
    import nibabel as nib

    img: Any = nib.load(str(path))
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


_READERS: dict[str, Callable[[Path], ImageData]] = {
    **dict.fromkeys(PIL_SUFFIXES, _read_pil),
    **dict.fromkeys(TIFF_SUFFIXES, _read_tiff),
    **dict.fromkeys(NIFTI_SUFFIXES, _read_nifti),
    **dict.fromkeys(DICOM_SUFFIXES, _read_dicom_file),
}
