"""The decoder child's channel: only its own authentic answers count; garbage = a dead child.

Frames are tested over real pipes; faulty children are real processes running the real
boot code with one function replaced (they answer garbage, the wrong request, the wrong
shape, hang, or die mid-frame); the parent model is the real LiteMedSAM.
"""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import threading
import time

import numpy as np
import pytest

from napari_medsam.engine import decoder_channel as dc
from napari_medsam.engine import decoder_process as dp
from napari_medsam.engine.decoder_process import DecoderProcess, DecoderUnavailable, ProtocolError

KEY = b"k" * 32


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):
            os.close(fd)


class Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/medsam-decoder-pwned",))


def test_frames_round_trip(pipe):
    r, w = pipe
    msg = ("ok", np.ones((1, 3, 4), bool), np.array([0.5], np.float32), np.zeros((1, 4)), 0.01)
    dc.send_frame(w, KEY, 7, msg)
    rid, got = dc.receive_frame(r, KEY, time.monotonic() + 5)
    assert rid == 7 and got[0] == "ok" and (got[1] == msg[1]).all()


@pytest.mark.parametrize(
    "tamper",
    ["magic", "payload_byte", "mac_byte", "rid", "foreign_key", "oversized"],
)
def test_tampered_frames_are_refused_before_unpickling(pipe, tamper):
    r, w = pipe
    if os.path.exists("/tmp/medsam-decoder-pwned"):
        os.unlink("/tmp/medsam-decoder-pwned")
    data = pickle.dumps(Boom())
    key = b"x" * 32 if tamper == "foreign_key" else KEY
    frame = bytearray(dc._HEADER.pack(dc._MAGIC, 3, len(data), dc._mac(key, 3, data)) + data)
    if tamper == "magic":
        frame[0:4] = b"JUNK"
    elif tamper == "payload_byte":
        frame[-1] ^= 1
    elif tamper == "mac_byte":
        frame[20] ^= 1
    elif tamper == "rid":
        frame[4] ^= 1
    elif tamper == "oversized":
        frame[:] = dc._HEADER.pack(dc._MAGIC, 3, dc.MAX_FRAME + 1, b"\0" * 32)
    os.write(w, bytes(frame))
    with pytest.raises(ProtocolError):
        dc.receive_frame(r, KEY, time.monotonic() + 5)
    assert not os.path.exists("/tmp/medsam-decoder-pwned")


def test_truncated_frame_and_silence(pipe):
    r, w = pipe
    os.write(w, dc._HEADER.pack(dc._MAGIC, 1, 100, b"\0" * 32)[:10])
    with pytest.raises(TimeoutError):
        dc.receive_frame(r, KEY, time.monotonic() + 0.5)
    os.close(w)
    with pytest.raises(EOFError):
        dc.receive_frame(r, KEY, time.monotonic() + 5)


GOOD_OK = ("ok", np.zeros((1, 5, 6), bool), np.zeros(1, np.float32), np.zeros((1, 4)), 0.01)


@pytest.mark.parametrize(
    "reply, kind",
    [
        ("ok", "predict"),
        (None, "predict"),
        ((), "predict"),
        ((1, 2), "predict"),
        (("ok",), "predict"),
        (("ok", "masks", GOOD_OK[2], GOOD_OK[3], 0.01), "predict"),
        (("ok", GOOD_OK[1].astype(np.uint8), GOOD_OK[2], GOOD_OK[3], 0.01), "predict"),
        (("ok", np.zeros((1, 9, 9), bool), GOOD_OK[2], GOOD_OK[3], 0.01), "predict"),  # wrong shape
        (("ok", GOOD_OK[1], np.zeros(2, np.float32), GOOD_OK[3], 0.01), "predict"),
        (("ok", GOOD_OK[1], GOOD_OK[2], np.zeros((1, 3)), 0.01), "predict"),
        (("ok", *GOOD_OK[1:4], float("nan")), "predict"),
        (("ok", *GOOD_OK[1:4], "fast"), "predict"),
        (("missing", "another-key"), "predict"),
        (("error", 3), "predict"),
        (("ready",), "predict"),
        (("ok", *GOOD_OK[1:]), "load"),
        (("rejected", "x"), "load"),
        (("hello", "x"), "predict"),
    ],
)
def test_answers_of_the_wrong_form_are_protocol_errors(reply, kind):
    with pytest.raises(ProtocolError):
        dc.check_answer(reply, kind, (1, 5, 6), "the-key")


def test_good_answers_pass():
    assert dc.check_answer(GOOD_OK, "predict", (1, 5, 6), "k") is GOOD_OK
    assert dc.check_answer(("missing", "k"), "predict", (1, 5, 6), "k")[0] == "missing"
    assert dc.check_answer(("ready",), "load") == ("ready",)
    assert dc.check_answer(("error", "why"), "load")[0] == "error"


def test_keyless_embeddings_never_alias(lite, samples):
    """Keys were id(embedding): a new embedding at a reused address got the stale one's masks."""
    from napari_medsam.engine.cache import Embedding
    from napari_medsam.engine.io import read_image

    a = lite.embed(read_image(samples / "busi_malignant_1.png").array)
    b = lite.embed(np.roll(read_image(samples / "busi_malignant_1.png").array, 120, axis=1))
    keyless = Embedding(a.features, a.original_size, a.resized, a.model)
    k1 = dp._embedding_key(keyless)
    keyless.features = b.features  # same object, same id(), other content
    assert dp._embedding_key(keyless) != k1
    ids = set()
    for feats in (a.features, b.features, a.features):
        e = Embedding(feats, a.original_size, a.resized, a.model)
        ids.add((id(e), dp._embedding_key(e)))
        del e
        gc.collect()
    assert len({k for _, k in ids}) == 2, "the key follows the content"


def test_keyless_embedding_through_a_real_child(lite, lite_default, samples):
    """The child (the default decoder) answers a key-less embedding by its content, not its id()."""
    from napari_medsam.engine.cache import Embedding
    from napari_medsam.engine.io import read_image

    img = read_image(samples / "busi_malignant_1.png").array
    a, b = lite.embed(img), lite.embed(np.ascontiguousarray(img[::-1]))
    box = (8, 133, 439, 403)
    proc = DecoderProcess(lite)
    try:
        assert proc.wait_ready(300), proc.error
        e = Embedding(a.features, a.original_size, a.resized, a.model)
        first = proc.predict(e, box)
        assert (first.masks == lite_default.predict(a, box).masks).all()  # the same decoder in-process
        e.features = b.features  # the id() stays, the content changes
        second = proc.predict(e, box)
        assert (second.masks == lite_default.predict(b, box).masks).all(), "a stale embedding answered"
        assert not (second.masks == first.masks).all()
    finally:
        proc.close()


def test_start_is_once_under_races(lite, monkeypatch):
    for _ in range(20):
        calls = []
        proc = DecoderProcess(lite, start=False)
        monkeypatch.setattr(proc, "_start", lambda c=calls: c.append(1))
        barrier = threading.Barrier(8)

        def go(p=proc, b=barrier):
            b.wait()
            p.start()

        threads = [threading.Thread(target=go) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(0.05)
        assert len(calls) == 1


# -- faulty children ------------------------------------------------------------------------
_SETUP = dp._BOOT.split("from napari_medsam.engine.decoder_child import serve")[0]

_FAKE = """
import time, numpy as np
import napari_medsam.engine.decoder_channel as dc
key = dc.read_exact(req, 32)
rid, msg = dc.receive_frame(req, key)
def answer(r, m, k=key):
    dc.send_frame(ans, k, r, m)
{load}
while True:
    rid, msg = dc.receive_frame(req, key)
    if msg[0] != "predict":
        continue
{predict}
"""

FAULTS = {
    # at load: never ready, the reason is kept
    "load_random_bytes": ("    os.write(ans, os.urandom(300)); time.sleep(60)", "    pass"),
    "load_wrong_request": ("    answer(rid + 1, ('ready',)); time.sleep(60)", "    pass"),
    "load_wrong_type": ("    answer(rid, ['ready']); time.sleep(60)", "    pass"),
    "load_foreign_key": ("    answer(rid, ('ready',), b'z' * 32); time.sleep(60)", "    pass"),
    "load_exits": ("    os._exit(3)", "    pass"),
    # at predict: ready, then a dead child for the caller
    "predict_random_bytes": ("answer(rid, ('ready',))", "    os.write(ans, os.urandom(300))"),
    "predict_wrong_request": (
        "answer(rid, ('ready',))",
        "    answer(rid + 5, ('ok', np.zeros((1, 598, 449), bool), np.zeros(1, np.float32), np.zeros((1, 4)), 0.1))",
    ),
    "predict_wrong_shape": (
        "answer(rid, ('ready',))",
        "    answer(rid, ('ok', np.zeros((1, 3, 3), bool), np.zeros(1, np.float32), np.zeros((1, 4)), 0.1))",
    ),
    "predict_hangs": ("answer(rid, ('ready',))", "    time.sleep(60)"),
    "predict_dies_mid_frame": ("answer(rid, ('ready',))", "    os.write(ans, dc._MAGIC + b'12'); os._exit(1)"),
    "predict_prints_to_stdout": (
        "answer(rid, ('ready',))",
        (
            "    print('stray output', flush=True); os.write(1, b'x' * 100); sys.stdout.write('y')\n"
            "    answer(rid, ('ok', np.zeros((1, 598, 449), bool), np.zeros(1, np.float32), np.zeros((1, 4)), 0.1))"
        ),
    ),
}


def _boot(load: str, predict: str) -> str:
    body = _FAKE.format(load=load.strip(), predict=predict)
    return _SETUP + "print('noise before anything', flush=True)\n" + body


@pytest.fixture(scope="module")
def faulty(lite):
    """All faulty children started at once (each imports torch), keyed by fault."""
    procs = {}
    for name, (load, predict) in FAULTS.items():
        p = DecoderProcess(lite, start=False, answer_timeout=3.0)
        p.boot = _boot(load, predict)
        p.start()
        procs[name] = p
    for p in procs.values():
        p.wait_ready(300)
    yield procs
    for p in procs.values():
        p.close()


@pytest.fixture(scope="module")
def emb(lite, samples):
    from napari_medsam.engine.io import read_image

    return lite.embed(read_image(samples / "busi_malignant_1.png").array)


@pytest.mark.parametrize("fault", [f for f in FAULTS if f.startswith("load_")])
def test_child_garbage_at_load_is_never_ready(faulty, emb, fault):
    p = faulty[fault]
    assert not p.ready and "did not start" in p.error, p.error
    assert p._proc is None, "the child is gone"
    with pytest.raises(DecoderUnavailable):
        p.predict(emb, (8, 133, 439, 403))


@pytest.mark.parametrize("fault", [f for f in FAULTS if f.startswith("predict_") and "prints" not in f])
def test_child_garbage_at_predict_is_a_dead_child(faulty, lite, emb, fault):
    p = faulty[fault]
    assert p.ready, p.error
    t = time.perf_counter()
    with pytest.raises(DecoderUnavailable, match="stopped"):
        p.predict(emb, (8, 133, 439, 403))
    assert time.perf_counter() - t < 30
    assert not p.ready and p._proc is None and p._fds is None
    with pytest.raises(DecoderUnavailable):
        p.predict(emb, (8, 133, 439, 403))
    assert lite.predict(emb, (8, 133, 439, 403)).masks.any(), "the in-process fallback decodes"


def test_stray_output_never_reaches_the_channel(faulty, emb):
    p = faulty["predict_prints_to_stdout"]
    assert p.ready, p.error
    for _ in range(3):
        pred = p.predict(emb, (8, 133, 439, 403))
        assert pred.masks.shape == (1, 598, 449)
    assert p.ready
