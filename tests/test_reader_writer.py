"""napari reader/writer/sample contributions, called the way napari calls them (no viewer needed)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")

from napari_medsam import _sample_data
from napari_medsam._reader import napari_get_reader
from napari_medsam._writer import write_labels_layer
from napari_medsam.engine.io import read_image


def test_manifest_is_valid():
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-medsam")
    assert manifest.display_name == "MedSAM"
    assert {w.display_name for w in manifest.contributions.widgets} >= {"MedSAM"}
    assert len(manifest.contributions.sample_data) >= 3


def test_nifti_reader_gives_zyx_and_spacing_as_scale(samples):
    path = samples / "totalseg_ct.nii.gz"
    reader = napari_get_reader(str(path))
    assert reader is not None
    ((data, kwargs, kind),) = reader(str(path))
    import nibabel as nib

    raw = nib.load(path)
    np.testing.assert_array_equal(data, np.asarray(raw.dataobj).transpose(2, 1, 0))
    np.testing.assert_allclose(kwargs["scale"], raw.header.get_zooms()[::-1])
    assert kind == "image" and data.min() < -500  # Hounsfield units


def test_reader_declines_other_files(tmp_path):
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None


def test_nifti_writer_keeps_affine_and_big_ids(samples, tmp_path):
    src = read_image(samples / "totalseg_ct.nii.gz")
    labels = np.zeros(src.array.shape, np.uint32)
    labels[10, 20:30, 40:50] = 300  # ids above 255 survive
    out = write_labels_layer(
        str(tmp_path / "labels.nii.gz"), labels, {"metadata": {"affine": src.affine}, "scale": src.spacing}
    )
    back = read_image(out[0])
    np.testing.assert_array_equal(back.array, labels)
    np.testing.assert_allclose(back.affine, src.affine)


def test_tiff_writer(tmp_path):
    labels = np.zeros((64, 64), np.uint16)
    labels[5:9, 5:9] = 2
    out = write_labels_layer(str(tmp_path / "labels.tif"), labels, {})
    np.testing.assert_array_equal(read_image(out[0]).array, labels)


@pytest.mark.parametrize("name", ["ct_volume", "mr_volume", "dermoscopy", "ultrasound", "microscopy"])
def test_sample_data(name):
    ((data, kwargs, kind),) = getattr(_sample_data, name)()
    assert kind == "image" and data.ndim in (2, 3) and data.size > 1000
