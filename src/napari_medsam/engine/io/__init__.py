"""Read images (PNG/JPEG/BMP, TIFF, NIfTI, DICOM) and write label maps atomically.

Arrays come back in the axis order SimpleITK's ``GetArrayFromImage`` uses:
``(y, x)``, ``(y, x, 3|4)`` or ``(z, y, x)``, never reoriented. Writers go through
:mod:`engine.atomic` (temporary file in the target directory, fsync, ``os.replace``),
so a crash never leaves a half-written target behind; label maps are stored in the
dtype :func:`engine.labels.compact_labels` chooses.

One rule for what counts as DICOM (:func:`is_dicom_file`) and one for an image's
name without its suffix (:func:`strip_image_suffix`), used by the session, batch
and the napari reader alike.
"""

from napari_medsam.engine.atomic import atomic_write, atomic_write_bytes, atomic_write_text

from .formats import (
    DICOM_PREAMBLE,
    DICOM_SNIFF_FILES,
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    NIFTI_SUFFIXES,
    PIL_SUFFIXES,
    SUPPORTED,
    TIFF_SUFFIXES,
    ImageData,
    PathLike,
    _suffix,
    holds_dicom,
    is_dicom_file,
    strip_image_suffix,
)
from .readers import read_image
from .writers import write_labels

__all__ = [
    "DICOM_PREAMBLE",
    "DICOM_SNIFF_FILES",
    "DICOM_SUFFIXES",
    "IMAGE_SUFFIXES",
    "NIFTI_SUFFIXES",
    "PIL_SUFFIXES",
    "SUPPORTED",
    "TIFF_SUFFIXES",
    "ImageData",
    "PathLike",
    "_suffix",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "holds_dicom",
    "is_dicom_file",
    "read_image",
    "strip_image_suffix",
    "write_labels",
]
