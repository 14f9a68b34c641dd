"""EncoderService on its own (no viewer, no Qt): the real LiteMedSAM, real images, real threads."""

from __future__ import annotations

import atexit
import threading
import time

import numpy as np
import pytest

from _data import read_gray
from napari_medsam._annotator.constants import EncoderState, Priority
from napari_medsam._annotator.encoding import EncoderService, Snapshot, Source, model_input
from napari_medsam._annotator.threads import alive_workers
from napari_medsam.engine.errors import MedSAMError

WAIT_S = 120


@pytest.fixture(scope="module")
def images(samples):
    us = read_gray(samples / "busi_malignant_1.png")
    nuclei = read_gray(samples / "dsb2018_nuclei.png")
    return us, nuclei


def _plane_key(model, source: Source, index=()):
    u8 = model_input(source)[tuple(index)]
    rgb = u8 if u8.ndim == 3 else np.repeat(u8[..., None], 3, axis=-1)
    return model.embed_rgb(rgb).key


@pytest.fixture
def service(lite):
    states = []
    svc = EncoderService(lite, on_state=lambda *a: states.append(a))
    svc.states = states
    yield svc
    svc.shutdown()
    assert svc.join(WAIT_S)


def test_request_gives_the_planes_embedding_and_one_future_per_plane(service, lite, images):
    src = Source(images[0], rgb=False)
    service.set_source(src)
    fut = service.request(())
    assert service.request(()) is fut, "one future per plane and source"
    emb = fut.result(WAIT_S)
    assert emb.key == _plane_key(lite, src)
    assert emb.original_size == images[0].shape
    assert service.states[-1][0] is EncoderState.READY and service.states[-1][1] >= 0


def test_old_request_is_answered_from_its_own_source(lite, images):
    """Hazard: the source switched between taking a request and reading the plane answered the old
    request with the new image's embedding (a box then decoded against the wrong image)."""
    a, b = Source(images[0], rgb=False), Source(images[1], rgb=False)
    lite.cache.clear()
    switched = threading.Event()
    svc = None

    def on_state(state, seconds, detail):
        if state is EncoderState.ENCODING and not switched.is_set():
            switched.set()
            svc.set_source(b)  # the GUI thread picks another image at this very moment

    svc = EncoderService(lite, on_state=on_state)
    try:
        svc.set_source(a)
        old = svc.request(())
        emb = old.result(WAIT_S)
        assert switched.is_set()
        assert emb.key == _plane_key(lite, a), "the old request must be answered from the old image"
        assert emb.key != _plane_key(lite, b)
        new = svc.request(())
        assert new is not old and new.result(WAIT_S).key == _plane_key(lite, b)
    finally:
        svc.shutdown()
        svc.join(WAIT_S)


def test_plane_on_screen_first_then_neighbours(service, lite):
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 255, size=(5, 96, 80)).astype(np.uint8)
    lite.cache.clear()
    service.set_source(Source(vol, rgb=False, modality="auto"))
    order = []
    first = service.request((4,), Priority.NOW)  # the worker takes this one at once
    futs = [service.request((i,), p) for i, p in ((1, Priority.IDLE), (2, Priority.SOON), (0, Priority.NOW))]
    for i, f in zip((4, 1, 2, 0), (first, *futs), strict=True):
        f.add_done_callback(lambda _f, i=i: order.append(i))
    for f in (first, *futs):
        f.result(WAIT_S)
    assert order == [4, 0, 2, 1]


def test_set_source_cancels_what_is_pending(service, lite):
    vol = np.random.default_rng(1).integers(0, 255, size=(6, 64, 64)).astype(np.uint8)
    lite.cache.clear()
    service.set_source(Source(vol, rgb=False))
    futs = [service.request((i,), Priority.SOON) for i in range(6)]
    service.set_source(Source(vol[::-1].copy(), rgb=False))
    time.sleep(0.01)
    cancelled = [f.cancelled() for f in futs]
    assert sum(cancelled) >= 5, "only the one already running can still finish"
    running = [f for f in futs if not f.cancelled()]
    for f in running:  # answered from the source it was asked of
        assert f.result(WAIT_S).key == _plane_key(lite, Source(vol, rgb=False), (futs.index(f),))


def test_bad_image_error_reaches_the_future_and_the_state(service):
    service.set_source(Source(np.full((64, 64), 7.0, np.float32), rgb=False))
    fut = service.request(())
    with pytest.raises(MedSAMError, match="constant"):
        fut.result(WAIT_S)
    deadline = time.monotonic() + 5
    while not any(s[0] is EncoderState.ERROR for s in service.states) and time.monotonic() < deadline:
        time.sleep(0.01)
    err = [s for s in service.states if s[0] is EncoderState.ERROR]
    assert err and "constant" in err[-1][2]
    assert service.request(()) is fut, "the failed plane is not retried in a loop"


def test_snapshot_model_input_is_that_of_its_version(service, images):
    a, b = Source(images[0], rgb=False), Source(images[1], rgb=False)
    service.set_source(a)
    snap = service.snapshot()
    service.set_source(b)
    assert isinstance(snap, Snapshot) and snap.source is a and service.snapshot().source is b
    np.testing.assert_array_equal(service.model_input(snap), model_input(a))
    np.testing.assert_array_equal(service.model_input(), model_input(b))


def test_shutdown_does_not_wait_for_a_running_encode(lite, images):
    """Hazard: close() joined the worker from the GUI thread (a frozen window for up to a minute)."""
    lite.cache.clear()
    started = threading.Event()
    svc = EncoderService(lite, on_state=lambda s, *_: s is EncoderState.ENCODING and started.set())
    svc.set_source(Source(images[1], rgb=False))
    fut = svc.request(())
    assert started.wait(WAIT_S)
    t0 = time.perf_counter()
    svc.shutdown()
    assert time.perf_counter() - t0 < 0.1, "shutdown returns while the encode runs"
    assert not fut.cancelled(), "the running encode still answers"
    fut.result(WAIT_S)
    assert svc.join(WAIT_S)
    assert svc._thread not in alive_workers()


def test_workers_register_one_exit_handler_per_process(lite):
    """Hazard: every annotator registered its own atexit handler, and they piled up with each model reload."""
    EncoderService(lite).shutdown()
    before = atexit._ncallbacks()
    made = [EncoderService(lite) for _ in range(5)]
    assert atexit._ncallbacks() == before
    for s in made:
        s.shutdown()
    for s in made:
        assert s.join(WAIT_S)


def test_background_planes_wait_for_the_gate_and_then_hit_the_cache(service, lite, images):
    """Prefetch: another image is encoded at the lowest priority, only while ``may_prefetch`` allows;
    when it comes on screen its plane is a cache hit (no encode on the critical path)."""
    from concurrent.futures import wait

    lite.cache.clear()
    now, later = Source(images[0], rgb=False), Source(images[1], rgb=False)
    gate = threading.Event()
    progress = []
    service.may_prefetch = gate.is_set
    service.on_prefetch = lambda done, total: progress.append((done, total))
    service.set_source(now)
    (bg,) = service.prefetch([()], later)
    service.request(()).result(WAIT_S)  # the plane on screen is served while the gate is shut
    time.sleep(0.3)
    assert not bg.done() and not bg.running(), "background work waits while boxes are in flight"
    gate.set()
    wait([bg], WAIT_S)
    assert bg.result().key == _plane_key(lite, later)
    assert progress[-1] == (1, 1)
    encoded = service.encoded
    service.set_source(later)  # the user goes to the next image
    assert service.request(()).result(WAIT_S).key == bg.result().key
    assert service.encoded == encoded, "a cache hit: no encoder on the critical path"


def test_prefetch_policy_outward_budget_and_quiet(lite):
    from concurrent.futures import Future

    from napari_medsam._annotator.constants import JobKind
    from napari_medsam._annotator.decoding import BoxJob, LatestBoxDecoder
    from napari_medsam._annotator.prefetch import QUIET_S, Prefetch, budget, outward
    from napari_medsam.engine.cache import EmbeddingCache

    assert outward(6, 3) == [3, 4, 2, 5, 1, 0]  # (depth, start)
    assert outward(3, 0) == [0, 1, 2]
    mem = EmbeddingCache(max_bytes=64 * 2**20)
    assert budget(mem, 100, 4 * 2**20) == 8  # half the memory cache
    assert budget(EmbeddingCache(max_bytes=64 * 2**20, fp16=True), 100, 4 * 2**20) == 16
    assert budget(None, 100) == 0

    svc = EncoderService(lite)
    dec = LatestBoxDecoder(lite, lambda r: None)
    try:
        pf = Prefetch(svc, dec, lambda *a: None)
        assert svc.may_prefetch == pf.quiet and pf.quiet()
        pending = Future()
        dec.accept(BoxJob(1, (), (10, 10, 50, 50), pending, JobKind.ACCEPT))
        pf.box_event()
        assert not pf.quiet(), "a box in flight pauses background encoding"
        pending.cancel()
        dec.when_idle().result(WAIT_S)
        time.sleep(QUIET_S + 0.05)
        assert pf.quiet()
    finally:
        svc.shutdown()
        dec.shutdown()


def test_prefetched_next_image_gets_its_decoder_state_before_the_first_box(lite_default, images):
    """``Prefetch.image`` (a session's next image): after the background encode the fused decoder's
    per-image state is made too, so after Next the first box is one decode; its mask is the one a
    cold decode gives."""
    from concurrent.futures import wait

    from napari_medsam._annotator.decoding import LatestBoxDecoder
    from napari_medsam._annotator.prefetch import Prefetch

    states = lite_default.fast.decoder._states
    lite_default.cache.clear()
    lite_default.fast.decoder.clear()
    svc = EncoderService(lite_default)
    dec = LatestBoxDecoder(lite_default, lambda r: None)
    try:
        pf = Prefetch(svc, dec, lambda *a: None)
        svc.set_source(Source(images[0], rgb=False))
        (bg,) = pf.image(Source(images[1], rgb=False))
        wait([bg], WAIT_S)
        emb = bg.result()
        key = (emb.key, emb.features.dtype)
        deadline = time.monotonic() + WAIT_S  # the callback runs in the worker just after the result
        while key not in states and time.monotonic() < deadline:
            time.sleep(0.01)
        assert key in states, "the next image's decoder state was made with its prefetch"
        box = (200, 150, 330, 260)
        warm = lite_default.predict(emb, box)
        lite_default.fast.decoder.clear()
        cold = lite_default.predict(emb, box)
        assert warm.masks.any() and (warm.masks == cold.masks).all()
        np.testing.assert_allclose(warm.iou, cold.iou, rtol=1e-6)
    finally:
        svc.shutdown()
        dec.shutdown()
