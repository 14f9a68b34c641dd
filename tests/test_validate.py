"""engine.validate and the image -> model uint8 path: every bad input a BoxError/ImageError naming it.

Issue 12, defects 5 (boxes that are not numbers; 1-pixel boxes) and 6 (extreme float ranges): these
tests failed on the code before the fix (numpy's ValueError/TypeError for text, dict and tuple-of-str
boxes; "no area" for a 1-pixel box; "constant after the rgb intensity rule" for +-1.7e308 data).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_medsam.engine.errors import BoxError, ImageError, MedSAMError
from napari_medsam.engine.intensity import (
    Intensity,
    convert,
    gray_to_rgb,
    model_input,
    resolve_modality,
    to_uint8,
)
from napari_medsam.engine.validate import (
    RGB_MIN_SIDE,
    check_box,
    check_image,
    check_index,
    check_planes,
    check_volume,
    normalize_boxes,
    parse_box,
    parse_z_range,
)

SHAPE = (100, 120)  # (h, w)


# -- boxes that are numbers, in every accepted form -------------------------------------
@pytest.mark.parametrize(
    "box",
    [
        "8,33,99,80",
        " 8, 33, 99, 80 ",
        "(8,33,99,80)",
        "[8, 33, 99, 80]",
        "8 33 99 80",
        "8.0,33.0,99.0,80.0",
        (8, 33, 99, 80),
        [8.0, 33.0, 99.0, 80.0],
        np.array([8, 33, 99, 80], np.int16),
        np.array([[8, 33, 99, 80]], np.float32),
        torch.tensor([8, 33, 99, 80]),
        (np.int64(8), np.float32(33), 99, 80),
        range(8, 12),
        ["8,33,99,80"],
    ],
)
def test_accepted_box_forms(box):
    out = normalize_boxes(box, SHAPE)
    assert out.shape == (1, 4) and out.dtype == np.float64
    if not isinstance(box, range):
        np.testing.assert_array_equal(out[0], [8, 33, 99, 80])


def test_many_boxes_and_box_text_lists():
    np.testing.assert_array_equal(normalize_boxes([(1, 2, 3, 4), (5, 6, 7, 8)], SHAPE), [[1, 2, 3, 4], [5, 6, 7, 8]])
    np.testing.assert_array_equal(normalize_boxes(["1,2,3,4", "5 6 7 8"], SHAPE), [[1, 2, 3, 4], [5, 6, 7, 8]])
    np.testing.assert_array_equal(normalize_boxes(np.zeros((3, 4)) + 1, SHAPE), np.ones((3, 4)))


# -- boxes that are not: BoxError naming the value ----------------------------------------
@pytest.mark.parametrize(
    "box, words",
    [
        (None, "None"),
        ("", "empty"),
        ("   ", "empty"),
        ("a,b,c,d", "'a,b,c,d'"),
        ("8,133,439", "3 values"),
        ("8,133,439,403,5", "5 values"),
        ("1,2,3,nan", "NaN"),
        ("1,2,3,1e400", "NaN or infinite"),
        ("0x10,2,3,4", "four numbers"),
        (("a", "b", "c", "d"), "'a'"),
        (("1", "2", "3", "4"), "'1'"),  # strings as coordinates are not numbers (the text form is one string)
        ({"x0": 1, "y0": 2, "x1": 3, "y1": 4}, "dict"),
        ({1, 2, 3, 4}, "set"),
        (b"1,2,3,4", "bytes"),
        (object(), "object"),
        ((True, False, True, True), "boolean"),
        (np.array([True, False, True, True]), "bool"),
        (np.array([1 + 2j, 2, 3, 4]), "complex"),
        ((1, 2, 3, 1j), "complex"),
        (((1, 2), (3, 4)), "2 values"),
        ([[1, 2, 3, 4], [1, 2, 3]], "3 values"),
        ([[[1, 2, 3, 4]]], "not a number"),
        ([1, [2, 3], 4, 5], "got 1 in"),
        ((1, 2, 3), "3 values"),
        ((), "no box"),
        ([], "no box"),
        (np.zeros((0, 4)), "no box"),
        (np.zeros((2, 5)), "shape"),
        ((float("nan"), 1, 5, 5), "NaN"),
        ((0, 0, float("inf"), 5), "NaN or infinite"),
        ((0, 0, -np.inf, 5), "NaN or infinite"),
        ((0, 0, 10**400, 5), "too large"),
        ((0, 0, 5, None), "None"),
        ((0, 0, "5", 7), "'5'"),
        (np.array(["1", "2", "3", "4"]), "'1'"),
    ],
)
def test_bad_boxes_raise_box_error_naming_the_value(box, words):
    with pytest.raises(BoxError, match=None) as exc:
        normalize_boxes(box, SHAPE)
    assert isinstance(exc.value, MedSAMError) and isinstance(exc.value, ValueError)
    assert words in str(exc.value), str(exc.value)


def test_huge_but_finite_coordinates_are_clipped():
    out = normalize_boxes((-(10**30), 5, 10**30, 1e300), SHAPE)
    np.testing.assert_array_equal(out[0], [0, 5, SHAPE[1] - 1, SHAPE[0] - 1])


# -- inclusive bounds: a 1-pixel box is a box ---------------------------------------------------
@pytest.mark.parametrize(
    "box, used",
    [
        ((10, 10, 10, 50), [10, 10, 10, 50]),  # one column wide
        ((10, 30, 60, 30), [10, 30, 60, 30]),  # one row high
        ((7, 7, 7, 7), [7, 7, 7, 7]),  # one pixel
        ((0, 0, 0, 0), [0, 0, 0, 0]),  # the first pixel
        ((119, 99, 119, 99), [119, 99, 119, 99]),  # the last pixel
        ((-50, 10, 0, 50), [0, 10, 0, 50]),  # reaching in to column 0 only
        ((119, 10, 400, 50), [119, 10, 119, 50]),  # reaching in to the last column only
        ((10.2, 10, 10.7, 50), [10.2, 10, 10.7, 50]),
    ],
)
def test_one_pixel_boxes_are_accepted(box, used):
    np.testing.assert_allclose(normalize_boxes(box, SHAPE)[0], used)


@pytest.mark.parametrize(
    "box", [(-30, 10, -1, 50), (120, 10, 130, 50), (10, -9, 50, -0.5), (10, 100, 50, 140), (-5, -5, -5, -5)]
)
def test_boxes_wholly_outside_raise(box):
    with pytest.raises(BoxError, match="no area inside the 120 x 100 image"):
        normalize_boxes(box, SHAPE)


def test_one_pixel_boxes_through_the_real_model(lite, samples):
    """The model takes a 1-px box (exact and fast decoders): the documented inclusive bounds hold."""
    from napari_medsam.engine.io import read_image

    img = read_image(samples / "busi_malignant_1.png").array
    emb = lite.embed(img)
    h, w = emb.original_size
    for box in [(200, 150, 200, 300), (100, 250, 300, 250), (250, 250, 250, 250), (0, 0, 0, 0), (w - 1, h - 1, w, h)]:
        pred = lite.predict(emb, box)
        assert pred.masks.shape == (1, h, w) and pred.masks.dtype == bool
        assert np.isfinite(pred.iou).all()
        assert pred.boxes[0, 0] == pred.boxes[0, 2] or pred.boxes[0, 1] == pred.boxes[0, 3]
    # the CLI's text form gives the same mask as the numbers
    np.testing.assert_array_equal(lite.segment(emb, box="8,133,439,403"), lite.segment(emb, box=(8, 133, 439, 403)))


def test_one_pixel_boxes_through_the_fast_decoder(samples):
    from napari_medsam import MedSAM
    from napari_medsam.engine.io import read_image

    fast = MedSAM.load("litemedsam", device="cpu", fast=True)
    img = read_image(samples / "busi_malignant_1.png").array
    emb = fast.embed(img)
    for box in [(200, 150, 200, 300), (250, 250, 250, 250)]:
        fused = fast.predict(emb, box)
        exact = fast.predict(emb, box, exact=True)
        assert fused.masks.shape == exact.masks.shape
        assert np.isfinite(fused.iou).all()


# -- check_box / parse_box / check_index / parse_z_range ------------------------------------
def test_check_box_needs_exactly_one():
    np.testing.assert_array_equal(check_box("1,2,3,4", SHAPE), [1, 2, 3, 4])
    with pytest.raises(BoxError, match="key_boxes\\[3\\] must be one box"):
        check_box([(1, 2, 3, 4), (5, 6, 7, 8)], SHAPE, "key_boxes[3]")
    with pytest.raises(BoxError, match=r"box must be one box.*'x'"):
        check_box(("x", 1, 2, 3), SHAPE)


@pytest.mark.parametrize(
    "text, box",
    [
        ("8,133,439,403", (8.0, 133.0, 439.0, 403.0)),
        ("-5,0,10,10", (-5.0, 0.0, 10.0, 10.0)),
        ((1, 2, 3, 4), (1, 2, 3, 4)),
    ],
)
def test_parse_box(text, box):
    got = parse_box(text)
    assert got == box and all(type(v) is float for v in got)


@pytest.mark.parametrize(
    "text", [None, "", "1,2", "1,2,3,4,5", "a,b,c,d", "1,2,3,inf", [(1, 2, 3, 4), (1, 2, 3, 4)], {}]
)
def test_parse_box_refuses(text):
    with pytest.raises(BoxError):
        parse_box(text)


@pytest.mark.parametrize("z, expected", [(0, 0), (4, 4), (np.int32(2), 2), (3.0, 3), (np.float32(1), 1)])
def test_check_index_accepts(z, expected):
    assert check_index(z, 5) == expected and type(check_index(z, 5)) is int


@pytest.mark.parametrize(
    "z, words",
    [
        (5, "outside the volume"),
        (-1, "outside the volume"),
        (1.5, "integer"),
        (float("nan"), "integer"),
        (float("inf"), "integer"),
        (True, "integer"),
        ("2", "integer"),
        (None, "integer"),
        ([2], "integer"),
        (10**30, "outside the volume"),
    ],
)
def test_check_index_refuses(z, words):
    with pytest.raises(BoxError, match=words):
        check_index(z, 5, "slice")


@pytest.mark.parametrize(
    "value, expected",
    [
        ("2,4", (2, 4)),
        ("4,2", (2, 4)),
        (" 2 , 4 ", (2, 4)),
        ("2 4", (2, 4)),
        ((1, 3), (1, 3)),
        ("3.0,4", (3, 4)),
        (np.array([0, 4]), (0, 4)),
        ([np.int64(1), 2.0], (1, 2)),
    ],
)
def test_parse_z_range_accepts(value, expected):
    assert parse_z_range(value, depth=5) == expected


@pytest.mark.parametrize(
    "value, words",
    [
        ("1,2,3", "first,last"),
        ("1", "first,last"),
        ("", "first,last"),
        ("a,b", "integer"),
        ("1.5,3", "integer"),
        ((1, 2, 3), "first,last"),
        (None, "first,last"),
        (5, "first,last"),
        ("0,9", "outside the volume"),
        ("-1,2", "outside the volume"),
        ((True, 2), "integer"),
    ],
)
def test_parse_z_range_refuses(value, words):
    with pytest.raises(BoxError, match=words):
        parse_z_range(value, depth=5)


def test_parse_z_range_holds_under_python_O():
    """The old parsers used `assert len(z) == 2`: under -O a 3-value range went through."""
    code = (
        "from napari_medsam.engine.validate import parse_z_range\n"
        "from napari_medsam.engine.errors import BoxError\n"
        "try:\n    parse_z_range('1,2,3')\nexcept BoxError:\n    print('refused')\n"
    )
    out = subprocess.run([sys.executable, "-O", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "refused"


# -- images and volumes share one numeric core -------------------------------------------
@pytest.mark.parametrize(
    "make, words",
    [
        (lambda: np.zeros((8, 8), bool), "boolean"),
        (lambda: np.zeros((8, 8), complex), "not a number type"),
        (lambda: np.array([["a", "b"], ["c", "d"]]), "not a number type"),
        (lambda: np.full((8, 8), 3.0), "constant"),
        (lambda: np.where(np.eye(8) > 0, np.nan, 1.0), "NaN or infinite"),
        (lambda: np.where(np.eye(8) > 0, -np.inf, 1.0), "NaN or infinite"),
    ],
)
def test_image_and_volume_checks_agree(make, words):
    img = make()
    with pytest.raises(ImageError, match=words):
        check_image(img)
    with pytest.raises(ImageError, match=words):
        check_volume(np.stack([img, img]))
    with pytest.raises(ImageError, match=words):
        check_planes(np.stack([img, img]))


NOT_PIXELS = {
    "None": (None, r"given \(got None\)"),
    "ragged rows": ([[1, 2, 3], [4, 5]], "not an array of pixels"),
    "ragged planes": ([np.zeros((4, 4)), np.zeros((5, 4))], "not an array of pixels"),
    "a path": ("scans/a.png", "read it first"),
    "a Path": (Path("scans/a.png"), "read it first"),
    "bytes": (b"\x89PNG\r\n", "read it first"),
}


@pytest.mark.parametrize("case", list(NOT_PIXELS))
def test_things_that_are_not_pixels_are_image_errors(case):
    """Before: a ragged list raised numpy's own ValueError; None and paths said 'dtype object / <U11
    is not a number type'."""
    value, words = NOT_PIXELS[case]
    for check in (check_image, check_volume, check_planes):
        with pytest.raises(ImageError, match=words):
            check(value)
    with pytest.raises(ImageError, match=words):
        model_input(value)


def test_ragged_image_through_the_real_model_is_an_image_error(lite):
    with pytest.raises(ImageError, match="not an array of pixels"):
        lite.segment([[1, 2, 3], [4, 5]], box=(0, 0, 1, 1))
    with pytest.raises(ImageError, match="not an array of pixels"):
        lite.embed([np.zeros((32, 32)), np.zeros((16, 32))])


def test_rgb_versus_volume_rule_is_the_named_constant():
    n = RGB_MIN_SIDE
    rng = np.random.default_rng(0)
    with pytest.raises(ImageError, match="looks like one RGB image"):
        check_volume(rng.random((n, n, 3)))
    arr, rgb = check_volume(rng.random((n - 1, n, 3)))  # 15 slices of 16 x 3: a volume
    assert arr.shape == (n - 1, n, 3) and not rgb
    arr, rgb = check_image(rng.random((n, n, 4)))
    assert rgb and arr.shape == (n, n, 3)


# -- the one image -> model uint8 path ------------------------------------------------------
def test_gray_to_rgb():
    g = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = gray_to_rgb(g)
    assert rgb.shape == (3, 4, 3) and rgb.flags.c_contiguous
    assert (rgb == g[..., None]).all()
    assert gray_to_rgb(np.zeros((2, 3, 4), np.uint8)).shape == (2, 3, 4, 3)


def test_model_input_kinds():
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 4000, (20, 30)).astype(np.uint16)
    u8 = model_input(gray, "image")
    assert u8.shape == (20, 30, 3) and u8.dtype == np.uint8
    np.testing.assert_array_equal(u8, model_input(gray, "2d"))
    rgba = rng.integers(0, 255, (20, 30, 4)).astype(np.uint8)
    np.testing.assert_array_equal(model_input(rgba, "rgb"), rgba[..., :3])
    vol = rng.integers(-1000, 1000, (4, 20, 30)).astype(np.int16)
    r = convert(vol, "volume")
    assert r.pixels.shape == (4, 20, 30) and r.intensity == Intensity("ct", (40.0, 400.0)) and not r.rgb
    planes = convert(np.stack([gray, gray]), "planes")
    assert planes.pixels.shape == (2, 20, 30)
    np.testing.assert_array_equal(gray_to_rgb(planes.pixels[0]), u8)  # whole-stack rule = one image's here
    with pytest.raises(ImageError, match="unknown input kind"):
        model_input(gray, "movie")
    with pytest.raises(ImageError, match="constant after the ct window"):
        model_input(np.full((8, 8), 3000.0) + np.eye(8), "image", "ct")


def test_model_input_equals_the_predictor(lite, samples):
    from napari_medsam.engine.io import read_image

    img = read_image(samples / "busi_malignant_1.png").array
    np.testing.assert_array_equal(lite.prepare(img), model_input(img))


# -- extreme ranges (defect 6) ---------------------------------------------------------------
def _ramp(lo: float, hi: float, dtype=np.float64, shape=(32, 32)) -> np.ndarray:
    t = np.linspace(0.0, 1.0, shape[0] * shape[1]).reshape(shape)
    return (lo * (1.0 - t) + hi * t).astype(dtype)  # neither term overflows


def _monotonic_and_full(src: np.ndarray, u8: np.ndarray) -> None:
    order = np.argsort(src.ravel(), kind="stable")
    vals = u8.reshape(src.shape[0], src.shape[1], -1)[..., 0].ravel()[order].astype(int)
    assert (np.diff(vals) >= 0).all(), "the 8-bit values do not follow the intensities"
    assert vals.min() == 0 and vals.max() == 255


@pytest.mark.parametrize(
    "src, modality",
    [
        (_ramp(-1.7e308, 1.7e308), "rgb"),
        (_ramp(-1.7976931348623157e308, 1.7976931348623157e308), "rgb"),
        (_ramp(0, 1.7e308), "mr"),
        (_ramp(0, 1.7e308), "auto"),
        (_ramp(-1.7e308, 1.7e308), "mr"),
        (_ramp(-65504, 65504, np.float16), "rgb"),
        (_ramp(0, 65504, np.float16), "auto"),
        (_ramp(1.0, 1.0 + 1e-12), "rgb"),  # tiny range: was flattened by a 1e-8 floor
        (_ramp(1.0, 1.0 + 1e-12), "auto"),
        (_ramp(0, 1e-300), "auto"),
        (_ramp(0, 1e-310), "auto"),  # denormals
        (_ramp(0, 5e-321), "rgb"),
        (np.arange(1024, dtype=np.int64).reshape(32, 32) * (2**53) - 2**62, "rgb"),  # huge int64
        (np.linspace(0, 2**64 - 1, 1024, dtype=np.uint64).reshape(32, 32), "auto"),
        (_ramp(1e300, 1.7e308), "auto"),
    ],
)
def test_extreme_ranges_scale_without_overflow(src, modality):
    rgb_src = np.repeat(src[..., None], 3, -1) if modality == "rgb" else src
    with np.errstate(over="raise", invalid="raise", divide="raise"):  # no overflow, NaN or division on the way
        u8 = model_input(rgb_src, "image", modality)
    assert u8.dtype == np.uint8 and u8.shape == src.shape + (3,)
    _monotonic_and_full(src, u8)


def test_extreme_range_volume_and_planes():
    vol = np.stack([_ramp(-1.7e308, 1.7e308)] * 3)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        u8 = convert(np.repeat(vol[..., None], 3, -1), "volume", "rgb").pixels
    assert u8.min() == 0 and u8.max() == 255
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        planes = convert(vol, "planes", "mr").pixels  # positives only, percentiles over the stack
    assert planes.max() == 255


def test_long_double_beyond_float64_says_so():
    if np.finfo(np.longdouble).max <= np.finfo(np.float64).max:
        pytest.skip("long double is float64 on this platform")
    img = _ramp(0, 1, np.longdouble) * np.longdouble(1e308) * np.longdouble(1e10)
    rule = resolve_modality(img, "mr")
    with pytest.raises(ImageError, match="beyond the float64 range"):
        to_uint8(img, rule)


def test_extreme_float_image_through_the_real_model(lite, samples):
    """An RGB image spread over +-1.7e308 segments like its 8-bit original (it said 'constant' before)."""
    from napari_medsam.engine.io import read_image

    rgb = read_image(samples / "isic_0014270.png").array[..., :3]
    lo, hi = float(rgb.min()), float(rgb.max())
    t = (rgb.astype(np.float64) - lo) / (hi - lo)
    huge = -1.7e308 * (1.0 - t) + 1.7e308 * t
    assert np.isfinite(huge).all() and huge.min() < -1e308 and huge.max() > 1e308
    box = (150, 100, 600, 500)
    ref = lite.segment(rgb.astype(np.float64) / 255.0, box=box, modality="rgb")
    got = lite.segment(huge, box=box, modality="rgb")
    inter = np.logical_and(ref, got).sum()
    assert 2 * inter / (ref.sum() + got.sum()) > 0.99
