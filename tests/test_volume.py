"""Tests for napari_medsam.engine.volume: 3D propagation, stop rule, key boxes, labels.

Two kinds of model:

* a scripted model (decoder = the true object clipped to the box) for the exact
  arithmetic of the stop rule, chaining margins and key-box interpolation: it
  can dictate predicted IoUs and fragments that no real image reliably produces;
* the real LiteMedSAM weights, for the same behaviours on a synthetic ellipsoid it
  segments at Dice > 0.99 (stops at the ends, encodes once, cache, z-range, RGB,
  IoU floor, cancel), and on real volumes (bundled brain MR always; the shared
  test data when present).
"""

from __future__ import annotations

import threading
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from _data import SAMPLES, require_shared
from napari_medsam.engine.cache import Embedding, EmbeddingCache, embedding_key
from napari_medsam.engine.errors import BoxError, ImageError, MedSAMError, OptionTypeError
from napari_medsam.engine.evaluation import dice, load_cases, safe_name
from napari_medsam.engine.predictor import Prediction
from napari_medsam.engine.recipes import LiteMedSAMRecipe, MedSAMRecipe
from napari_medsam.engine.validate import normalize_boxes
from napari_medsam.engine.volume import (
    StopRule,
    chained_box,
    interpolate_boxes,
    paste_object,
    propagate,
    segment_volume,
)

BRAIN_BOX, BRAIN_KEY, BRAIN_RANGE = (162, 84, 206, 115), 16, (11, 17)


def _read_nifti(path: Path) -> np.ndarray:
    from napari_medsam.engine.io import read_image

    return read_image(path).array


# -- a fake model: exact, instant ---------------------------------------------------
class FakeModel:
    """Decoder returns the true object inside the box; slice z is read from pixel (0, 0)."""

    name = "fake"

    def __init__(self, truth: np.ndarray, iou=lambda z: 0.95, recipe=None):
        self.truth = truth
        self.iou = iou
        self.recipe = recipe or LiteMedSAMRecipe()
        self.cache = EmbeddingCache()
        self.encoded = []
        self.boxes = {}

    def embed_rgb_status(self, rgb, use_cache=True):
        key = embedding_key(self.name, rgb)
        hit = self.cache.get(key)
        if hit is not None:
            return hit, False
        z = int(rgb[0, 0, 0]) - 1
        self.encoded.append(z)
        return self.cache.put(
            Embedding(torch.zeros(1, 1), rgb.shape[:2], rgb.shape[:2], self.name, key, {"z": z})
        ), True

    def predict(self, emb, boxes, region=None):
        z = emb.meta["z"]
        b = normalize_boxes(boxes, emb.original_size)
        x0, y0, x1, y1 = (int(v) for v in np.round(b[0]))
        m = np.zeros(emb.original_size, bool)
        m[y0 : y1 + 1, x0 : x1 + 1] = self.truth[z, y0 : y1 + 1, x0 : x1 + 1]
        self.boxes[z] = b[0]
        return Prediction(m[None], np.array([self.iou(z)], np.float32), b)


def _ball(depth=30, size=64, center=(15, 32, 32), radius=(5, 12, 12)):
    zz, yy, xx = np.ogrid[:depth, :size, :size]
    c, r = center, radius
    return ((zz - c[0]) / r[0]) ** 2 + ((yy - c[1]) / r[1]) ** 2 + ((xx - c[2]) / r[2]) ** 2 <= 1.0


def _volume(truth: np.ndarray) -> np.ndarray:
    vol = np.where(truth, 200, 60).astype(np.uint8)
    vol[:, 0, 0] = np.arange(1, truth.shape[0] + 1)  # slice id for the fake model
    return vol


def _box_of(mask2d):
    ys, xs = np.nonzero(mask2d)
    return (xs.min(), ys.min(), xs.max(), ys.max())


def test_stops_where_object_ends_and_encodes_each_slice_once():
    truth = _ball()  # slices 10..20
    model = FakeModel(truth)
    seen, records, order = [], [], []
    stats = {}
    only_empty = StopRule(min_area_ratio=0.0, min_iou=0.0)  # the ball's tips are single pixels
    mask = segment_volume(
        model,
        _volume(truth),
        _box_of(truth[15]),
        15,
        modality="uint8",
        stop=only_empty,
        on_slice=lambda z, m: (seen.append((z, m.copy())), order.append(("slice", z))),
        on_record=lambda r: (records.append(r), order.append(("record", r.z))),
        stats=stats,
    )
    assert mask.dtype == bool and mask.shape == truth.shape
    # on_record: every slice's record as it comes (kept or not), each before that slice's on_slice
    assert [asdict(r) for r in records] == stats["slices"]
    for z, _ in seen:
        assert order.index(("record", z)) < order.index(("slice", z))
    assert dice(mask, truth) == 1.0
    assert stats["z_extent"] == (10, 20)
    assert stats["stopped"] == {"up": "empty", "down": "empty"}
    # one empty slice past each end is computed, nothing further, nothing twice
    assert sorted(stats["encoded"]) == list(range(9, 22))
    assert len(model.encoded) == len(set(model.encoded)) == 13
    # the viewer callback saw every kept slice once, the key slice first
    assert seen[0][0] == 15
    assert sorted(z for z, _ in seen) == list(range(10, 21))
    for z, m in seen:
        assert np.array_equal(m, mask[z])
    # again: everything comes from the cache
    stats2 = {}
    segment_volume(model, _volume(truth), _box_of(truth[15]), 15, modality="uint8", stop=only_empty, stats=stats2)
    assert stats2["n_encoded"] == 0 and sorted(stats2["cached"]) == list(range(9, 22))


@pytest.mark.parametrize("recipe", [LiteMedSAMRecipe(), MedSAMRecipe()], ids=["lite-256", "medsam-1024"])
def test_chained_prompt_is_previous_box_plus_margin_at_model_scale(recipe):
    truth = np.zeros((6, 60, 120), bool)
    truth[:, 20:40, 30:70] = True
    model = FakeModel(truth, recipe=recipe)
    res = propagate(model, _volume(truth), (30, 20, 69, 39), 2, modality="uint8", z_range=(2, 3))
    rec = {s.z: s for s in res.slices}
    if recipe.name == "medsam":  # 5 px at 1024, per axis: x * 120/1024, y * 60/1024
        mx, my = 5 * 120 / 1024, 5 * 60 / 1024
    else:  # 3 px at 256 on the longest side (120)
        mx = my = 3 * 120 / 256
    assert rec[3].prompt == "chained"
    np.testing.assert_allclose(rec[3].box, (30 - mx, 20 - my, 69 + mx, 39 + my))
    np.testing.assert_allclose(chained_box(truth[0], (mx, my)), rec[3].box)
    # explicit margin: 0 gives the tight box
    res0 = propagate(model, _volume(truth), (30, 20, 69, 39), 2, modality="uint8", z_range=(2, 3), margin=0)
    np.testing.assert_allclose(next(s for s in res0.slices if s.z == 3).box, (30, 20, 69, 39))


def test_area_collapse_and_low_iou_stop_a_direction():
    truth = np.zeros((20, 64, 64), bool)
    truth[5:15, 16:48, 16:48] = True
    truth[15, 30:32, 30:32] = True  # a 4-pixel fragment: the object has ended
    truth[4, 30:32, 30:32] = True
    vol = _volume(truth)
    res = propagate(
        FakeModel(truth), vol, (16, 16, 47, 47), 10, modality="uint8", stop=StopRule(min_area_ratio=0.2, min_iou=0.0)
    )
    assert res.stopped == {"up": "area", "down": "area"} and res.z_extent == (5, 14)
    kept = propagate(
        FakeModel(truth),
        vol,
        (16, 16, 47, 47),
        10,
        modality="uint8",
        stop=StopRule(min_area_ratio=0.2, min_iou=0.0, keep_last=True),
    )
    assert kept.z_extent == (4, 15)
    low = propagate(
        FakeModel(truth, iou=lambda z: 0.3 if z >= 13 else 0.9),
        vol,
        (16, 16, 47, 47),
        10,
        modality="uint8",
        stop=StopRule(min_area_ratio=0.0, min_iou=0.5),
    )
    assert low.stopped == {"up": "iou", "down": "empty"} and low.z_extent == (4, 12)  # no area rule: fragment kept
    # the authors' behaviour: no stop at all, whole volume visited
    never = propagate(FakeModel(truth), vol, (16, 16, 47, 47), 10, modality="uint8", stop=StopRule.never())
    assert never.stopped == {"up": "end", "down": "end"} and len(never.slices) == 20


def test_intensity_shift_stops_when_the_mask_moves_onto_other_tissue():
    truth = np.zeros((20, 64, 64), bool)
    truth[3:18, 16:48, 16:48] = True
    vol = _volume(truth)
    vol[13:, 16:48, 16:48] = 120  # same shape, but from slice 13 on it is darker tissue: 200 -> 120
    res = propagate(FakeModel(truth), vol, (16, 16, 47, 47), 8, modality="uint8")
    assert res.stopped == {"up": "intensity", "down": "empty"} and res.z_extent == (3, 12)
    assert [s.mean for s in res.slices if s.z == 13] == [120.0]
    # a shift below the floor (30 grey levels) or the relative limit does not stop
    vol[13:, 16:48, 16:48] = 175
    assert propagate(FakeModel(truth), vol, (16, 16, 47, 47), 8, modality="uint8").z_extent == (3, 17)
    off = StopRule(max_intensity_shift=None)
    vol[13:, 16:48, 16:48] = 120
    assert propagate(FakeModel(truth), vol, (16, 16, 47, 47), 8, modality="uint8", stop=off).z_extent == (3, 17)


def test_z_range_bounds_both_directions():
    truth = _ball()
    model = FakeModel(truth)
    res = propagate(
        model, _volume(truth), _box_of(truth[15]), 15, modality="uint8", z_range=(13, 17), stop=StopRule.never()
    )
    assert res.z_extent == (13, 17) and res.stopped == {"up": "z_range", "down": "z_range"}
    assert sorted(res.encoded) == list(range(13, 18))


def test_key_boxes_are_interpolated_inside_their_span_and_chained_beyond():
    truth = np.zeros((20, 80, 80), bool)
    for z in range(2, 18):  # a square drifting right by 2 px per slice between the boxed slices 5 and 12
        x = 10 + 2 * min(max(z, 5), 12)
        truth[z, 20:40, x : x + 20] = True
    b5, b12 = np.array(_box_of(truth[5]), float), np.array(_box_of(truth[12]), float)
    model = FakeModel(truth)
    res = propagate(model, _volume(truth), None, None, modality="uint8", key_boxes={5: b5, 12: b12})
    rec = {s.z: s for s in res.slices}
    for z in range(6, 12):
        assert rec[z].prompt == "interpolated"
        np.testing.assert_allclose(rec[z].box, b5 + (b12 - b5) * (z - 5) / 7)
    assert rec[5].prompt == rec[12].prompt == "key"
    assert rec[13].prompt == "chained" and rec[4].prompt == "chained"
    assert res.z_extent == (2, 17) and dice(res.mask, truth) == 1.0
    np.testing.assert_allclose(interpolate_boxes({0: [0, 0, 10, 10], 4: [4, 8, 14, 18]}, 1), [1, 2, 11, 12])
    # box + slice count as one more key box; a slice outside the span without a box is refused
    res2 = propagate(model, _volume(truth), b5, 5, modality="uint8", key_boxes={12: b12})
    assert {s.z: s.prompt for s in res2.slices}[8] == "interpolated"
    with pytest.raises(BoxError, match="outside the span"):
        propagate(model, _volume(truth), None, 15, modality="uint8", key_boxes={5: b5, 12: b12})


def test_cancel_returns_what_is_done():
    truth = _ball()
    model = FakeModel(truth)
    ev = threading.Event()
    done = []

    def on_slice(z, m):
        done.append(z)
        if len(done) == 3:
            ev.set()

    stats = {}
    mask = segment_volume(
        model, _volume(truth), _box_of(truth[15]), 15, modality="uint8", on_slice=on_slice, cancel=ev, stats=stats
    )
    assert stats["cancelled"] is True and len(done) == 3
    assert sorted(np.flatnonzero(mask.any(axis=(1, 2)))) == sorted(done)
    assert len(model.encoded) == 3
    ev2 = threading.Event()
    ev2.set()
    st = {}
    assert not segment_volume(model, _volume(truth), _box_of(truth[15]), 15, cancel=ev2, stats=st).any()
    assert st["cancelled"] and st["n_encoded"] == 0


def test_rgb_volume_is_supported():
    truth = _ball()
    vol = np.repeat(_volume(truth)[..., None], 3, axis=-1)
    res = propagate(FakeModel(truth), vol, _box_of(truth[15]), 15, stop=StopRule(min_area_ratio=0))
    assert res.mask.shape == truth.shape and dice(res.mask, truth) == 1.0


@pytest.mark.parametrize(
    "volume, box, z, kwargs, err, match",
    [
        (np.random.rand(64, 64), (1, 1, 9, 9), 0, {}, ImageError, "2D image"),
        (np.random.rand(64, 64, 3), (1, 1, 9, 9), 0, {}, ImageError, "RGB image"),
        (np.random.rand(2, 3, 4, 5, 6), (1, 1, 2, 2), 0, {}, ImageError, "expected a volume"),
        (np.where(np.eye(8)[None].repeat(4, 0) > 0, np.nan, 1.0), (1, 1, 5, 5), 0, {}, ImageError, "NaN"),
        (np.full((4, 8, 8), 7, np.int16), (1, 1, 5, 5), 0, {}, ImageError, "constant"),
        (np.zeros((4, 8, 8), bool), (1, 1, 5, 5), 0, {}, ImageError, "boolean"),
        (np.random.rand(5, 32, 32), (1, 1, 9, 9), 5, {}, BoxError, "outside the volume"),
        (np.random.rand(5, 32, 32), (1, 1, 9, 9), -1, {}, BoxError, "outside the volume"),
        (np.random.rand(5, 32, 32), (1, 1, 9, 9), 1.5, {}, BoxError, "integer"),
        (np.random.rand(5, 32, 32), (40, 9, 50, 20), 1, {}, BoxError, "no area"),  # wholly right of the image
        (np.random.rand(5, 32, 32), "9,9,x,20", 1, {}, BoxError, "four numbers"),
        (np.random.rand(5, 32, 32), {"x0": 1}, 1, {}, BoxError, "one box"),
        (np.random.rand(5, 32, 32), (1, 1, 9, 9), 1, {"z_range": "1,2,3"}, BoxError, "first,last"),
        (np.random.rand(5, 32, 32), (1, 1, 9, 9), 1, {"z_range": (0, 2.5)}, BoxError, "integer"),
        (np.random.rand(5, 32, 32), (1, 1, 9), 1, {}, BoxError, "one box"),
        (np.random.rand(5, 32, 32), (1, 1, 9, 9), 1, {"z_range": (2, 4)}, BoxError, "must contain"),
        (np.random.rand(5, 32, 32), (1, 1, 9, 9), 1, {"z_range": (0, 9)}, BoxError, "outside the volume"),
        (np.random.rand(5, 32, 32), None, None, {}, BoxError, "no box"),
        (
            np.random.rand(5, 32, 32),
            (1, 1, 9, 9),
            1,
            {"modality": "ct", "window": (5000, 10)},
            ImageError,
            "constant after",
        ),
    ],
)
def test_bad_input_raises_clear_errors(volume, box, z, kwargs, err, match):
    model = FakeModel(np.zeros((5, 32, 32), bool))
    with pytest.raises(err, match=match):
        segment_volume(model, volume, box, z, **kwargs)
    assert model.encoded == []  # validated before any encoding


def test_stop_of_the_wrong_type_is_a_medsam_error_and_still_a_type_error(lite):
    vol = np.random.default_rng(0).random((5, 32, 32))
    with pytest.raises(OptionTypeError, match="stop must be a StopRule, got dict") as info:
        propagate(lite, vol, (1, 1, 9, 9), 1, stop={"min_iou": 0.5})
    assert isinstance(info.value, MedSAMError) and isinstance(info.value, TypeError)  # old `except TypeError` works


def test_paste_object_keeps_other_objects_and_wide_ids():
    labels = np.zeros((3, 10, 10), np.uint16)
    a = np.zeros_like(labels, bool)
    a[:, 2:6, 2:6] = True
    b = np.zeros_like(labels, bool)
    b[:, 4:8, 4:8] = True
    paste_object(labels, a, 300)
    out = paste_object(labels, b, 1000)
    assert out is labels
    assert (labels[a] == 300).all()  # overlap stays with the first object
    assert (labels[b & ~a] == 1000).all() and labels[~(a | b)].max() == 0
    paste_object(labels, b, 1000, overwrite=True)
    assert (labels[b] == 1000).all() and (labels[a & ~b] == 300).all()
    big = np.zeros((2, 4, 4), np.uint32)
    paste_object(big, np.ones_like(big, bool), 70000)
    assert big.max() == 70000
    with pytest.raises(ValueError, match="uint16"):
        paste_object(np.zeros((2, 4, 4), np.uint8), np.ones((2, 4, 4), bool), 300)
    with pytest.raises(ImageError, match="shape"):
        paste_object(labels, np.ones((2, 2, 2), bool), 5)


# -- the real model -----------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    from napari_medsam.engine.predictor import MedSAM

    return MedSAM.load("litemedsam", device="cpu", cache=EmbeddingCache())


def _plain_ball():
    """A bright ellipsoid (slices 10..20) in a darker volume: the real model segments it at Dice > 0.99."""
    return np.where(_ball(), 200, 60).astype(np.uint8)


def test_real_model_follows_a_ball_and_stops_at_its_ends(model):
    """The fake-model tests above, with the real weights: stop near the ends, encode once, callbacks."""
    truth = _ball()
    vol = _plain_ball()
    seen, stats = [], {}
    mask = segment_volume(
        model, vol, _box_of(truth[15]), 15, modality="uint8", on_slice=lambda z, m: seen.append(z), stats=stats
    )
    assert dice(mask, truth) > 0.97
    lo, hi = stats["z_extent"]
    assert 9 <= lo <= 11 and 19 <= hi <= 21, stats  # the tips are single pixels
    assert not mask[:9].any() and not mask[22:].any(), "stops: does not run through the volume"
    assert len(stats["encoded"]) == len(set(stats["encoded"])), "no slice encoded twice"
    assert seen[0] == 15 and sorted(seen) == list(range(lo, hi + 1))
    again = {}
    assert (segment_volume(model, vol, _box_of(truth[15]), 15, modality="uint8", stats=again) == mask).all()
    assert again["n_encoded"] == 0, "a second run is served by the cache"
    # z-range bounds both directions; RGB volumes give the same masks
    res = propagate(model, vol, _box_of(truth[15]), 15, modality="uint8", z_range=(13, 17), stop=StopRule.never())
    assert res.z_extent == (13, 17) and res.stopped == {"up": "z_range", "down": "z_range"}
    assert (res.mask[13:18] == mask[13:18]).all()
    rgb = propagate(model, np.repeat(vol[..., None], 3, axis=-1), _box_of(truth[15]), 15, modality="uint8")
    assert (rgb.mask == mask).all()
    # a predicted-IoU floor above what the model reports stops at once, in both directions
    strict = propagate(model, vol, _box_of(truth[15]), 15, modality="uint8", stop=StopRule(min_iou=0.999))
    assert strict.stopped == {"up": "iou", "down": "iou"} and strict.z_extent == (15, 15)


def test_real_model_cancel_returns_what_is_done():
    from napari_medsam.engine.predictor import MedSAM

    fresh = MedSAM.load("litemedsam", device="cpu", cache=EmbeddingCache())
    truth = _ball()
    vol = _plain_ball() + np.arange(30, dtype=np.uint8)[:, None, None] % 3  # no two slices alike
    ev, done, stats = threading.Event(), [], {}

    def on_slice(z, m):
        done.append(z)
        if len(done) == 3:
            ev.set()

    mask = segment_volume(
        fresh, vol, _box_of(truth[15]), 15, modality="uint8", on_slice=on_slice, cancel=ev, stats=stats
    )
    assert stats["cancelled"] is True and len(done) == 3
    assert sorted(np.flatnonzero(mask.any(axis=(1, 2)))) == sorted(done)
    assert stats["n_encoded"] == 3


@pytest.fixture(scope="module")
def brain():
    vol = _read_nifti(SAMPLES / "pyradiomics_brain1.nii.gz")
    gt = _read_nifti(SAMPLES / "pyradiomics_brain1_seg.nii.gz") == 1
    return vol, gt


# measured (docs/accuracy_3d.md): 0.709 with no z_range, 0.766 with z_range 11..17 (authors: 0.463)
BRAIN_MIN_DICE = 0.68
BRAIN_MIN_DICE_Z = 0.74


def test_brain_mr_sample(model, brain):
    vol, gt = brain
    stats = {}
    mask = model.segment_volume(vol, BRAIN_BOX, BRAIN_KEY, modality="mr", stats=stats)
    d = dice(mask, gt)
    assert d >= BRAIN_MIN_DICE, f"Dice {d:.3f} with stats {stats['stopped']} extent {stats['z_extent']}"
    assert len(stats["encoded"]) == len(set(stats["encoded"])) > 0
    assert stats["intensity"] == "percentile"
    # a user-given z-range: no slice is encoded again
    stats_z = {}
    mask_z = segment_volume(model, vol, BRAIN_BOX, BRAIN_KEY, modality="mr", z_range=BRAIN_RANGE, stats=stats_z)
    assert set(stats_z["encoded"]).isdisjoint(stats["encoded"])
    assert dice(mask_z, gt) >= BRAIN_MIN_DICE_Z
    assert not mask_z[: BRAIN_RANGE[0]].any() and not mask_z[BRAIN_RANGE[1] + 1 :].any()


# measured on the shared data (docs/accuracy_3d.md): 0.922 with no z_range (authors, given the z-range: 0.919)
SHARED_CASE = "ct3d_deeplesion_medsam2/CT_Lesion_000001_02_01_008-023_img#label1"
SHARED_MIN_DICE = 0.89


def test_shared_ct_lesion(model):
    root = require_shared()
    case = next(c for c in load_cases(root, dims=3) if c.case == SHARED_CASE)
    vol = _read_nifti(case.image)
    gt = case.ground_truth()
    stats = {}
    mask = segment_volume(model, vol, case.box, case.key_slice, modality="uint8", stats=stats)
    d = dice(mask, gt)
    ref = np.load(root / "reference" / f"3D_{safe_name(case.case)}.npz")["segs"] > 0
    assert d >= SHARED_MIN_DICE, f"Dice {d:.3f}, stopped {stats['stopped']}, extent {stats['z_extent']}"
    assert d >= dice(ref, gt) - 0.03, "the authors' script, given the true z-range, does clearly better"
    assert len(stats["encoded"]) == len(set(stats["encoded"]))


# -- one rule in every front-end -------------------------------------------------------
def test_volume_options_are_propagates_keywords():
    """segment_volume / MedSAM.segment_volume take exactly propagate's options (one list, no drift)."""
    import inspect

    from napari_medsam.engine.volume import VolumeOptions

    kw = {n for n, p in inspect.signature(propagate).parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert set(VolumeOptions.__annotations__) == kw
    sv = inspect.signature(segment_volume).parameters
    assert [n for n, p in sv.items() if p.kind is p.KEYWORD_ONLY] == ["stats"] and "options" in sv


def test_batch_session_and_api_give_the_same_3d_masks(model, brain, tmp_path):
    """The stop rule and defaults are the same in batch (with and without z_range), ImageSegmenter and the API."""
    import csv

    from napari_medsam.engine.batch import ImageSegmenter, run_batch
    from napari_medsam.engine.io import read_image

    vol, gt = brain
    image = SAMPLES / "pyradiomics_brain1.nii.gz"
    box = ",".join(map(str, BRAIN_BOX))
    prompts = tmp_path / "prompts.csv"
    with open(prompts, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "box", "modality", "slice", "propagate", "z_range", "name"])
        w.writeheader()
        row = {"image": str(image), "box": box, "modality": "mr", "slice": BRAIN_KEY, "propagate": "true"}
        w.writerow({**row, "z_range": "", "name": "free"})
        w.writerow({**row, "z_range": f"{BRAIN_RANGE[0]},{BRAIN_RANGE[1]}", "name": "bounded"})
    res = run_batch(prompts, tmp_path / "out", model=model, progress=False, log=None)
    masks = {r.name: read_image(tmp_path / "out" / r.mask).array.astype(bool) for r in res.rows}
    session = ImageSegmenter(model, read_image(image))
    for name, zr in (("free", None), ("bounded", BRAIN_RANGE)):
        api = segment_volume(model, vol, BRAIN_BOX, BRAIN_KEY, modality="mr", z_range=zr)
        method = model.segment_volume(vol, BRAIN_BOX, BRAIN_KEY, modality="mr", z_range=zr)
        seg = session.segment(BRAIN_BOX, "mr", None, BRAIN_KEY, True, zr)
        assert api.any() and dice(api, gt) > 0.6
        assert masks[name].shape == api.shape
        assert (masks[name] == api).all(), name
        assert (seg.mask == api).all() and (method == api).all(), name
    assert not (masks["free"] == masks["bounded"]).all(), "the z-range changes the mask on this case"
