"""`napari-medsam serve` over HTTP (no browser): ids not paths, tokens, hosts, locks, the session files."""

from __future__ import annotations

import json
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from _data import SAMPLES

pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("web-api-images")
    for name in ("busi_malignant_1.png", "isic_0014270.png"):
        shutil.copy(SAMPLES / name, d / name)
    (d.parent / "secret.png").write_bytes((SAMPLES / "busi_malignant_1.png").read_bytes())  # outside IMAGES
    return d


@pytest.fixture(scope="module")
def server(lite, images, tmp_path_factory):
    from napari_medsam.server import ServerThread, build

    out = tmp_path_factory.mktemp("web-api-out")
    b = build(images, out, model_obj=lite, web_cache=out / ".web", prefetch=False)
    srv = ServerThread(b.app).start()
    yield srv, b, out
    srv.stop()
    b.service.close()


def call(url, method="GET", body=None, headers=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


@pytest.mark.parametrize(
    "path",
    [
        "/api/by-name?name=../secret.png",
        "/api/by-name?name=%2Fetc%2Fpasswd",
        "/api/by-name?name=..%2F..%2Fsecret.png",
        "/static/../service.py",
        "/static/%2e%2e/service.py",
        "/static/..%2fservice.py",
        "/api/images/2",
        "/api/images/-1/image.png",
        "/api/images/../../secret.png",
    ],
)
def test_paths_outside_images_are_refused(server, path):
    srv, _, _ = server
    status, body, _ = call(srv.url + path)
    assert status in (400, 404, 422), (path, status)
    assert b"PNG" not in body[:8] and b"import" not in body


def test_images_are_addressed_by_index_only(server):
    srv, _, _ = server
    status, body, _ = call(srv.url + "/api/by-name?name=isic_0014270.png")
    assert status == 200 and json.loads(body) == {"index": 1}
    status, body, head = call(srv.url + "/api/images/1/image.png")
    assert status == 200 and body[:4] == b"\x89PNG"
    assert head["Cross-Origin-Embedder-Policy"] == "require-corp"  # wasm threads in the page


def test_page_modules_are_served_as_javascript(server):
    """The page is ES modules (a browser refuses a module with a non-JavaScript type under nosniff)."""
    import re

    srv, _, _ = server
    status, page, _ = call(srv.url + "/")
    assert status == 200
    page = page.decode()
    assert '<script type="module" src="/static/app.js">' in page
    seen, todo = set(), ["app.js", "worker.js"]  # worker.js: the decoder's Web Worker (a classic script)
    while todo:
        name = todo.pop()
        seen.add(name)
        status, body, head = call(f"{srv.url}/static/{name}")
        assert status == 200, name
        assert head["Content-Type"].split(";")[0] == "text/javascript", (name, head["Content-Type"])
        assert head["Cross-Origin-Resource-Policy"] == "same-origin"
        text = body.decode()
        assert len(text.splitlines()) <= 400, f"{name}: over 400 lines"
        todo += [m for m in re.findall(r'from "\./([\w-]+\.js)"', text) if m not in seen]
    assert {"app.js", "api.js", "canvas.js", "decoder.js", "state.js", "worker.js"} <= seen, seen
    status, body, _ = call(f"{srv.url}/static/worker.js")
    assert 'importScripts("/static/vendor/ort.wasm.min.js")' in body.decode()  # ONNX Runtime Web in the worker


def test_embedding_is_sent_as_fp16_and_matches_the_engine(server, lite):
    srv, b, _ = server
    status, body, head = call(srv.url + "/api/images/0/embedding")
    assert status == 200 and len(body) == 256 * 64 * 64 * 2
    feats = np.frombuffer(body, "<f2").reshape(1, 256, 64, 64).astype(np.float32)
    ref = lite.embed_rgb(b.service.slice_rgb(0, None, None)).features.float().numpy()
    assert np.abs(feats - ref).max() < 1e-2 * max(1.0, float(np.abs(ref).max()))
    h, w = (int(v) for v in head["X-Medsam-Original"].split(","))
    assert (h, w) == b.service.slice_rgb(0, None, None).shape[:2]


def test_wrong_host_header_refused(server):
    srv, _, _ = server
    status, _, _ = call(srv.url + "/api/session", headers={"Host": "evil.example:7860"})
    assert status == 403


def test_locks_and_the_session_files(server):
    srv, b, out = server
    a, c = {"X-Medsam-Client": "alice"}, {"X-Medsam-Client": "carol"}
    assert json.loads(call(srv.url + "/api/open/0", "POST", headers=a)[1])["readonly"] is False
    assert json.loads(call(srv.url + "/api/open/0", "POST", headers=c)[1])["readonly"] is True
    status, body, _ = call(srv.url + "/api/images/0/objects", "POST", {"box": [8, 133, 439, 403]}, c)
    assert status == 409 and b"someone else" in body
    status, body, _ = call(srv.url + "/api/images/0/objects", "POST", {"box": [8, 133, 439, 403]}, a)
    assert status == 200 and json.loads(body)["label"] == 1
    rec = json.loads((out / "records" / "busi_malignant_1.json").read_text())
    assert rec["objects"][0]["label"] == 1 and rec["objects"][0]["pixels"] > 1000
    assert json.loads((out / "session.json").read_text())["statuses"]["busi_malignant_1.png"] == "in progress"
    # carol starts on a free image; alice's release frees image 0
    assert json.loads(call(srv.url + "/api/session", headers=c)[1])["start"] == 1
    call(srv.url + "/api/release", "POST", headers=a)
    assert json.loads(call(srv.url + "/api/open/0", "POST", headers=c)[1])["readonly"] is False
    status, body, _ = call(srv.url + "/api/images/0/objects/7", "PUT", {"box": [1, 1, 50, 50]}, c)
    assert status == 404 and b"no box of object 7" in body
    status, body, _ = call(srv.url + "/api/images/0/objects", "POST", {"box": [900, 900, 950, 950]}, c)
    assert status == 400 and b"no area" in body
    status, body, _ = call(srv.url + "/api/images/0/objects", "POST", {"box": [1, 2, 3, 4], "window": "bogus"}, c)
    assert status == 400
    res = json.loads(call(srv.url + "/api/export", "POST", headers=c)[1])
    assert res["files"] == 1 and (out / res["summary"]).exists()


def test_token_rules():
    from napari_medsam.server.serve import ServeError, check_token, is_loopback

    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5")
    assert check_token("127.0.0.1", None) is None
    generated = check_token("0.0.0.0", None)
    assert generated and len(generated) >= 16 and generated != check_token("0.0.0.0", None)
    assert check_token("0.0.0.0", "given-token-1") == "given-token-1"
    with pytest.raises(ServeError, match="at least 8"):
        check_token("0.0.0.0", "short")


def test_work_undo_redo_and_ids():
    from napari_medsam.server.work import EditError, ImageWork

    w = ImageWork.empty((20, 30))
    m = np.zeros((20, 30), bool)
    m[2:5, 3:9] = True
    assert w.add([3, 2, 8, 4], None, m) == 1
    assert w.add([0, 0, 29, 19], None, np.ones((20, 30), bool)) == 2
    assert (w.labels == 2).all()
    w.undo()
    assert set(np.unique(w.labels)) == {0, 1} and len(w.boxes) == 1
    w.redo()
    w.delete(2)
    assert w.next_label() == 2 and (w.labels == 1).sum() == 0  # object 2 had covered object 1
    with pytest.raises(EditError):
        w.edit(5, [0, 0, 3, 3], None, m)
    assert w.boxes[0]["vertices"] == [[2.0, 3.0], [2.0, 8.0], [4.0, 8.0], [4.0, 3.0]]


def test_decoder_files_are_served(server):
    srv, b, _ = server
    status, body, _ = call(srv.url + "/api/session")
    urls = json.loads(body)["decoder"]
    # the address names the exported file (weights + graph code), so a browser's cached copy of an
    # older graph is never paired with a newer one
    assert urls == {k: f"/api/decoder/{k}.onnx?v={getattr(b.decoder, k).stem}" for k in ("image", "box")}
    assert b.decoder.image.stem != b.decoder.box.stem
    for part in ("image", "box"):
        status, body, _ = call(srv.url + urls[part])
        assert status == 200 and body == getattr(b.decoder, part).read_bytes()
    assert call(srv.url + "/api/decoder/service.onnx")[0] == 404


# real cases from samples/cases.csv: large lesions, small nuclei, a nucleus cut by the border
SPLIT_CASES = [
    ("busi_malignant_1.png", (8, 133, 439, 403)),
    ("isic_0014270.png", (383, 152, 651, 472)),
    ("dsb2018_nuclei.png", (155, 129, 179, 153)),
    ("dsb2018_nuclei.png", (347, 0, 364, 9)),
    ("dsb2018_nuclei.png", (182, 394, 209, 422)),
    ("dsb2018_nuclei.png", (100, 100, 300, 300)),  # a box over many nuclei
]


def test_split_browser_decoder_equals_the_engine(lite, tmp_path):
    """The page's two ONNX graphs (per image, per box on the box's token window, run here with
    ONNX Runtime as the page runs them with ONNX Runtime Web) give the engine's masks."""
    ort = pytest.importorskip("onnxruntime")
    import torch

    from napari_medsam.engine.fast import auto_window, touches_border, window_pixels
    from napari_medsam.engine.fast.split_decoder import FILL_LOGIT, IMAGE_OUTPUTS
    from napari_medsam.server import build

    imgs = tmp_path / "images"
    imgs.mkdir()
    for name in {c[0] for c in SPLIT_CASES}:
        shutil.copy(SAMPLES / name, imgs / name)
    b = build(imgs, tmp_path / "out", model_obj=lite, web_cache=tmp_path / "web", prefetch=False)
    try:
        assert b.decoder is not None
        image_s = ort.InferenceSession(str(b.decoder.image), providers=["CPUExecutionProvider"])
        box_s = ort.InferenceSession(str(b.decoder.box), providers=["CPUExecutionProvider"])
        recipe = lite.recipe
        for name, box in SPLIT_CASES:
            rgb = b.service.slice_rgb(b.service.index_of(name), None, None)
            emb = lite.embed_rgb(rgb)
            e16 = emb.features.to(torch.float16).numpy()
            state = dict(zip(IMAGE_OUTPUTS, image_s.run(None, {"embedding": e16}), strict=True))
            r = recipe.input_size / max(emb.original_size)
            bt = np.array([[int(v * r) for v in box]], np.float32)  # the page's trunc(box * 256 / max(H, W))

            def run(win, state=state, bt=bt):
                ty0, ty1, tx0, tx1 = win
                feed = {**state, "box": bt, "rows": np.arange(ty0, ty1), "cols": np.arange(tx0, tx1)}
                flat, iou = box_s.run(None, feed)
                full = np.full((1, 1, 256, 256), FILL_LOGIT, np.float32)
                full[0, 0, ty0 * 4 : ty1 * 4, tx0 * 4 : tx1 * 4] = flat.reshape(4 * (ty1 - ty0), 4 * (tx1 - tx0))
                return torch.from_numpy(full), iou

            win = auto_window(recipe, torch.from_numpy(bt), emb.resized, (64, 64))
            logits, iou = run(win)
            if touches_border(logits, win, emb.resized, 4):  # the page's fallback: the whole grid
                win = (0, 64, 0, 64)
                logits, iou = run(win)
            y0, y1, x0, x1 = window_pixels(win, 4, emb.resized, emb.original_size)
            mask = np.zeros(emb.original_size, bool)
            mask[y0:y1, x0:x1] = recipe.postprocess(logits, emb.resized, emb.original_size, (y0, y1, x0, x1))[0]
            ref = lite.predict(emb, box)
            want = np.asarray(ref.masks[0], bool)
            d = 2.0 * (mask & want).sum() / max(mask.sum() + want.sum(), 1)
            assert want.sum() > 0 and d > 0.99, (name, box, d)
            assert abs(float(iou.ravel()[0]) - float(np.ravel(ref.iou)[0])) < 1e-3, (name, box)
            # the whole grid (the fallback, and boxes with an empty window) gives the same mask
            full = recipe.postprocess(run((0, 64, 0, 64))[0], emb.resized, emb.original_size)[0].numpy()
            assert 2.0 * (full & want).sum() / max(full.sum() + want.sum(), 1) > 0.99, (name, box)
    finally:
        b.service.close()
