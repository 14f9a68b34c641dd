"""Label-map writers (TIFF, NIfTI, PNG), atomic and in the one label dtype rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_medsam.engine.atomic import atomic_write
from napari_medsam.engine.errors import ImageError, WriteError
from napari_medsam.engine.labels import compact_labels

from .formats import NIFTI_SUFFIXES, TIFF_SUFFIXES, ImageData, PathLike, _suffix


def _nifti_affine(labels: np.ndarray, like: ImageData | None) -> np.ndarray:
    if like is not None and like.affine is not None:
        return np.asarray(like.affine, dtype=float)
    affine = np.eye(4)
    if like is not None and like.spacing is not None and len(like.spacing) == labels.ndim:
        affine[np.arange(labels.ndim), np.arange(labels.ndim)] = like.spacing[::-1]
    return affine


def write_labels(path: PathLike, labels: np.ndarray, like: ImageData | None = None) -> Path:
    """Write a label map atomically as TIFF, NIfTI or PNG, chosen by suffix.

    Arguments:
      path (str or Path): target ``.tif/.tiff``, ``.nii/.nii.gz`` or ``.png``.
      labels (np.ndarray): integer or bool ids, ``(y, x)`` or ``(z, y, x)``.
      like (ImageData or None): the source image; gives the NIfTI affine (or
        spacing) and must match the labels' spatial shape.

    Returns:
      (Path): the written path.

    Raises:
      ImageError: labels are not integers, are negative, do not match ``like``, or do not fit PNG.
      WriteError: the suffix is not a supported label format, or the folder cannot be created.
    """
    target = Path(path).expanduser()
    labels = np.asarray(labels)
    if not (labels.dtype == bool or np.issubdtype(labels.dtype, np.integer)):
        raise ImageError(f"{target}: labels must be integers, got dtype {labels.dtype}")
    if labels.ndim not in (2, 3):
        raise ImageError(f"{target}: labels must be 2D or 3D, got shape {labels.shape}")
    if like is not None and like.spatial_shape != labels.shape:
        raise ImageError(f"{target}: labels shape {labels.shape} does not match image shape {like.spatial_shape}")
    suffix = _suffix(target)
    if suffix not in TIFF_SUFFIXES + NIFTI_SUFFIXES + (".png",):
        raise WriteError(f"{target}: cannot write labels as '{suffix or '(no suffix)'}'; use .tif, .nii.gz or .png")
    try:
        labels = compact_labels(labels)
    except ImageError as exc:
        raise ImageError(f"{target}: {exc}") from None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, permissions: say which write and why
        raise WriteError(f"{target}: cannot create its folder {target.parent}: {exc.strerror or exc}") from None
    if suffix in TIFF_SUFFIXES:
        import tifffile

        return atomic_write(target, lambda tmp: tifffile.imwrite(tmp, labels, compression="zlib"))
    if suffix in NIFTI_SUFFIXES:
        import nibabel as nib

        data = labels.T if labels.ndim == 3 else labels.T[:, :, None]
        img = nib.Nifti1Image(np.ascontiguousarray(data), _nifti_affine(labels, like), dtype=data.dtype)
        img.header.set_xyzt_units("mm")
        return atomic_write(target, lambda tmp: nib.save(img, str(tmp)))
    if suffix == ".png":  # checked above: the only one left
        if labels.ndim != 2:
            raise ImageError(f"{target}: PNG holds 2D labels only, got shape {labels.shape}; use .tif or .nii.gz")
        lo, hi = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
        if lo < 0 or hi > 65535:
            raise ImageError(f"{target}: label ids {lo}..{hi} do not fit a PNG (0..65535); use .tif or .nii.gz")
        from PIL import Image

        img8 = Image.fromarray(labels.astype(np.uint8 if hi <= 255 else np.uint16))
        return atomic_write(target, lambda tmp: img8.save(tmp, format="PNG"))
    raise WriteError(f"{target}: no writer for '{suffix}'")
