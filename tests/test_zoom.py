"""Zoomed box segmentation (engine/zoom.py): real LiteMedSAM weights on the bundled samples."""

from __future__ import annotations

import inspect
import tracemalloc

import numpy as np
import pytest

from napari_medsam import MedSAM
from napari_medsam.engine import zoom
from napari_medsam.engine.cache import EmbeddingCache
from napari_medsam.engine.errors import ImageError
from napari_medsam.engine.evaluation import dice, load_cases
from napari_medsam.engine.io import read_image


def _load(exact: bool) -> MedSAM:
    if "exact" in inspect.signature(MedSAM.load).parameters:
        return MedSAM.load("litemedsam", device="cpu", cache=EmbeddingCache(), exact=exact)
    return MedSAM.load("litemedsam", device="cpu", cache=EmbeddingCache(), fast=None if exact else True)


@pytest.fixture(scope="module")
def default_model():
    return _load(exact=False)


@pytest.fixture(scope="module")
def nuclei(samples):
    cases = [c for c in load_cases(samples, dims=2) if c.modality == "fluorescence"]
    image = read_image(cases[0].image).array
    return image, cases


def test_crop_window_is_a_square_on_the_ladder_holding_the_box():
    shape = (1000, 1000)
    rungs = {round(64 * 2 ** (i / 2)) for i in range(12)}
    for box in [(100, 100, 120, 118), (0, 0, 9, 9), (990, 400, 999, 430), (300, 300, 700, 650)]:
        y0, y1, x0, x1 = zoom.crop_window(box, shape)
        side = y1 - y0
        assert side == x1 - x0 and side in rungs
        assert x0 <= box[0] and box[2] < x1 and y0 <= box[1] and box[3] < y1
        assert side >= zoom.DEFAULT.context * max(box[2] - box[0] + 1, box[3] - box[1] + 1)
        for start, stop in ((y0, y1), (x0, x1)):
            assert start % (side // 4) == 0 or stop == 1000
    # a crop never leaves the image, and a box near a corner gets a crop clipped into it
    assert zoom.crop_window((995, 995, 999, 999), shape) == (936, 1000, 936, 1000)


def test_neighbouring_boxes_snap_to_one_crop():
    shape = (512, 512)
    base = zoom.crop_window((200, 200, 220, 220), shape)
    assert zoom.crop_window((203, 198, 222, 219), shape) == base  # a redrawn box: same crop
    assert zoom.crop_window((201, 202, 219, 221), shape) == base


def test_default_beats_exact_on_small_nuclei(lite, default_model, nuclei):
    """dsb2018 nuclei (boxes about 5% of the image): Dice vs their ground truth."""
    image, cases = nuclei
    exact = _load(exact=True) if getattr(lite, "fast", None) is not None else lite
    rgb = exact.prepare(image)
    emb = exact.embed_rgb(rgb)
    full = default_model.embed_rgb(default_model.prepare(image))
    d_exact, d_zoom = [], []
    for c in cases[:10]:
        gt = c.ground_truth()
        d_exact.append(dice(exact.predict(emb, c.box).masks[0], gt))
        mask, info = zoom.segment_box(default_model, rgb, c.box, full_embedding=full)
        assert mask.shape == gt.shape and mask.dtype == bool
        d_zoom.append(dice(mask, gt))
    assert np.mean(d_zoom) > np.mean(d_exact) + 0.03, (np.mean(d_exact), np.mean(d_zoom))


def test_crops_are_shared_through_the_cache(default_model, nuclei):
    image, cases = nuclei
    rgb = default_model.prepare(image)
    default_model.cache.clear()
    full = default_model.embed_rgb(rgb)
    encodes = windows = 0
    seen = set()
    for c in cases[:12]:
        _, info = zoom.segment_box(default_model, rgb, c.box, full_embedding=full)
        encodes += info.encodes
        for w in info.crops:
            windows += w not in seen
            seen.add(w)
    assert encodes == windows  # one encode per distinct crop: two boxes sharing one never pay twice
    for c in cases[:12]:
        for w in zoom.crop_windows(c.box, rgb.shape[:2]):
            seen.discard(w)
    assert not seen
    # a box redrawn a few pixels off (the same nucleus) pays only for crops it does not share
    # (snapping puts crop origins on a grid, so most 1-px shifts of a box land on the crops it had)
    seen = {w for c in cases[:12] for w in zoom.crop_windows(c.box, rgb.shape[:2])}
    x0, y0, x1, y1 = cases[0].box
    shifts = [(dx, dy) for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy]
    shared = 0
    for dx, dy in shifts:
        windows_now = zoom.crop_windows((x0 + dx, y0 + dy, x1 + dx, y1 + dy), rgb.shape[:2])
        shared += sum(w in seen for w in windows_now)
    assert shared > 0
    redrawn = (x0 + 1, y0 - 1, x1 + 2, y1)
    new = [w for w in zoom.crop_windows(redrawn, rgb.shape[:2]) if w not in seen]
    assert zoom.segment_box(default_model, rgb, redrawn)[1].encodes == len(new)
    # the same boxes again: every crop comes from the cache
    again = sum(zoom.segment_box(default_model, rgb, c.box)[1].encodes for c in cases[:12])
    assert again == 0


def test_exact_model_keeps_the_authors_path(nuclei):
    image, cases = nuclei
    exact = _load(exact=True)
    if getattr(exact, "exact", True) is not True and exact.fast is not None:
        pytest.skip("this checkout has no exact model")
    emb = exact.embed(image)
    for c in cases[:3]:
        assert np.array_equal(exact.segment(image, box=c.box), exact.predict(emb, c.box).masks[0])


def test_large_image_is_annotated_through_crops_only(default_model, nuclei):
    """A real sample tiled to 10,240 x 10,240 px: no full-view encode, a few MB of work."""
    image, cases = nuclei
    plane = default_model.prepare(image)[..., 0]  # the sample is uint16: the model's own uint8 view of it
    assert plane.dtype == np.uint8
    big = np.tile(plane, (20, 20))
    assert big.shape == (10240, 10240)
    c = cases[0]
    gt = c.ground_truth()
    oy, ox = 7 * 512, 13 * 512
    box = (c.box[0] + ox, c.box[1] + oy, c.box[2] + ox, c.box[3] + oy)
    cache = default_model.cache
    cache.clear()
    tracemalloc.start()
    mask, info = zoom.segment_box(default_model, big, box, full_size=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert info.path == "crop-only"
    y0, y1, x0, x1 = info.window
    assert mask.shape == (y1 - y0, x1 - x0)
    assert max(y1 - y0, x1 - x0) <= 512
    assert all(max(e.original_size) <= 512 for e in cache._mem.values())
    assert peak < 64 << 20, f"peak traced memory {peak / 2**20:.1f} MB"
    # the mask lands on the tiled object (its copies lie 512 px apart, outside the crop)
    local_gt = np.tile(gt, (20, 20))[y0:y1, x0:x1]
    assert dice(mask, local_gt) > 0.7


def test_bad_input_names_the_problem(default_model):
    with pytest.raises(ImageError, match="8-bit"):
        zoom.segment_box(default_model, np.random.rand(300, 300, 3), (10, 10, 40, 40))
    with pytest.raises(ImageError, match="shape"):
        zoom.segment_box(default_model, np.zeros((3, 300, 300, 3), np.uint8), (10, 10, 40, 40))
