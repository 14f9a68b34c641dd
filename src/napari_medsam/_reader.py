"""napari reader: NIfTI, DICOM (file or series folder) and TIFF stacks through the engine's IO.

Volumes come in SimpleITK array order (z, y, x) with voxel spacing as the layer
scale; DICOM is rescaled to Hounsfield units. The source affine is kept in the
layer metadata so the NIfTI writer can put labels back in the same space.
"""

from __future__ import annotations

import os
from pathlib import Path

from .engine.errors import MedSAMError
from .engine.io import holds_dicom, is_dicom_file, read_image

SUFFIXES = (".nii", ".nii.gz", ".dcm", ".dicom", ".tif", ".tiff")


def _is_dicom_dir(path: Path) -> bool:
    # engine.io's one DICOM rule (.dcm/.dicom or the 128-byte preamble + DICM): a folder with a README is not DICOM
    return holds_dicom(path)


def napari_get_reader(path):
    """Return a reader for paths we handle, else None (napari then tries other readers)."""
    if isinstance(path, list):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(os.fspath(path))
    if p.name.lower().endswith(SUFFIXES) or _is_dicom_dir(p) or is_dicom_file(p):
        return read_layers
    return None


def read_layers(path):
    """Read one image file or DICOM folder into a napari image layer tuple."""
    if isinstance(path, list):
        path = path[0]
    try:
        img = read_image(path)
    except MedSAMError as exc:
        raise ValueError(str(exc)) from exc  # napari shows the message
    kwargs = {"name": Path(os.fspath(path)).name.split(".")[0], "metadata": {"medsam_source": str(path)}}
    if img.affine is not None:
        kwargs["metadata"]["affine"] = img.affine
    if img.spacing is not None:
        kwargs["scale"] = tuple(img.spacing)
    if img.kind == "rgb":
        kwargs["rgb"] = True
    kwargs["metadata"].update(img.meta)
    return [(img.array, kwargs, "image")]
