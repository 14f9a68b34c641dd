"""Tests for napari_medsam.engine.io: readers, label writers, atomic writes."""

from __future__ import annotations

import gzip
import os
import random
import threading
from pathlib import Path

import numpy as np
import pytest

from napari_medsam.engine import atomic
from napari_medsam.engine.errors import ImageError, MedSAMError, ReadError, WriteError
from napari_medsam.engine.io import (
    ImageData,
    atomic_write_bytes,
    atomic_write_text,
    read_image,
    write_labels,
)

nib = pytest.importorskip("nibabel")
tifffile = pytest.importorskip("tifffile")
pydicom = pytest.importorskip("pydicom")
Image = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def data(shared_data) -> Path:
    return shared_data


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared data file missing: {path}")
    return path


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if ".tmp-" in p.name]


# --------------------------------------------------------------------- NIfTI


def test_nifti_ct_axes_spacing_affine(data):
    p = _need(data / "ct3d_mr3d_totalseg_examples" / "ct_img.nii.gz")
    img = read_image(p)
    ref = nib.load(p)
    expected = np.asarray(ref.dataobj).transpose(2, 1, 0)
    assert img.kind == "volume"
    assert img.array.shape == (30, 101, 122)
    assert img.array.dtype == np.int16
    np.testing.assert_array_equal(img.array, expected)
    assert img.spacing == tuple(float(z) for z in ref.header.get_zooms()[::-1])
    np.testing.assert_allclose(img.affine, ref.affine)
    assert img.path == str(p)
    assert img.array.min() < -500  # real HU, air present


def test_nifti_anisotropic_spacing_reversed(data):
    files = sorted((data / "ct3d_deeplesion_medsam2").glob("*_img.nii.gz"))
    if not files:
        pytest.skip("no deeplesion *_img.nii.gz in shared data")
    for p in files:
        img = read_image(p)
        ref = nib.load(p)
        x, y, z = ref.shape[:3]
        assert img.array.shape == (z, y, x)
        np.testing.assert_array_equal(img.array, np.asarray(ref.dataobj).transpose(2, 1, 0))
        zooms = ref.header.get_zooms()
        assert img.spacing == pytest.approx((zooms[2], zooms[1], zooms[0]))
        assert img.spacing[0] != img.spacing[1]  # slice thickness differs from pixel size


def test_nifti_2d_and_scaling(tmp_path):
    raw = np.arange(12, dtype=np.int16).reshape(4, 3, 1)  # (x, y, z=1)
    ni = nib.Nifti1Image(raw, np.diag([0.5, 0.7, 2.0, 1.0]))
    nib.save(ni, tmp_path / "flat.nii")
    img = read_image(tmp_path / "flat.nii")
    assert img.kind == "2d"
    np.testing.assert_array_equal(img.array, raw[:, :, 0].T)
    assert img.spacing == pytest.approx((0.7, 0.5))

    scaled = nib.Nifti1Image(np.ones((2, 2, 2), np.int16), np.eye(4))
    scaled.header.set_slope_inter(2.0, -1024.0)
    nib.save(scaled, tmp_path / "scaled.nii.gz")
    img = read_image(tmp_path / "scaled.nii.gz")
    assert np.all(img.array == -1022)


def test_nifti_4d_raises_image_error(tmp_path):
    p = tmp_path / "fmri.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 3, 2), np.int16), np.eye(4)), p)
    with pytest.raises(ImageError, match=r"fmri\.nii\.gz"):
        read_image(p)


def test_corrupt_nifti_raises_read_error(tmp_path):
    p = tmp_path / "broken.nii.gz"
    p.write_bytes(gzip.compress(b"this is not a nifti header at all" * 3))
    with pytest.raises(ReadError) as exc:
        read_image(p)
    assert "broken.nii.gz" in str(exc.value)

    truncated = tmp_path / "truncated.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((20, 20, 20), np.int16), np.eye(4)), truncated)
    blob = truncated.read_bytes()
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ReadError, match=r"truncated\.nii\.gz"):
        read_image(truncated)


# ---------------------------------------------------------------- TIFF / PIL


def test_tiff_stack(data):
    p = _need(data / "microscopy3d_cells3d_nuclei_napari" / "cells3d_nuclei_image.tif")
    img = read_image(p)
    assert img.kind == "volume"
    assert img.array.shape == (60, 256, 256)
    assert img.array.dtype == np.uint16
    np.testing.assert_array_equal(img.array, tifffile.imread(p))


def test_tiff_spacing_and_rgb(tmp_path):
    vol = np.arange(4 * 8 * 8, dtype=np.uint16).reshape(4, 8, 8)
    p = tmp_path / "stack.tif"
    meta = {"spacing": 2.0, "unit": "um", "axes": "ZYX"}
    tifffile.imwrite(p, vol, imagej=True, resolution=(1 / 0.25, 1 / 0.5), metadata=meta)
    img = read_image(p)
    np.testing.assert_array_equal(img.array, vol)
    assert img.spacing == pytest.approx((2.0, 0.5, 0.25))
    assert img.meta["spacing_unit"] == "um"

    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, vol[0])
    img = read_image(plain)
    assert img.kind == "2d" and img.spacing is None

    rgb = np.random.default_rng(0).integers(0, 255, (8, 9, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tiff", rgb)
    img = read_image(tmp_path / "rgb.tiff")
    assert img.kind == "rgb"
    np.testing.assert_array_equal(img.array, rgb)


def test_png_rgb(data):
    files = sorted((data / "dermoscopy_isic2017" / "images").glob("*.png"))
    if not files:
        pytest.skip("no dermoscopy PNGs in shared data")
    img = read_image(files[0])
    with Image.open(files[0]) as ref:
        expected = np.asarray(ref.convert("RGB"))
    assert img.kind == "rgb"
    assert img.array.shape == expected.shape and img.array.shape[2] == 3
    assert img.array.dtype == np.uint8
    np.testing.assert_array_equal(img.array, expected)


def test_png_16bit_grayscale(data):
    p = _need(data / "microscopy_dsb2018_stardist" / "images" / "dsb2018_img2d.png")
    img = read_image(p)
    assert img.kind == "2d"
    assert img.array.shape == (512, 512)
    assert img.array.dtype == np.uint16


def test_pil_modes(tmp_path):
    gray = np.arange(20, dtype=np.uint8).reshape(4, 5)
    Image.fromarray(gray).save(tmp_path / "g.bmp")
    np.testing.assert_array_equal(read_image(tmp_path / "g.bmp").array, gray)

    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    Image.fromarray(rgba).save(tmp_path / "a.png")
    img = read_image(tmp_path / "a.png")
    assert img.kind == "rgb" and img.array.shape == (4, 5, 4)

    Image.fromarray(gray).convert("P").save(tmp_path / "p.png")
    img = read_image(tmp_path / "p.png")
    assert img.array.shape == (4, 5, 3)
    np.testing.assert_array_equal(img.array[..., 0], gray)

    Image.fromarray(gray).convert("LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png").array, gray)

    big = (np.arange(20, dtype=np.uint16) * 3000).reshape(4, 5)
    Image.fromarray(big).save(tmp_path / "u16.png")
    img = read_image(tmp_path / "u16.png")
    assert img.array.dtype == np.uint16
    np.testing.assert_array_equal(img.array, big)


# --------------------------------------------------------------------- DICOM


def _write_slice(path: Path, pixels: np.ndarray, z: float, instance: int, series_uid: str, **extra) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.SeriesInstanceUID = series_uid
    ds.InstanceNumber = instance
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-10.0, -20.0, z]
    ds.PixelSpacing = [0.8, 0.6]
    ds.SliceThickness = 9.9  # deliberately wrong: spacing must come from positions
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    for k, v in extra.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def _series(folder: Path, n: int = 4, shape=(6, 7), uid: str | None = None, shuffle_seed: int = 3):
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    zs = [5.0 + 2.5 * k for k in range(n)]  # ascending positions, slice gap 2.5 mm
    raws = [np.full(shape, 1000 + 100 * k, np.uint16) for k in range(n)]
    raws = [r + np.arange(r.size, dtype=np.uint16).reshape(shape) for r in raws]
    order = list(range(n))
    random.Random(shuffle_seed).shuffle(order)
    for file_no, k in enumerate(order):
        # file names and instance numbers deliberately disagree with position order
        _write_slice(folder / f"IM{file_no:04d}", raws[k], zs[k], instance=n - k, series_uid=uid)
    return raws, zs


def test_dicom_series_sorted_hu_spacing(tmp_path):
    raws, _ = _series(tmp_path / "ct", n=4)
    img = read_image(tmp_path / "ct")
    assert img.kind == "volume"
    assert img.array.shape == (4, 6, 7)
    assert img.array.dtype == np.int16
    expected = np.stack(raws).astype(np.int32) - 1024
    np.testing.assert_array_equal(img.array, expected)
    assert img.spacing == pytest.approx((2.5, 0.8, 0.6))
    assert img.meta["modality_hint"] == "ct"
    assert img.meta["n_files"] == 4


def test_dicom_single_file_float_rescale(tmp_path):
    p = tmp_path / "one.dcm"
    raw = np.arange(42, dtype=np.uint16).reshape(6, 7)
    _write_slice(p, raw, 0.0, 1, "1.2.3", RescaleSlope=0.5)
    img = read_image(p)
    assert img.kind == "2d"
    assert img.array.dtype == np.float32
    np.testing.assert_allclose(img.array, raw * 0.5 - 1024)
    assert img.spacing == pytest.approx((0.8, 0.6))


def test_dicom_mixed_sizes_raise_image_error(tmp_path):
    _series(tmp_path / "mixed", n=3, uid="1.2.826.0.1.9")
    _write_slice(tmp_path / "mixed" / "odd", np.zeros((8, 8), np.uint16), 50.0, 9, "1.2.826.0.1.9")
    with pytest.raises(ImageError, match="slice sizes") as exc:
        read_image(tmp_path / "mixed")
    assert "(6, 7)" in str(exc.value) and "(8, 8)" in str(exc.value)


def test_dicom_two_series_raise_read_error(tmp_path):
    _series(tmp_path / "two", n=2, uid="1.2.3.4")
    _write_slice(tmp_path / "two" / "other", np.zeros((6, 7), np.uint16), 0.0, 1, "1.2.3.5")
    with pytest.raises(ReadError) as exc:
        read_image(tmp_path / "two")
    assert "1.2.3.4" in str(exc.value) and "1.2.3.5" in str(exc.value)


def test_empty_folder_raises_read_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    for folder in ("empty", "notes"):
        with pytest.raises(ReadError, match="no DICOM") as exc:
            read_image(tmp_path / folder)
        assert folder in str(exc.value)


# -------------------------------------------------------------------- errors


def test_missing_and_unknown(tmp_path):
    with pytest.raises(ReadError, match="does not exist") as exc:
        read_image(tmp_path / "nope.nii.gz")
    assert "nope.nii.gz" in str(exc.value)
    odd = tmp_path / "data.xyz"
    odd.write_bytes(b"\x00" * 200)
    with pytest.raises(ReadError, match=r"\.xyz") as exc:
        read_image(odd)
    assert "NIfTI" in str(exc.value) and "data.xyz" in str(exc.value)
    assert isinstance(exc.value, OSError) and isinstance(exc.value, MedSAMError)


def test_corrupt_png_raises_read_error(tmp_path):
    p = tmp_path / "bad.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ReadError, match=r"bad\.png"):
        read_image(p)


# ------------------------------------------------------------------- writing


def test_write_labels_nifti_roundtrip(data, tmp_path):
    src = read_image(_need(data / "ct3d_mr3d_totalseg_examples" / "ct_img.nii.gz"))
    labels = np.zeros(src.array.shape, np.uint16)
    labels[3:8, 10:40, 20:60] = 300
    labels[10, 50, 70] = 65000
    labels[20:25, 5:9, 100:110] = 1
    out = write_labels(tmp_path / "sub" / "seg.nii.gz", labels, like=src)
    assert out == tmp_path / "sub" / "seg.nii.gz"
    ref = nib.load(out)
    assert ref.shape == (122, 101, 30)
    assert ref.get_data_dtype() == np.uint16
    np.testing.assert_allclose(ref.affine, src.affine)
    back = read_image(out)
    np.testing.assert_array_equal(back.array, labels)
    assert back.array.dtype == np.uint16
    assert back.spacing == pytest.approx(src.spacing)
    assert _no_temp_files(out.parent)


def test_write_labels_nifti_from_spacing(tmp_path):
    like = ImageData(np.zeros((3, 4, 5), np.int16), spacing=(2.5, 0.8, 0.6), kind="volume")
    labels = np.arange(60, dtype=np.int64).reshape(3, 4, 5)
    out = write_labels(tmp_path / "s.nii", labels, like=like)
    ref = nib.load(out)
    np.testing.assert_allclose(np.diag(ref.affine), [0.6, 0.8, 2.5, 1.0])
    np.testing.assert_array_equal(read_image(out).array, labels)


def test_write_labels_tiff_roundtrip(tmp_path):
    labels = np.zeros((5, 30, 40), np.uint32)
    labels[1:3, 4:9, 5:30] = 70000
    labels[4, 0, 0] = 256
    out = write_labels(tmp_path / "seg.tif", labels)
    back = tifffile.imread(out)
    assert back.dtype == np.uint32
    np.testing.assert_array_equal(back, labels)
    with tifffile.TiffFile(out) as tf:
        assert tf.pages[0].compression != 1  # compressed
    np.testing.assert_array_equal(read_image(out).array, labels)


def test_write_labels_png(tmp_path):
    small = np.array([[0, 1], [2, 255]], np.int32)
    out = write_labels(tmp_path / "m.png", small)
    back = read_image(out).array
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, small)
    big = np.array([[0, 300], [65535, 1]], np.int64)
    np.testing.assert_array_equal(read_image(write_labels(tmp_path / "b.png", big)).array, big)
    with pytest.raises(ImageError, match=r"m2\.png"):
        write_labels(tmp_path / "m2.png", np.array([[0, 70000]], np.int64))
    assert not (tmp_path / "m2.png").exists()


def test_write_labels_rejects_bad_input(tmp_path):
    with pytest.raises(ImageError, match="integers"):
        write_labels(tmp_path / "f.tif", np.zeros((4, 4), np.float32))
    like = ImageData(np.zeros((4, 5, 3), np.uint8), kind="rgb")
    write_labels(tmp_path / "ok.tif", np.zeros((4, 5), np.uint8), like=like)
    with pytest.raises(ImageError, match="shape"):
        write_labels(tmp_path / "bad.tif", np.zeros((5, 4), np.uint8), like=like)
    with pytest.raises(WriteError, match=r"\.jpg"):  # a write problem, not a read one
        write_labels(tmp_path / "x.jpg", np.zeros((4, 4), np.uint8))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
@pytest.mark.parametrize("name", ["pipe.png", "pipe.nii.gz", "pipe"])
def test_a_named_pipe_is_refused_not_read(tmp_path, name):
    """Before: read_image opened the pipe and blocked until something wrote to it (segment, batch hung).
    A helper unblocks a reader that waits longer than 10 s, so the old code fails instead of hanging."""
    fifo = tmp_path / name
    os.mkfifo(fifo)
    returned = threading.Event()

    def unblock():
        if not returned.wait(10):
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # a reader is waiting: this succeeds
            os.close(fd)

    helper = threading.Thread(target=unblock, daemon=True)
    helper.start()
    try:
        with pytest.raises(ReadError, match="not a regular file"):
            read_image(fifo)
    finally:
        returned.set()
        helper.join(15)


def test_write_labels_under_a_file_names_the_folder(tmp_path):
    """Before: '[Errno 17] File exists: ...' with no word of which write or why (CLI segment -o a-file/m.tif)."""
    (tmp_path / "a-file").write_text("x")
    for target in (tmp_path / "a-file" / "m.tif", tmp_path / "a-file" / "sub" / "m.nii.gz"):
        with pytest.raises(WriteError, match="cannot create its folder") as info:
            write_labels(target, np.zeros((4, 4), np.uint8))
        assert str(target) in str(info.value) and isinstance(info.value, OSError)
    assert (tmp_path / "a-file").read_text() == "x"


# -------------------------------------------------------------------- atomic


def test_atomic_write_failure_keeps_target(tmp_path, monkeypatch):
    target = tmp_path / "seg.tif"
    target.write_bytes(b"ORIGINAL CONTENT")

    def exploding_imwrite(path, *args, **kwargs):
        with open(path, "wb") as fh:
            fh.write(b"partial tiff bytes")
        raise RuntimeError("disk full midway")

    monkeypatch.setattr(tifffile, "imwrite", exploding_imwrite)
    with pytest.raises(RuntimeError, match="disk full"):
        write_labels(target, np.ones((4, 4), np.uint8))
    assert target.read_bytes() == b"ORIGINAL CONTENT"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.tif"]


def test_atomic_write_nifti_failure_keeps_target(tmp_path, monkeypatch):
    target = tmp_path / "seg.nii.gz"
    target.write_bytes(b"OLD")
    seen = []

    def exploding_save(img, filename):
        seen.append(Path(filename).name)
        Path(filename).write_bytes(b"half")
        raise OSError("interrupted")

    monkeypatch.setattr(nib, "save", exploding_save)
    with pytest.raises(OSError, match="interrupted"):
        write_labels(target, np.ones((2, 3, 4), np.uint8))
    assert target.read_bytes() == b"OLD"
    assert _no_temp_files(tmp_path)
    # temp file sits next to the target and keeps the suffix so writers recognise it
    assert seen and seen[0].startswith(".seg.tmp-") and seen[0].endswith(".nii.gz")


def test_atomic_write_bytes_and_text(tmp_path, monkeypatch):
    p = tmp_path / "deep" / "record.json"
    assert atomic_write_text(p, '{"a": 1}') == p
    assert p.read_text() == '{"a": 1}'
    atomic_write_bytes(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"

    def failing_replace(src, dst):
        raise OSError("replace failed")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="replace failed"):
        atomic_write_text(p, "new text")
    assert p.read_bytes() == b"\x00\x01"
    assert sorted(x.name for x in p.parent.iterdir()) == ["record.json"]


# ------------------------------------------------ one DICOM rule, one suffix rule, spatial shape
# Before: io sniffed the preamble of any file without a known suffix, the session only of suffix-less
# files (so "IM.1.2.840" was never DICOM there), and the napari reader took every suffix-less file
# (a README) for DICOM. Now all three ask io.is_dicom_file.


def _dicom_bytes(tmp_path: Path) -> bytes:
    p = tmp_path / "_one"
    _write_slice(p, np.arange(42, dtype=np.uint16).reshape(6, 7), 0.0, 1, "1.2.3")
    data = p.read_bytes()
    p.unlink()
    return data


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("IM0001", "dicom", True),  # suffix-less DICOM
        ("IM.1.2.840.10008", "dicom", True),  # UID-style name: the session used to say no
        ("slice.dcm", "dicom", True),
        ("slice.DICOM", "dicom", True),
        ("raw.dcm", "no-preamble", True),  # the suffix says DICOM (read with force=True)
        ("odd.png", "dicom", True),  # the content says DICOM, whatever the suffix
        ("README", "text", False),  # suffix-less but not DICOM: the napari reader used to say yes
        ("LICENSE", "short", False),  # shorter than the preamble
        ("image.png", "png", False),
        ("empty", "empty", False),
    ],
)
def test_is_dicom_file(tmp_path, name, content, expected):
    from napari_medsam.engine.io import is_dicom_file

    blobs = {
        "dicom": _dicom_bytes(tmp_path),
        "no-preamble": b"\x08\x00\x05\x00CS\x0a\x00ISO_IR 100",
        "text": b"This is a readme.\n" * 20,
        "short": b"DICM",
        "png": b"\x89PNG\r\n\x1a\n" + b"\x00" * 200,
        "empty": b"",
    }
    p = tmp_path / name
    p.write_bytes(blobs[content])
    assert is_dicom_file(p) is expected
    assert is_dicom_file(str(p)) is expected


def test_is_dicom_file_on_folders_and_missing_paths(tmp_path):
    from napari_medsam.engine.io import holds_dicom, is_dicom_file

    assert not is_dicom_file(tmp_path)
    assert not is_dicom_file(tmp_path / "nope")
    assert not holds_dicom(tmp_path / "nope")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "README").write_text("not an image\n" * 20)
    (docs / "Makefile").write_text("all:\n")
    assert not holds_dicom(docs)
    _series(tmp_path / "ct", n=2)
    assert holds_dicom(tmp_path / "ct")


def test_read_image_uses_the_same_rule(tmp_path):
    (tmp_path / "README").write_text("not an image\n" * 20)
    with pytest.raises(ReadError, match="unknown file type"):
        read_image(tmp_path / "README")
    p = tmp_path / "IM.1.2.840.10008"
    p.write_bytes(_dicom_bytes(tmp_path))
    assert read_image(p).array.shape == (6, 7)


@pytest.mark.parametrize(
    "name, stem",
    [
        ("a.png", "a"),
        ("scan.nii.gz", "scan"),
        ("scan.NII.GZ", "scan"),
        ("b.ome.tif", "b.ome"),  # as the session always named it (resume finds old labels); batch gave "b"
        ("c.ome.tiff", "c.ome"),
        ("d.tiff", "d"),
        ("e.JPEG", "e"),
        ("f.dcm", "f"),
        ("IM.1.2.840", "IM.1.2.840"),  # not an image suffix: kept whole
        ("notes.txt", "notes.txt"),
        ("dir/sub/x.tif", "dir/sub/x"),
        (".png", ".png"),
        ("nosuffix", "nosuffix"),
    ],
)
def test_strip_image_suffix(name, stem):
    from napari_medsam.engine.io import strip_image_suffix

    assert strip_image_suffix(name) == stem


@pytest.mark.parametrize(
    "shape, kind, spatial",
    [((5, 6), "2d", (5, 6)), ((5, 6, 3), "rgb", (5, 6)), ((5, 6, 4), "rgb", (5, 6)), ((3, 5, 6), "volume", (3, 5, 6))],
)
def test_image_data_spatial_shape(shape, kind, spatial):
    img = ImageData(np.zeros(shape, np.uint8), kind=kind)
    assert img.spatial_shape == spatial
    assert all(type(n) is int for n in img.spatial_shape)


@pytest.mark.parametrize("name", ["x.jpg", "x.bmp", "x.npy", "noext", "x.dcm"])
def test_unsupported_write_suffix_is_a_write_error(tmp_path, name):
    with pytest.raises(WriteError, match="cannot write labels") as exc:
        write_labels(tmp_path / name, np.zeros((4, 4), np.uint8))
    assert not isinstance(exc.value, ReadError)
    assert isinstance(exc.value, MedSAMError)
    assert not list(tmp_path.iterdir())


def test_napari_reader_uses_the_same_dicom_rule(tmp_path):
    """The plugin's reader took any folder holding a suffix-less file (a README) for a DICOM series."""
    from napari_medsam._reader import napari_get_reader, read_layers

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "README").write_text("not an image\n" * 20)
    assert napari_get_reader(str(docs)) is None
    _series(tmp_path / "ct", n=2)
    assert napari_get_reader(str(tmp_path / "ct")) is read_layers
    single = tmp_path / "IM.1.2.840.5"
    single.write_bytes(_dicom_bytes(tmp_path))
    assert napari_get_reader(str(single)) is read_layers
    assert napari_get_reader(str(docs / "README")) is None
