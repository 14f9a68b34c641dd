"""What an image file is: formats by suffix, DICOM detection, names without suffix, :class:`ImageData`."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

import numpy as np

from napari_medsam.engine.errors import ImageError

PathLike = Union[str, "os.PathLike[str]"]
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = (".dcm", ".dicom")
#: every suffix an image file may have, longest first (so ``.nii.gz`` wins over ``.nii``). ``.ome.tif`` is
#: a ``.tif`` here: a labeling session has always named ``b.ome.tif``'s labels ``b.ome``, and resuming an
#: existing session must find them.
IMAGE_SUFFIXES = tuple(sorted(PIL_SUFFIXES + TIFF_SUFFIXES + NIFTI_SUFFIXES + DICOM_SUFFIXES, key=len, reverse=True))
DICOM_PREAMBLE = 128  # bytes before the b"DICM" magic of a DICOM Part 10 file
#: how many files of a folder :func:`holds_dicom` looks at.
DICOM_SNIFF_FILES = 64
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
    spacing: tuple[float, ...] | None = None
    affine: np.ndarray | None = None
    path: str | None = None
    kind: str = "2d"
    meta: dict = field(default_factory=dict)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """The shape of a label map for this image: ``(H, W)`` or ``(Z, Y, X)`` (colour axis dropped)."""
        shape = tuple(int(n) for n in self.array.shape)
        return shape[:2] if self.kind == "rgb" else shape


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def strip_image_suffix(name: str) -> str:
    """``name`` without its image suffix (``a.nii.gz`` -> ``a``, ``b.ome.tif`` -> ``b.ome``, case kept).

    Only the suffixes in :data:`IMAGE_SUFFIXES` are removed: a DICOM file named
    ``IM.1.2.840`` keeps its whole name.
    """
    low = name.lower()
    for suf in IMAGE_SUFFIXES:
        if low.endswith(suf) and len(name) > len(suf):
            return name[: -len(suf)]
    return name


def is_dicom_file(path: PathLike) -> bool:
    """Whether ``path`` is a DICOM file: a ``.dcm``/``.dicom`` file, or any file holding the
    128-byte preamble followed by ``DICM`` (suffix or none; other image suffixes included).

    A file without a suffix that is not DICOM is *not* taken as one.
    """
    p = Path(path)
    with contextlib.suppress(OSError):
        if not p.is_file():
            return False
        if p.name.lower().endswith(DICOM_SUFFIXES):
            return True
        with open(p, "rb") as fh:
            return fh.read(DICOM_PREAMBLE + 4)[DICOM_PREAMBLE:] == b"DICM"
    return False


def holds_dicom(folder: PathLike, sample: int = DICOM_SNIFF_FILES) -> bool:
    """Whether a folder directly holds DICOM files (looks at its first ``sample`` visible files)."""
    p = Path(folder)
    with contextlib.suppress(OSError):
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
            return any(is_dicom_file(f) for f in files[:sample])
    return False


def _kind(array: np.ndarray, path: Path) -> str:
    """Classify an array as 2d/rgb/volume, raising ImageError on anything else."""
    if array.size == 0:
        raise ImageError(f"{path}: image is empty (shape {array.shape})")
    if array.ndim == 2:
        return "2d"
    if array.ndim == 3:
        return "volume"
    raise ImageError(f"{path}: unsupported image shape {array.shape}; expected 2D or 3D")
