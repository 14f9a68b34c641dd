"""`napari-medsam serve` in a real headless Chromium, driven with real mouse drags.

Debian's chromium (never a downloaded browser) through Playwright; the real
LiteMedSAM; the decoder running in the page with ONNX Runtime Web (wasm).
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from _data import SAMPLES, read_gray

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
VENDOR = Path(__file__).resolve().parents[1] / "src" / "napari_medsam" / "server" / "static" / "vendor"
BUSI_BOX = (8, 133, 439, 403)  # samples/cases.csv: the malignant lesion


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium (apt-get install chromium)")
    if not (VENDOR / "ort.wasm.min.js").exists():
        pytest.skip("ONNX Runtime Web not built: (cd web && npm ci && npm run build)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM))
        yield b
        b.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("web-images")
    for name in ("busi_malignant_1.png", "dsb2018_nuclei.png", "isic_0014270.png", "totalseg_ct.nii.gz"):
        shutil.copy(SAMPLES / name, d / name)
    return d


@pytest.fixture(scope="module")
def web_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("web-cache")


@pytest.fixture
def serve(lite, images, web_cache):
    """Start servers on free ports over ``images``; all are stopped at the end of the test."""
    from napari_medsam.server import ServerThread, build

    started = []

    def start(out, token=None):
        b = build(images, out, model_obj=lite, web_cache=web_cache, token=token)
        srv = ServerThread(b.app).start()
        started.append((srv, b))
        return srv, b

    yield start
    for srv, b in started:
        srv.stop()
        b.service.close()


def open_page(browser, url, context=None):
    ctx = context or browser.new_context(viewport={"width": 1400, "height": 860})
    page = ctx.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_function("window.medsam && window.medsam.ready", timeout=180_000)
    assert errors == []
    return page


def drag(page, box, steps=20, pause_ms=16, release=True):
    """Press at the box's first corner, move in ``steps`` to the other one, release."""
    a = page.evaluate(f"window.medsam.imageToClient({box[0]}, {box[1]})")
    c = page.evaluate(f"window.medsam.imageToClient({box[2]}, {box[3]})")
    page.mouse.move(a["x"], a["y"])
    page.mouse.down()
    for k in range(1, steps + 1):
        f = k / steps
        page.mouse.move(a["x"] + (c["x"] - a["x"]) * f, a["y"] + (c["y"] - a["y"]) * f)
        page.wait_for_timeout(pause_ms)
    if release:
        page.mouse.up()


def wait_accepts(page, n):
    page.wait_for_function(f"window.medsam.stats.accepts >= {n} && !window.medsam.busy", timeout=180_000)


def saved_labels(out: Path, name: str) -> np.ndarray:
    from napari_medsam.engine.session import LabelingSession

    s = LabelingSession.open(out)
    return s.load_labels(next(i for i, it in enumerate(s.items) if it.name == name))


def test_drag_shows_previews_and_release_saves_the_object(browser, serve, tmp_path, lite):
    srv, b = serve(tmp_path / "out")
    page = open_page(browser, srv.url + "/?image=0")
    assert page.evaluate("window.medsam.decoder") == "browser"
    drag(page, BUSI_BOX, release=False)
    page.wait_for_function("window.medsam.stats.previews >= 1", timeout=60_000)
    page.wait_for_timeout(1500)  # let the last move's preview land
    stats = page.evaluate("window.medsam.stats")
    assert stats["previews"] >= 1 and len(stats["latency_ms"]) == stats["previews"]
    assert all(ms > 0 for ms in stats["latency_ms"])
    # the browser's preview of the final box = the engine's full-view decode of that box
    bits = np.unpackbits(np.frombuffer(base64.b64decode(page.evaluate("window.medsam.previewBits()")), np.uint8))
    rgb = b.service.slice_rgb(0, None, None)
    preview = bits[: rgb.shape[0] * rgb.shape[1]].reshape(rgb.shape[:2]).astype(bool)
    engine = lite.predict(lite.embed_rgb(rgb), BUSI_BOX).masks[0]
    assert dice(preview, engine) > 0.99
    page.mouse.up()
    wait_accepts(page, 1)
    objects = page.evaluate("fetch('/api/images/0').then(r => r.json()).then(s => s.objects)")
    assert [o["label"] for o in objects] == [1]
    labels = saved_labels(tmp_path / "out", "busi_malignant_1.png")
    gt = read_gray(SAMPLES / "busi_malignant_1_mask.png") > 0
    assert labels.shape == gt.shape and set(np.unique(labels)) == {0, 1}
    assert dice(labels == 1, gt) > 0.85
    rec = json.loads((tmp_path / "out" / "records" / "busi_malignant_1.json").read_text())
    assert rec["boxes"][0]["box"] == [float(v) for v in BUSI_BOX] and rec["source"] == "web"


def test_edit_delete_undo_redo(browser, serve, tmp_path):
    srv, _ = serve(tmp_path / "out")
    page = open_page(browser, srv.url + "/?image=0")
    drag(page, BUSI_BOX)
    wait_accepts(page, 1)
    first = (saved_labels(tmp_path / "out", "busi_malignant_1.png") == 1).sum()
    # object 1 is selected after accept: drag its bottom-right corner inwards = re-segment
    page.wait_for_timeout(300)
    c = page.evaluate(f"window.medsam.imageToClient({BUSI_BOX[2]}, {BUSI_BOX[3]})")
    scale = page.evaluate(
        "(() => { const m = window.medsam; return m.imageToClient(1, 0).x - m.imageToClient(0, 0).x; })()"
    )
    cx, cy = c["x"] + scale / 2, c["y"] + scale / 2  # the handle sits on the box's outer corner
    page.mouse.move(cx, cy)
    page.mouse.down()
    for k in range(1, 11):
        page.mouse.move(cx - k * 12 * scale, cy - k * 8 * scale)
        page.wait_for_timeout(16)
    page.mouse.up()
    page.wait_for_function("fetch('/api/images/0').then(r => r.json()).then(s => s.version >= 2)", timeout=120_000)
    page.wait_for_function("!window.medsam.busy")
    edited = (saved_labels(tmp_path / "out", "busi_malignant_1.png") == 1).sum()
    assert 0 < edited < first
    page.keyboard.press("Delete")
    page.wait_for_function(
        "fetch('/api/images/0').then(r => r.json()).then(s => s.objects.length == 0)", timeout=60_000
    )
    assert saved_labels(tmp_path / "out", "busi_malignant_1.png").max() == 0
    page.keyboard.press("Control+z")
    page.wait_for_function(
        "fetch('/api/images/0').then(r => r.json()).then(s => s.objects.length == 1)", timeout=60_000
    )
    assert (saved_labels(tmp_path / "out", "busi_malignant_1.png") == 1).sum() == edited
    page.keyboard.press("Control+Shift+z")
    page.wait_for_function(
        "fetch('/api/images/0').then(r => r.json()).then(s => s.objects.length == 0)", timeout=60_000
    )


def test_next_previous_and_mark_done(browser, serve, tmp_path):
    srv, _ = serve(tmp_path / "out")
    page = open_page(browser, srv.url + "/?image=0")
    page.keyboard.press("n")
    page.wait_for_function("window.medsam.image == 1 && window.medsam.ready", timeout=180_000)
    page.click("#btn-prev")
    page.wait_for_function("window.medsam.image == 0 && window.medsam.ready", timeout=180_000)
    page.click("#btn-done")
    page.wait_for_function("window.medsam.image == 1", timeout=180_000)
    state = json.loads((tmp_path / "out" / "session.json").read_text())
    assert state["statuses"]["busi_malignant_1.png"] == "done" and state["current"] == "dsb2018_nuclei.png"
    assert page.inner_text("#progress-text") == "1/4 done"


def test_volume_slice_slider_and_ct_window(browser, serve, tmp_path):
    srv, b = serve(tmp_path / "out")
    page = open_page(browser, srv.url + "/?image=3")
    assert page.is_visible("#slice-slider") and page.is_visible("#window-select")
    page.keyboard.press("ArrowUp")
    page.wait_for_function("window.medsam.ready && window.medsam.slice != null", timeout=180_000)
    z = page.evaluate("window.medsam.slice")
    drag(page, (44, 27, 104, 81), steps=10)  # liver-sized box of samples/cases.csv
    wait_accepts(page, 1)
    labels = saved_labels(tmp_path / "out", "totalseg_ct.nii.gz")
    per_slice = (labels > 0).reshape(labels.shape[0], -1).sum(1)
    assert per_slice[z] > 0 and per_slice.sum() == per_slice[z]
    page.select_option("#window-select", "lung")
    page.wait_for_function("window.medsam.ready", timeout=180_000)


def test_resume_after_server_restart(browser, serve, tmp_path):
    out = tmp_path / "out"
    srv, _ = serve(out)
    page = open_page(browser, srv.url + "/?image=0")
    drag(page, BUSI_BOX)
    wait_accepts(page, 1)
    page.context.close()
    srv.stop()
    srv2, _ = serve(out)  # a new process would do the same: everything comes from OUT
    page = open_page(browser, srv2.url)
    assert page.evaluate("window.medsam.image") == 0  # the session's position
    objects = page.evaluate("fetch('/api/images/0').then(r => r.json()).then(s => s.objects)")
    assert len(objects) == 1 and objects[0]["pixels"] > 1000
    assert "object 1" in page.inner_text("#object-list")


def test_two_browsers_at_once(browser, serve, tmp_path):
    srv, b = serve(tmp_path / "out")
    a = open_page(browser, srv.url + "/?image=0")
    # a second labeler (own context = own client id) is sent to a free image
    other = browser.new_context(viewport={"width": 1400, "height": 860})
    c = open_page(browser, srv.url, other)
    assert c.evaluate("window.medsam.image") != 0
    # asking for the held image gives it read-only, and writes are refused
    c.evaluate("window.medsam.open(0)")
    c.wait_for_function("window.medsam.image == 0 && window.medsam.readonly", timeout=60_000)
    assert c.is_visible("#readonly-badge")
    code = c.evaluate(
        "fetch('/api/images/0/objects', {method: 'POST', headers: {'Content-Type': 'application/json', "
        "'X-Medsam-Client': window.medsam.client}, body: JSON.stringify({box: [10, 10, 50, 50]})}).then(r => r.status)"
    )
    assert code == 409
    # both draw at the same time on their own images
    c.evaluate("window.medsam.open(2)")
    c.wait_for_function("window.medsam.image == 2 && window.medsam.ready", timeout=180_000)
    drag(a, BUSI_BOX)
    drag(c, (383, 152, 651, 472))
    wait_accepts(a, 1)
    wait_accepts(c, 1)
    assert saved_labels(tmp_path / "out", "busi_malignant_1.png").max() == 1
    gt = read_gray(SAMPLES / "isic_0014270_mask.png") > 0
    assert dice(saved_labels(tmp_path / "out", "isic_0014270.png") == 1, gt) > 0.8
    assert b.service.queue.encodes >= 2


def test_bad_token_refused(browser, serve, tmp_path):
    srv, _ = serve(tmp_path / "out", token="s3cret-token-for-tests")
    ctx = browser.new_context()
    page = ctx.new_page()
    resp = page.goto(srv.url + "/")
    assert resp.status == 401
    assert page.goto(srv.url + "/?token=wrong-token-123").status == 401
    assert page.request.get(srv.url + "/api/session").status == 401
    page = open_page(browser, srv.url + "/?token=s3cret-token-for-tests", ctx)  # then a cookie
    assert page.evaluate("fetch('/api/session').then(r => r.status)") == 200


def test_server_decodes_previews_when_the_browser_cannot(browser, serve, tmp_path):
    srv, b = serve(tmp_path / "out")
    page = open_page(browser, srv.url + "/?image=0&decoder=server")
    assert page.evaluate("window.medsam.decoder") == "server"
    drag(page, BUSI_BOX, steps=8, pause_ms=60)
    wait_accepts(page, 1)
    assert page.evaluate("window.medsam.stats.previews") >= 1 and b.service.stats["server_previews"] >= 1


def test_damaged_record_is_reported_at_start_and_on_the_page(browser, serve, images, tmp_path):
    from napari_medsam.engine.session import LabelingSession
    from napari_medsam.server.serve import startup_lines

    out = tmp_path / "out"
    s = LabelingSession(images, out)
    name = s.items[1].name
    s.set_status(1, "in progress")  # so opening the session does not read the record: serve's own check must
    rec = s.record_path(1)
    rec.parent.mkdir(parents=True, exist_ok=True)
    rec.write_text('{"format": "napari-medsam-rec', encoding="utf-8")  # cut short: not JSON
    srv, b = serve(out)
    aside = [p for p in rec.parent.iterdir() if p.name.startswith(rec.name + ".corrupt-")]
    assert len(aside) == 1 and not rec.exists(), "set aside at start, before anyone opens the image"
    printed = startup_lines(b, "127.0.0.1", 7860, token_given=False)
    assert any(line.startswith("warning: ") and name in line and aside[0].name in line for line in printed), printed
    page = open_page(browser, srv.url + "/?image=0")
    page.wait_for_selector("#warn-banner", state="visible", timeout=30_000)
    text = page.inner_text("#warn-banner")
    assert name in text and aside[0].name in text and "moved aside" in text, text
    page.click("#warn-close")
    assert page.is_hidden("#warn-banner")
    assert page.evaluate("window.medsam.ready")  # the session goes on: the page still takes boxes
