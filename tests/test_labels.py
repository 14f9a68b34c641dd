"""engine.labels: one box-from-vertices, one label dtype rule, one object writer, label statistics.

The reconciled behaviours (before, two box_from_vertices returned different types, and io, session and
export stored the same labels in three different dtypes) are tested here and through write_labels.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_medsam.engine.errors import ImageError
from napari_medsam.engine.io import read_image, write_labels
from napari_medsam.engine.labels import (
    BoxOnPlane,
    LabelPatch,
    apply_mask,
    bounding_region,
    box_from_vertices,
    compact_labels,
    label_stats,
    mask_box,
    vertices_from_box,
)
from napari_medsam.engine.volume import paste_object


# -- box_from_vertices ----------------------------------------------------------------
def test_box_from_2d_vertices():
    verts = np.array([[10.0, 20.0], [10.0, 60.0], [40.0, 60.0], [40.0, 20.0]])  # (row, col)
    got = box_from_vertices(verts)
    assert isinstance(got, BoxOnPlane)
    plane, box = got  # unpacks like the old tuple
    assert plane == () and got.slice is None
    assert box == (20.0, 10.0, 60.0, 40.0) and all(type(v) is float for v in box)


def test_box_from_volume_and_4d_vertices():
    verts = np.array([[7, 40, 5], [7, 40, 25], [7, 10, 25], [7, 10, 5]], dtype=np.float32)
    got = box_from_vertices(verts)
    assert got.plane == (7,) and got.slice == 7 and got.box == (5.0, 10.0, 25.0, 40.0)
    four = np.array([[2, 6.6, 1, 3], [2, 6.6, 5, 9]], dtype=float)  # (t, z, row, col)
    got = box_from_vertices(four)
    assert got.plane == (2, 7) and got.slice == 7 and got.box == (3.0, 1.0, 9.0, 5.0)


def test_float32_vertices_are_the_pixel_drawn():
    verts = np.array([[0, 293.99988], [0, 10.00004], [50.000015, 10], [50, 294]], dtype=np.float32)
    assert box_from_vertices(verts).box == (10.0, 0.0, 294.0, 50.0)


@pytest.mark.parametrize("bad", [np.zeros(4), np.zeros((0, 2)), np.zeros((4, 1)), [[1, 2], [3]]])
def test_bad_vertices_raise(bad):
    with pytest.raises((ImageError, ValueError)):
        box_from_vertices(bad)


@pytest.mark.parametrize(
    ("box", "plane"),
    [((20, 10, 60, 40), ()), ((5.5, 10, 25, 40.25), (7,)), ((3, 1, 3, 1), (2, 7)), ((0, 0, 511, 511), (0,))],
)
def test_vertices_from_box_is_box_from_vertices_inverted(box, plane):
    verts = vertices_from_box(box, plane)
    assert len(verts) == 4 and all(len(v) == len(plane) + 2 and all(type(c) is float for c in v) for v in verts)
    assert box_from_vertices(verts) == (plane, tuple(float(v) for v in box))
    x0, y0, x1, y1 = (float(v) for v in box)
    assert [v[-2:] for v in verts] == [[y0, x0], [y0, x1], [y1, x1], [y1, x0]], "napari's corner order"


def test_every_writer_of_record_boxes_uses_the_one_vertex_rule():
    """The session's recovered boxes and the web server's boxes hold the vertices vertices_from_box gives
    (before, each wrote its own corner list)."""
    from napari_medsam.engine.session.records import rebuild_from_labels

    lab = np.zeros((3, 40, 50), np.uint8)
    lab[1, 5:9, 10:30] = 4
    rec: dict = {"boxes": []}
    assert rebuild_from_labels(rec, lab) == (0, 1)
    (b,) = rec["boxes"]
    assert b["box"] == [10.0, 5.0, 29.0, 8.0] and b["slice"] == 1
    assert b["vertices"] == vertices_from_box(b["box"], (1,))
    pytest.importorskip("fastapi")
    from napari_medsam.server.work import box_entry

    for z in (None, 3):
        entry = box_entry(0, 2, (1, 2, 30, 40), z)
        assert entry["vertices"] == vertices_from_box((1, 2, 30, 40), () if z is None else (z,))


# -- compact_labels: the one dtype rule -------------------------------------------------
@pytest.mark.parametrize(
    "labels, dtype",
    [
        (np.array([[True, False]]), np.uint8),
        (np.array([[0, 5]], np.int64), np.uint8),
        (np.array([[0, 255]], np.int16), np.uint8),
        (np.array([[0, 256]], np.int16), np.uint16),  # io.py kept int16, the session made uint16
        (np.array([[0, 300]], np.int32), np.uint16),  # io.py kept int32
        (np.array([[0, 5]], np.uint32), np.uint8),  # io.py kept uint32
        (np.array([[0, 70000]], np.int64), np.uint32),
        (np.array([[0, 2**33]], np.int64), np.uint64),
        (np.zeros((0, 3), np.int64), np.uint8),
        (np.array([[0, 65535]], np.uint16), np.uint16),
    ],
)
def test_compact_labels_smallest_unsigned(labels, dtype):
    out = compact_labels(labels)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, labels.astype(np.int64))


def test_compact_labels_keeps_the_array_when_already_right():
    lab = np.zeros((4, 4), np.uint8)
    assert compact_labels(lab) is lab


@pytest.mark.parametrize(
    "labels, max_dtype, message",
    [
        (np.array([[-1, 2]], np.int16), None, "negative"),
        (np.zeros((2, 2), np.float32), None, "integers"),
        (np.array([["a"]]), None, "integers"),
        (np.array([[0, 70000]], np.int64), np.uint16, "do not fit uint16"),
        (np.array([[0, 300]], np.int64), np.uint8, "do not fit uint8"),
    ],
)
def test_compact_labels_refuses(labels, max_dtype, message):
    with pytest.raises(ImageError, match=message):
        compact_labels(labels, max_dtype=max_dtype)


def test_compact_labels_with_a_cap():
    assert compact_labels(np.array([[0, 65535]], np.int64), max_dtype=np.uint16).dtype == np.uint16
    assert compact_labels(np.array([[0, 3]], np.int64), max_dtype=np.uint16).dtype == np.uint8


@pytest.mark.parametrize("suffix", [".tif", ".nii.gz", ".png"])
def test_write_labels_follows_the_one_rule(tmp_path, suffix):
    """Before: TIFF/NIfTI kept int16/int32 labels as they came; now every writer stores the same dtype."""
    labels = np.zeros((6, 7), np.int32)
    labels[1:3, 2:5] = 300
    out = write_labels(tmp_path / f"seg{suffix}", labels)
    back = read_image(out).array
    assert back.dtype == compact_labels(labels).dtype == np.uint16
    np.testing.assert_array_equal(back, labels)
    if suffix == ".tif":
        assert tifffile.imread(out).dtype == np.uint16


def test_write_labels_refuses_negative_ids(tmp_path):
    with pytest.raises(ImageError, match="negative"):
        write_labels(tmp_path / "neg.tif", np.array([[0, -3]], np.int16))
    assert not list(tmp_path.iterdir())


# -- apply_mask / LabelPatch / bounding_region ----------------------------------------
def test_apply_mask_keeps_other_objects_and_undoes_exactly():
    labels = np.zeros((8, 8), np.uint16)
    labels[2:6, 2:6] = 4
    labels[0, 0] = 9
    new = np.zeros((8, 8), bool)
    new[4:8, 4:8] = True
    original = labels.copy()
    patch = apply_mask(labels, bounding_region(new), new[4:8, 4:8], 9)
    assert isinstance(patch, LabelPatch)
    assert (labels[4:6, 4:6] == 4).all()  # other object kept
    assert (labels[6:8, 6:8] == 9).all()
    assert labels[0, 0] == 9  # outside the region: not cleared
    patch.undo(labels)
    np.testing.assert_array_equal(labels, original)
    patch.redo(labels)
    assert (labels[6:8, 6:8] == 9).all()


def test_apply_mask_clear_and_overwrite():
    labels = np.zeros((4, 4), np.uint8)
    labels[:, :2] = 3
    labels[0, 3] = 5
    full = np.zeros((4, 4), bool)
    full[1:, 1:] = True
    apply_mask(labels, None, full, 5, clear_id=True, overwrite=True)
    assert labels[0, 3] == 0  # the old pixel of 5 inside the region was cleared
    assert (labels[1:, 1:] == 5).all() and (labels[:, 0] == 3).all()


@pytest.mark.parametrize(
    "labels, label_id, message",
    [
        (np.zeros((4, 4), np.uint8), 300, "does not fit a uint8"),
        (np.zeros((4, 4), np.uint8), 0, "does not fit"),
        (np.zeros((4, 4), np.uint8), True, "integer"),
        (np.zeros((4, 4), np.uint8), 2.0, "integer"),
        (np.zeros((4, 4), np.float32), 1, "integer array"),
    ],
)
def test_apply_mask_refuses_ids_the_labels_cannot_hold(labels, label_id, message):
    with pytest.raises(ImageError, match=message):
        apply_mask(labels, None, np.ones((4, 4), bool), label_id)
    assert not labels.any()


def test_apply_mask_refuses_a_mask_of_another_size():
    with pytest.raises(ImageError, match="does not fill"):
        apply_mask(np.zeros((4, 4), np.uint8), (slice(0, 2), slice(0, 2)), np.ones((3, 3), bool), 1)


def test_paste_object_is_apply_mask_over_the_volume():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, (3, 6, 6)).astype(np.uint16)
    mask = rng.random((3, 6, 6)) > 0.5
    a, b = labels.copy(), labels.copy()
    paste_object(a, mask, 2)
    apply_mask(b, None, mask, 2, clear_id=False)
    np.testing.assert_array_equal(a, b)


def test_bounding_region():
    assert bounding_region(np.zeros((4, 4), bool)) is None
    m = np.zeros((5, 6), bool)
    m[1, 2] = m[3, 4] = True
    assert bounding_region(m, leading=(7,)) == (slice(7, 8), slice(1, 4), slice(2, 5))
    assert mask_box(m) == (2, 1, 4, 3) and mask_box(np.zeros((2, 2), bool)) is None


# -- label_stats ----------------------------------------------------------------------
def test_label_stats_dense_sparse_and_negative():
    lab = np.zeros((4, 5), np.int64)
    lab[0:2, 1:3] = 7
    lab[3, 4] = 2_000_000  # above the sparse threshold: renumbered internally
    lab[3, 0] = -4  # not an object
    stats = label_stats(lab)
    assert stats == {7: {"pixels": 4, "bbox": [[0, 2], [1, 3]]}, 2_000_000: {"pixels": 1, "bbox": [[3, 4], [4, 5]]}}
    assert label_stats(np.zeros((3, 3), np.uint8)) == {}
    assert label_stats(np.array([[0, 3]], np.uint32)) == {3: {"pixels": 1, "bbox": [[0, 1], [1, 2]]}}
