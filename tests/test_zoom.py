"""Zoomed box segmentation (engine/zoom.py): real LiteMedSAM weights on the bundled samples."""

from __future__ import annotations

import dataclasses
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
    known = list(zoom.known_windows(default_model, rgb, full))  # crops a redrawn box may share
    new = [w for w in zoom.crop_windows(redrawn, rgb.shape[:2], known=known) if w not in seen]
    assert zoom.segment_box(default_model, rgb, redrawn)[1].encodes == len(new)
    # the same boxes again: every crop comes from the cache
    again = sum(zoom.segment_box(default_model, rgb, c.box)[1].encodes for c in cases[:12])
    assert again == 0


def _labelled_nuclei(samples, n):
    """(box, label mask) of the ``n`` labelled nuclei nearest the image centre, in reading order."""
    from scipy import ndimage

    lab = read_image(samples / "dsb2018_nuclei_labels.png").array
    lab = lab if lab.ndim == 2 else lab[..., 0]
    found = []
    for i, sl in enumerate(ndimage.find_objects(lab)):
        if sl is None:
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop - 1, sl[1].start, sl[1].stop - 1
        if min(x1 - x0, y1 - y0) >= 6:
            d = np.hypot((x0 + x1 - lab.shape[1]) / 2, (y0 + y1 - lab.shape[0]) / 2)
            found.append((d, (x0, y0, x1, y1), lab == i + 1))
    found = sorted(found, key=lambda f: f[0])[:n]
    return [(b, m) for _, b, m in sorted(found, key=lambda f: (f[1][1] // 40, f[1][0]))]


def test_neighbouring_nuclei_share_encoded_crops(default_model, nuclei, samples):
    """An annotator's session on the nuclei sample: boxes accepted one after another reuse crops
    encoded for their neighbours (fewer encodes than without sharing), and the masks hold vs the labels."""
    image, _ = nuclei
    rgb = default_model.prepare(image)
    full = default_model.embed_rgb(rgb)
    boxes = _labelled_nuclei(samples, 16)
    shape = rgb.shape[:2]
    result = {}
    for share in (False, True):
        default_model.cache.clear()
        default_model._zoom_windows = None  # a fresh session: no crops known yet
        settings = dataclasses.replace(zoom.DEFAULT, share=share, full_iou=None)
        encodes, dices = 0, []
        for box, gt in boxes:
            mask, info = zoom.segment_box(default_model, rgb, box, full_embedding=full, settings=settings)
            assert info.path == "zoom"
            snapped = zoom.crop_windows(box, shape, settings)
            for w in info.crops:  # its own snapped crop, or a neighbour's that holds the box with a margin
                assert w in snapped or (share and zoom.holds(w, box, shape, settings.share_margin)), (w, box)
            encodes += info.encodes
            dices.append(dice(mask, gt))
        result[share] = encodes, float(np.mean(dices))
    (enc_own, d_own), (enc_shared, d_shared) = result[False], result[True]
    assert enc_shared < enc_own, result
    assert d_shared > d_own - 0.01, result
    full_dice = np.mean([dice(default_model.predict(full, b).masks[0], gt) for b, gt in boxes])
    assert d_shared > full_dice, (result, full_dice)


def test_a_confident_full_view_answers_alone(default_model, nuclei):
    """The ``full_iou`` gate: a box whose full-view answer is confident costs no crop encode."""
    image, cases = nuclei
    rgb = default_model.prepare(image)
    full = default_model.embed_rgb(rgb)
    cases = cases[:10]
    ious = [float(default_model.predict(full, c.box).iou[0]) for c in cases]
    shape = rgb.shape[:2]
    assert all(zoom.zoom_factor(zoom.crop_window(c.box, shape), shape) >= zoom.DEFAULT.min_zoom for c in cases)
    gate = float(np.median(ious))  # half of these small boxes are confident at this gate
    settings = dataclasses.replace(zoom.DEFAULT, full_iou=gate)
    paths = []
    for c, iou in zip(cases, ious, strict=True):
        mask, info = zoom.segment_box(default_model, rgb, c.box, full_embedding=full, settings=settings)
        paths.append(info.path)
        if iou >= gate:
            assert info.path == "full" and info.encodes == 0 and not info.crops
            assert np.array_equal(mask, zoom.fill_holes(default_model.predict(full, c.box).masks[0]))
        else:
            assert info.path == "zoom" and info.crops
    assert "full" in paths and "zoom" in paths
    no_gate = dataclasses.replace(zoom.DEFAULT, full_iou=None)
    assert all(zoom.segment_box(default_model, rgb, c.box, full, no_gate)[1].path == "zoom" for c in cases[:3])


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
