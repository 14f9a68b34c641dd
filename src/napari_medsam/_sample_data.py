"""File > Open Sample: small, permissively licensed real images bundled with the package."""

from __future__ import annotations

from importlib.resources import files

from .engine.io import read_image


def _sample(name: str, layer_name: str, **kwargs):
    img = read_image(files("napari_medsam") / "samples" / name)
    if img.spacing is not None:
        kwargs.setdefault("scale", img.spacing)
    if img.kind == "rgb":
        kwargs["rgb"] = True
    return [(img.array, {"name": layer_name, "metadata": {"affine": img.affine}, **kwargs}, "image")]


def ct_volume():
    """Abdominal CT in Hounsfield units (TotalSegmentator test volume, Apache-2.0)."""
    return _sample("totalseg_ct.nii.gz", "CT abdomen (HU)", contrast_limits=(-160, 240))


def mr_volume():
    """Brain MR with a tumour (pyradiomics test case, BSD-3)."""
    return _sample("pyradiomics_brain1.nii.gz", "MR brain")


def dermoscopy():
    """Dermoscopy RGB image (ISIC 2017, CC-0)."""
    return _sample("isic_0014270.png", "dermoscopy")


def ultrasound():
    """Breast ultrasound (BUSI, CC0)."""
    return _sample("busi_malignant_1.png", "breast ultrasound")


def microscopy():
    """Fluorescence nuclei (DSB 2018 via stardist, BSD-3)."""
    return _sample("dsb2018_nuclei.png", "nuclei")
