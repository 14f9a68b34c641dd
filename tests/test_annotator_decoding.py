"""LatestBoxDecoder on its own (no viewer, no Qt): the real LiteMedSAM, a real image, real threads.

The promises: the newest preview wins, no accept is ever dropped, and answers leave in
generation order, also when boxes arrive while the plane is still being encoded
(issue 12, defect 4: an accept was answered after a newer preview, and in the plugin
the late accept cleared the preview of the drag in progress).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future

import numpy as np
import pytest

from _data import read_gray
from napari_medsam._annotator.constants import JobKind
from napari_medsam._annotator.decoding import BoxJob, LatestBoxDecoder, preview_region
from napari_medsam._annotator.encoding import Source, model_input
from napari_medsam.engine.evaluation import dice, load_cases
from napari_medsam.engine.intensity import gray_to_rgb

WAIT_S = 120


@pytest.fixture(scope="module")
def case_and_embedding(lite, samples):
    case = next(c for c in load_cases(samples) if c.image.name == "busi_malignant_1.png")
    gray = read_gray(case.image)
    return case, lite.embed(gray)


class Collector:
    def __init__(self):
        self.results = []
        self.busy = []
        self.done = threading.Event()

    def __call__(self, res):
        self.results.append(res)


@pytest.fixture
def decoder(lite):
    out = Collector()
    dec = LatestBoxDecoder(lite, out, out.busy.append)
    dec.out = out
    yield dec
    dec.shutdown()
    assert dec.join(WAIT_S)


def _boxes(case, n, seed=0):
    """``n`` boxes around the case's box, each a few pixels off (a hand dragging)."""
    rng = np.random.default_rng(seed)
    x0, y0, x1, y1 = case.box
    jit = rng.integers(-6, 7, size=(n, 4))
    return [(x0 + a, y0 + b, x1 + c, y1 + d) for a, b, c, d in jit]


def _settle(dec):
    assert dec.when_idle().result(WAIT_S) is None
    assert dec.idle()


def test_preview_and_accept_masks(decoder, lite, case_and_embedding):
    case, emb = case_and_embedding
    done = Future()
    done.set_result(emb)
    decoder.preview(BoxJob(1, (), case.box, done, JobKind.PREVIEW))
    _settle(decoder)
    decoder.accept(BoxJob(2, (), case.box, done, JobKind.ACCEPT, shape_index=0))
    _settle(decoder)
    prev, acc = decoder.out.results
    region = preview_region(case.box, emb.original_size)
    assert prev.region == region and acc.region is None
    np.testing.assert_array_equal(prev.prediction.masks[0], lite.predict(emb, case.box, region=region).masks[0])
    np.testing.assert_array_equal(acc.prediction.masks[0], lite.predict(emb, case.box).masks[0])


def test_storm_while_the_first_encode_is_pending(decoder, lite, case_and_embedding):
    """1000 box events (previews with every 25th an accept) while the plane's embedding is pending:
    every accept answered once, in order, before the newest preview; answers in generation order;
    the last answer is the newest box's preview."""
    case, emb = case_and_embedding
    pending = Future()  # the first encode of the plane, still running
    boxes = _boxes(case, 1000)
    kinds = [JobKind.ACCEPT if i % 25 == 24 else JobKind.PREVIEW for i in range(1000)]
    kinds[-1] = JobKind.PREVIEW
    for g, (box, kind) in enumerate(zip(boxes, kinds, strict=True), start=1):
        job = BoxJob(g, (), box, pending, kind, shape_index=g)
        (decoder.accept if kind is JobKind.ACCEPT else decoder.preview)(job)
    time.sleep(0.05)
    assert not decoder.out.results, "nothing can be answered before the embedding exists"
    pending.set_result(emb)
    _settle(decoder)
    res = decoder.out.results
    gens = [r.job.generation for r in res]
    assert all(r.error is None for r in res)
    assert gens == sorted(gens) and len(set(gens)) == len(gens), "answers leave in generation order"
    accepts = [g for g, k in enumerate(kinds, start=1) if k is JobKind.ACCEPT]
    assert [r.job.generation for r in res if r.job.kind is JobKind.ACCEPT] == accepts, "each accept once, in order"
    last = res[-1]
    assert last.job.kind is JobKind.PREVIEW and last.job.generation == 1000
    region = preview_region(boxes[-1], emb.original_size)
    np.testing.assert_array_equal(last.prediction.masks[0], lite.predict(emb, boxes[-1], region=region).masks[0])
    for r in res:
        if r.job.kind is JobKind.ACCEPT:
            np.testing.assert_array_equal(r.prediction.masks[0], lite.predict(emb, r.job.box).masks[0])
    assert len(res) == len(accepts) + 1, "stale previews are dropped, not answered"


def test_storm_during_decoding_keeps_generation_order(decoder, lite, case_and_embedding):
    """Events keep coming while the worker waits and decodes: a second plane's encode is pending
    half-way, so the worker waits in the middle of the storm too."""
    case, emb = case_and_embedding
    ready, later = Future(), Future()
    ready.set_result(emb)

    def resolve_when_waited_on():  # the worker must wait for ``later`` (an accept holds it), then it comes
        deadline = time.monotonic() + WAIT_S
        while True not in decoder.out.busy and time.monotonic() < deadline:
            time.sleep(0.005)
        later.set_result(emb)

    resolver = threading.Thread(target=resolve_when_waited_on)
    resolver.start()
    boxes = _boxes(case, 400, seed=1)
    kinds = []
    for g, box in enumerate(boxes, start=1):
        kind = JobKind.ACCEPT if g % 40 == 0 and g < 400 else JobKind.PREVIEW
        kinds.append(kind)
        fut = later if 150 <= g < 250 else ready
        job = BoxJob(g, (), box, fut, kind, shape_index=g)
        (decoder.accept if kind is JobKind.ACCEPT else decoder.preview)(job)
        time.sleep(0.001)
    resolver.join()
    _settle(decoder)
    res = decoder.out.results
    gens = [r.job.generation for r in res]
    assert gens == sorted(gens) and len(set(gens)) == len(gens)
    accepts = [g for g, k in enumerate(kinds, start=1) if k is JobKind.ACCEPT]
    assert [r.job.generation for r in res if r.job.kind is JobKind.ACCEPT] == accepts
    assert res[-1].job.generation == 400 and res[-1].job.kind is JobKind.PREVIEW
    assert True in decoder.out.busy and decoder.out.busy[-1] is False


def test_a_failed_embedding_is_an_error_result_and_a_cancelled_one_is_dropped(decoder, case_and_embedding):
    case, emb = case_and_embedding
    failed, cancelled, ok = Future(), Future(), Future()
    failed.set_exception(ValueError("the plane could not be encoded"))
    cancelled.cancel()
    ok.set_result(emb)
    decoder.accept(BoxJob(1, (), case.box, failed, JobKind.ACCEPT))
    decoder.accept(BoxJob(2, (), case.box, cancelled, JobKind.ACCEPT))
    decoder.accept(BoxJob(3, (), case.box, ok, JobKind.ACCEPT))
    _settle(decoder)
    res = decoder.out.results
    assert [r.job.generation for r in res] == [1, 3]
    assert isinstance(res[0].error, ValueError) and "could not be encoded" in str(res[0].error)
    assert res[1].error is None and res[1].prediction.masks[0].any()


def test_when_idle_resolves_after_the_last_answer(decoder, case_and_embedding):
    case, emb = case_and_embedding
    pending = Future()
    decoder.accept(BoxJob(1, (), case.box, pending, JobKind.ACCEPT))
    idle = decoder.when_idle()
    time.sleep(0.05)
    assert not idle.done() and not decoder.idle()
    pending.set_result(emb)
    idle.result(WAIT_S)
    assert len(decoder.out.results) == 1, "resolved only once the accept was answered"


def test_shutdown_does_not_wait_and_releases_waiters(lite, case_and_embedding):
    case, emb = case_and_embedding
    out = Collector()
    dec = LatestBoxDecoder(lite, out)
    pending = Future()
    dec.accept(BoxJob(1, (), case.box, pending, JobKind.ACCEPT))
    idle = dec.when_idle()
    t0 = time.perf_counter()
    dec.shutdown()
    assert time.perf_counter() - t0 < 0.1
    assert idle.done()
    pending.set_result(emb)
    assert dec.join(WAIT_S)


@pytest.mark.parametrize("exact", [False, True], ids=["default", "exact"])
def test_small_box_accept_is_what_segment_gives(lite, lite_default, samples, exact):
    """Issue 14, same in every front-end: on the default model the accept of a small nucleus box goes
    through the zoom strategy (crops encoded in the worker, shown as busy) and equals
    ``model.segment(plane, box=...)``; with the authors' exact model it is the one full-view decode
    (= ``predict``). Previews stay on the full-view embedding either way."""
    model = lite if exact else lite_default
    case = next(c for c in load_cases(samples) if c.image.name == "dsb2018_nuclei.png")
    plane = gray_to_rgb(model_input(Source(read_gray(case.image), False)))  # what the encoder service encodes
    emb = model.embed_rgb(plane)
    done = Future()
    done.set_result(emb)
    asked = []

    def the_plane():
        asked.append(threading.current_thread().name)
        return plane

    out = Collector()
    dec = LatestBoxDecoder(model, out, out.busy.append)
    try:
        dec.preview(BoxJob(1, (), case.box, done, JobKind.PREVIEW))
        _settle(dec)
        dec.accept(BoxJob(2, (), case.box, done, JobKind.ACCEPT, shape_index=0, plane=the_plane))
        _settle(dec)
    finally:
        dec.shutdown()
    assert dec.join(WAIT_S)
    prev, acc = out.results
    assert prev.error is None and acc.error is None
    region = preview_region(case.box, emb.original_size)
    np.testing.assert_array_equal(prev.prediction.masks[0], model.predict(emb, case.box, region=region).masks[0])
    got = acc.prediction.masks[0]
    assert got.shape == plane.shape[:2] and got.any()
    full = model.predict(emb, case.box).masks[0]
    if exact:
        assert acc.zoom is None and not asked, "the authors' pipeline: no crops"
        np.testing.assert_array_equal(got, full)
    else:
        assert acc.zoom is not None and acc.zoom.path == "zoom" and acc.zoom.crops
        assert asked == ["medsam-decoder"], "the plane is read once, in the decoder's worker"
        assert out.busy == [True, False], "the crop encodes are shown as busy"
        assert not np.array_equal(got, full), "the zoom changed this nucleus's mask"
    np.testing.assert_array_equal(got, model.segment(plane, box=case.box))
    assert dice(got, case.ground_truth()) > 0.7
