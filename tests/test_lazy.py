"""Lazy 8-bit views of slides (engine/lazy.py, engine/lazy_stats.py): the same pixels as the whole-image
conversion, read slice by slice; real images, the real model for the crop path."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest

from napari_medsam._annotator.encoding import EncoderService, Source, model_input
from napari_medsam.engine.errors import ImageError
from napari_medsam.engine.evaluation import load_cases
from napari_medsam.engine.intensity import convert
from napari_medsam.engine.io import read_image
from napari_medsam.engine.lazy import LazyU8, large_planes, lazy_planes
from napari_medsam.engine.lazy_stats import GRID, TILE, Counts
from napari_medsam.engine.zoom import segment_box


class Recorder:
    """A numpy array that records the windows read from it (an array-like, as a zarr array is)."""

    def __init__(self, array: np.ndarray, chunks=None):
        self.array, self.reads = array, []
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        if chunks is not None:
            self.chunks = chunks

    def __getitem__(self, key):
        self.reads.append(key)
        return self.array[key]

    def pixels_read(self) -> int:
        return sum(int(np.prod(self.array[k].shape[:2])) for k in self.reads)


@pytest.fixture(scope="module")
def images(samples):
    nuclei = read_image(samples / "dsb2018_nuclei.png").array.astype(np.uint16) * 250  # 16-bit fluorescence
    skin = read_image(samples / "isic_0014270.png").array  # 8-bit RGB
    us = read_image(samples / "busi_malignant_1.png").array[..., 0]
    return nuclei, skin, us


def _cases(images):
    nuclei, skin, us = images
    ct = (us.astype(np.int16) * 8 - 1024).astype(np.int16)  # Hounsfield-like: the soft-tissue window
    rgba = np.concatenate([skin, np.full(skin.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    return [
        ("percentile", nuclei, {}),
        ("ct-auto", ct, {}),
        ("ct-window", ct, {"modality": "ct", "window": (40.0, 80.0)}),
        ("rgb16", skin.astype(np.uint16) * 100, {"rgb": True}),
        ("rgba8", rgba, {"rgb": True}),
        ("8bit-as-rgb", skin, {"rgb": True, "modality": "rgb"}),
        ("mr-volume", np.stack([nuclei, nuclei // 2, nuclei[::-1]]), {"modality": "mr"}),
    ]


@pytest.mark.parametrize("chunked", [True, False])
def test_lazy_pixels_equal_the_whole_conversion(images, chunked):
    """Integer data up to 16 bits: value counts streamed a few chunks at a time give convert's statistics exactly."""
    for name, arr, kw in _cases(images):
        src = da.from_array(arr, chunks=(128,) * 2 + arr.shape[2:]) if chunked else Recorder(arr)
        lazy = lazy_planes(src, kw.get("modality", "auto"), kw.get("window"), rgb=kw.get("rgb", False))
        ref = convert(arr, "planes", kw.get("modality", "auto"), kw.get("window"), rgb=kw.get("rgb", False)).pixels
        assert lazy.shape == ref.shape and lazy.dtype == np.uint8, name
        assert np.array_equal(np.asarray(lazy), ref), name
        key = (slice(None),) * (ref.ndim - 2 - kw.get("rgb", False)) + (slice(10, 50), slice(20, 90))
        assert np.array_equal(lazy[key], ref[key]), name
        in_memory = lazy_planes(arr, kw.get("modality", "auto"), kw.get("window"), rgb=kw.get("rgb", False))
        assert np.array_equal(np.asarray(in_memory), ref), name


def test_composed_channels_equal_compose_channels(images):
    nuclei, skin, _ = images
    stack = np.stack([nuclei, skin[:512, :512, 0].astype(np.uint16) * 3])
    for picked in [(1, 0), (0,), (1,)]:
        ref = convert(stack, "planes", channels=picked).pixels
        lazy = lazy_planes(da.from_array(stack, chunks=(1, 200, 200)), channels=picked)
        assert lazy.shape == ref.shape
        assert np.array_equal(np.asarray(lazy), ref)
        assert np.array_equal(lazy[5:60, 100:180], ref[5:60, 100:180])
        assert np.array_equal(lazy[5:60, 100:180, 1], ref[5:60, 100:180, 1])


def test_counts_percentiles_are_numpys(images):
    rng = np.random.default_rng(3)
    for arr in [images[0], (rng.normal(0, 900, (300, 300))).astype(np.int16), rng.integers(0, 9, (50, 50), np.uint16)]:
        c = Counts(arr.dtype)
        c.add(arr)
        pos = arr[arr > 0].astype(np.float64)
        assert c.positive_percentiles([0.5, 99.5, 50.0]) == [float(np.percentile(pos, q)) for q in (0.5, 99.5, 50.0)]
        assert c.extremes() == (int(arr.min()), int(arr.max()))


def test_8bit_slide_is_read_only_where_sliced(images):
    _, skin, _ = images
    big = np.tile(skin, (5, 5, 1))  # 3400 x 5120 x 3 > large_side
    rec = Recorder(big)
    assert large_planes(rec, rgb=True)
    lazy = model_input(Source(rec, rgb=True))
    assert isinstance(lazy, LazyU8) and not rec.reads, "8-bit data: no statistics, nothing read"
    crop = lazy.plane(())[1000:1200, 2000:2300]
    assert np.array_equal(crop, big[1000:1200, 2000:2300])
    assert rec.reads == [(slice(1000, 1200), slice(2000, 2300))]


def test_float_slide_statistics_come_from_a_sample(images):
    nuclei = images[0].astype(np.float32) / 7.0
    big = np.tile(nuclei, (9, 9))  # 4608 px
    rec = Recorder(big, chunks=(512, 512))
    lazy = lazy_planes(rec)
    assert lazy.intensity.rule == "percentile"
    assert rec.pixels_read() <= GRID * GRID * TILE * TILE < 0.15 * big.size, "a sample of windows, not the slide"
    assert all(np.prod(big[k].shape) <= TILE * TILE for k in rec.reads)
    ref = convert(nuclei, "planes").pixels  # the tile's own percentiles: the mosaic's
    got = lazy[512:1024, 1024:1536]
    assert np.mean(np.abs(got.astype(int) - ref.astype(int))) < 3


def test_16bit_streams_chunk_by_chunk(images):
    big = np.tile(images[0], (9, 9))
    rec = Recorder(big, chunks=(512, 512))
    lazy = lazy_planes(rec)
    spans = [(k[0].start, k[0].stop, k[1].start, k[1].stop) for k in rec.reads]
    assert all(v % 512 == 0 or v == big.shape[0] for w in spans for v in w), "whole chunks"
    assert all((b - a) * (d - c) <= 2048 * 2048 for a, b, c, d in spans), "a few chunks at a time"
    seen = np.zeros(big.shape, np.int8)
    for a, b, c, d in spans:
        seen[a:b, c:d] += 1
    assert (seen == 1).all(), "every pixel counted once"
    assert np.array_equal(lazy[2000:2100, 300:700], convert(big, "planes").pixels[2000:2100, 300:700])


def test_bad_slides_raise():
    with pytest.raises(ImageError, match="constant"):
        lazy_planes(da.zeros((5000, 5000), dtype=np.uint16, chunks=1000))
    with pytest.raises(ImageError, match="boolean"):
        lazy_planes(da.zeros((5000, 5000), dtype=bool, chunks=1000))
    nan = da.from_array(np.full((600, 600), np.nan, np.float32), chunks=300)
    with pytest.raises(ImageError, match="NaN"):
        lazy_planes(nan)


def test_small_images_keep_the_whole_conversion(images):
    nuclei = images[0]
    out = model_input(Source(da.from_array(nuclei, chunks=128), rgb=False))
    assert isinstance(out, np.ndarray) and np.array_equal(out, convert(nuclei, "planes").pixels)


def test_crop_path_on_a_lazy_slide_matches_the_converted_slide(lite_default, images, samples):
    """The real model: a box on a dask slide gives the mask of the same box on the converted numpy slide."""
    case = next(c for c in load_cases(samples, dims=2) if c.modality == "fluorescence")
    big = np.tile(images[0], (9, 9))
    slide = da.from_array(big, chunks=512)
    x0, y0, x1, y1 = case.box
    box = (x0 + 5 * 512, y0 + 4 * 512, x1 + 5 * 512, y1 + 4 * 512)
    svc = EncoderService(lite_default)
    try:
        svc.set_source(Source(slide, rgb=False))
        assert svc.request(()).result(120) is None and svc.encoded == 0
        plane = svc.plane(())
        assert isinstance(plane, LazyU8) and svc.plane(()) is plane
        mask, info = segment_box(lite_default, plane, box)
    finally:
        svc.shutdown()
    ref, ref_info = segment_box(lite_default, convert(big, "planes").pixels, box)
    assert info.path == "crop-only" and mask.any()
    assert np.array_equal(mask, ref) and info.crops == ref_info.crops
