"""The preview decoder in a child process gives the in-process masks and fails over cleanly."""

from __future__ import annotations

import numpy as np
import pytest

from napari_medsam import MedSAM
from napari_medsam._annotator.decoding import preview_region
from napari_medsam._annotator.options import PREVIEW_FAST
from napari_medsam.engine.decoder_process import DecoderProcess, DecoderUnavailable
from napari_medsam.engine.evaluation import load_cases


@pytest.fixture(scope="module")
def fused():
    return MedSAM.load("litemedsam", device="cpu", fast=PREVIEW_FAST)


@pytest.fixture(scope="module")
def child(fused):
    proc = DecoderProcess(fused, fast=PREVIEW_FAST)
    assert proc.wait_ready(180), proc.error
    yield proc
    proc.close()


def test_child_masks_equal_in_process(fused, child, samples):
    cases = [c for c in load_cases(samples) if c.dims == 2][:6]
    assert len({c.image for c in cases}) >= 2
    for case in cases:
        emb = fused.embed(_image(case))
        region = preview_region(case.box, emb.original_size)
        here = fused.predict(emb, case.box, region=region)
        there = child.predict(emb, case.box, region)
        assert here.masks.shape == there.masks.shape
        assert here.masks.any(), case.case
        assert (here.masks == there.masks).all(), case.case
        np.testing.assert_allclose(here.iou, there.iou, rtol=1e-5)


def test_child_errors_are_the_engines(fused, child, samples):
    emb = fused.embed(_image(load_cases(samples)[0]))
    with pytest.raises(ValueError, match="BoxError"):
        child.predict(emb, (-30, 10, -1, 50))  # wholly outside the image
    assert child.ready, "a bad box does not stop the child"


def test_not_started_and_killed_child_is_unavailable(fused, samples):
    emb = fused.embed(_image(load_cases(samples)[0]))
    idle = DecoderProcess(fused, fast=PREVIEW_FAST, start=False)
    with pytest.raises(DecoderUnavailable):
        idle.predict(emb, (8, 133, 439, 403))
    proc = DecoderProcess(fused, fast=PREVIEW_FAST)
    assert proc.wait_ready(180), proc.error
    proc._proc.kill()
    proc._proc.wait()
    with pytest.raises(DecoderUnavailable, match="stopped"):
        proc.predict(emb, (8, 133, 439, 403))
    assert not proc.ready
    proc.close()


def test_only_pretrained_litemedsam_on_cpu(fused):
    assert DecoderProcess.supported(fused)
    random = MedSAM.load("litemedsam", device="cpu", weights="random")
    assert not DecoderProcess.supported(random), "random weights cannot be reloaded in a child"


def _image(case):
    from napari_medsam.engine.io import read_image

    return read_image(case.image).array


def test_child_that_cannot_load_says_why_and_close_is_quick(fused, tmp_path):
    import time

    bad = DecoderProcess(fused, fast=PREVIEW_FAST, start=False)
    bad.checkpoint = str(tmp_path / "missing.pth")
    bad.start()
    assert not bad.wait_ready(180)
    assert "did not start" in bad.error and "missing.pth" in bad.error
    starting = DecoderProcess(fused, fast=PREVIEW_FAST)
    t = time.perf_counter()
    starting.close()  # while the child is still importing torch
    assert time.perf_counter() - t < 10
    assert not starting.wait_ready(60) and starting._proc is None


def test_embedding_sent_ahead_is_used_by_the_first_box(fused, child, samples):
    """``send`` hands a prefetched plane to the child before any box (it warms its decoder then);
    the first box does not send it again and gets the in-process mask. Not ready: nothing sent."""
    case = [c for c in load_cases(samples) if c.dims == 2][6]
    emb = fused.embed(_image(case))
    assert not DecoderProcess(fused, fast=PREVIEW_FAST, start=False).send(emb)
    assert child.send(emb)
    assert list(child._sent)[-1] == emb.key
    region = preview_region(case.box, emb.original_size)
    before = next(child._ids)  # frame ids: one per frame sent
    there = child.predict(emb, case.box, region)
    assert next(child._ids) - before == 2, "one frame (the box): the child had the embedding"
    here = fused.predict(emb, case.box, region=region)
    assert here.masks.any() and (here.masks == there.masks).all()
    fused.warm(emb)  # in-process: the fused decoder's state, memoised by the cache key
    assert (emb.key, emb.features.dtype) in fused.fast.decoder._states
