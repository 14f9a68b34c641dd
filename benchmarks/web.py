"""Benchmark of `napari-medsam serve` (issue 16): the drag in a real browser, the server under N labelers.

1. Browser: headless Chromium (Debian's /usr/bin/chromium, via Playwright) on the bundled
   512 x 512 fluorescence sample; a 40-move drag with real mouse events paced like a mouse
   (one move per 16.7 ms, on the clock: ``--pacing 60hz``); per run: previews per second,
   previews per move, move -> painted p50/p95 (pointer event timestamp -> the preview drawn
   in the next animation frame) and the wasm decode time alone. Beside it, in the same run, ONNX Runtime (native, 1 thread) on the
   same drag boxes: the split decoder's box graph (what the page runs per move) and the single
   graph (the authors' decoder, what the page ran before), interleaved; the ratios say how much
   is wasm and how much the decoder's form.
2. Server: 1, 4 and 8 simulated labelers (threads speaking HTTP to one server), each opening
   its own images (embedding fetch = one encode through the shared queue) and accepting
   boxes; time to the embedding, accept latency p50/p95, accepts per second.

    python benchmarks/web.py [--runs 3] [--threads 1 2] [--skip-server] [--out /tmp/web_bench.json]

Prints JSON; docs/benchmarks_web.md is written by hand from it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

SAMPLES = Path(__file__).resolve().parents[1] / "src" / "napari_medsam" / "samples"


def pct(v, p):
    v = sorted(v)
    return float(v[min(len(v) - 1, int(p * len(v)))]) if v else float("nan")


def cpu_snapshot():
    """CPU seconds (user + system) so far of this process and of its children, by role: the
    Playwright driver, and Chromium's processes by their ``--type`` (browser, renderer, gpu...)."""
    import psutil  # a napari dependency

    me = psutil.Process()
    out = {"python (benchmark + server)": sum(me.cpu_times()[:2])}
    for ch in me.children(recursive=True):
        try:
            cmd, t, name = ch.cmdline(), ch.cpu_times(), ch.name()
        except psutil.Error:  # ended meanwhile
            continue
        exe = cmd[0] if cmd else ""
        if "chrom" in exe:
            kind = next((a.split("=", 1)[1] for a in cmd if a.startswith("--type=")), "browser")
            role = f"chromium {kind}"
        else:
            role = "playwright driver" if "node" in exe or "playwright" in " ".join(cmd) else name
        out[role] = out.get(role, 0.0) + t.user + t.system
    return out


#: the pointer's pace: one move per display frame of a 60 Hz screen
MOVE_INTERVAL_S = 1 / 60


def browser_drag(url, runs, threads, workers=None, pacing="60hz"):
    """``runs`` + 1 drags of 40 moves each, in order: the first is the page's first drag (the
    report keeps it apart as ``first_drag``), the rest are the timed runs.

    ``pacing``: ``60hz`` sends move k at k x 16.7 ms after the first, whatever the browser is
    doing (a mouse does not wait for the page); ``acked`` waits for each move to be acknowledged
    and then 16.7 ms (the pacing of this benchmark before 2026-12-06: the acknowledgement took
    ~20 ms, so the moves came every ~37 ms, about 27 a second).
    """
    return asyncio.run(_browser_drag(url, runs, threads, workers, pacing))


async def _browser_drag(url, runs, threads, workers, pacing):
    from playwright.async_api import async_playwright

    out = []
    async with async_playwright() as p:
        br = await p.chromium.launch(executable_path="/usr/bin/chromium")
        page = await br.new_page(viewport={"width": 1400, "height": 860})
        await page.goto(f"{url}/?image=0&threads={threads}" + (f"&workers={workers}" if workers else ""))
        await page.wait_for_function("window.medsam && window.medsam.ready", timeout=300_000)
        # the worker's warm-up decodes before the page became ready (V8 compiles the wasm lazily)
        warm = await page.evaluate("window.medsam.stats.warm_ms") or []
        for r in range(runs + 1):
            await page.evaluate("window.medsam.resetStats()")
            a = await page.evaluate("window.medsam.imageToClient(150, 120)")
            c = await page.evaluate("window.medsam.imageToClient(250, 220)")
            await page.mouse.move(a["x"], a["y"])
            await page.mouse.down()
            cpu0 = cpu_snapshot()
            t0 = time.perf_counter()
            sent = []
            for k in range(1, 41):
                f = k / 40
                move = page.mouse.move(a["x"] + (c["x"] - a["x"]) * f, a["y"] + (c["y"] - a["y"]) * f)
                if pacing == "acked":
                    await move
                    await page.wait_for_timeout(MOVE_INTERVAL_S * 1000)
                else:  # on the clock: in order, without waiting for the previous one's acknowledgement
                    await asyncio.sleep(max(0.0, t0 + (k - 1) * MOVE_INTERVAL_S - time.perf_counter()))
                    sent.append(asyncio.ensure_future(move))
            last_sent = time.perf_counter() - t0
            await asyncio.gather(*sent)
            dt = time.perf_counter() - t0
            cpu1 = cpu_snapshot()
            await page.wait_for_timeout(2000)
            st = await page.evaluate("window.medsam.stats")
            await page.keyboard.press("Escape")
            await page.mouse.up()
            lat = st["latency_ms"]
            out.append(
                {
                    "moves": st["moves"],
                    "previews": st["previews"],
                    "drag_s": dt,
                    "move_interval_ms": (last_sent if sent else dt) / (39 if sent else 40) * 1000,
                    "previews_per_s": st["previews"] / dt,
                    "latency_p50_ms": pct(lat, 0.5),
                    "latency_p95_ms": pct(lat, 0.95),
                    "decode_p50_ms": pct(st["decode_ms"], 0.5),
                    "decode_p95_ms": pct(st["decode_ms"], 0.95),
                    "warmup_ms": [round(v, 1) for v in warm] if r == 0 else None,
                    # cores busy during the drag, by process (2.0 = both cores of this machine)
                    "cores_busy": {k: round(max(0.0, cpu1[k] - cpu0.get(k, 0.0)) / dt, 2) for k in cpu1},
                    # where a preview's time goes (p50 / p95): waiting for the decoder, result -> frame,
                    # mask painting, canvas draw
                    **{
                        f"{k}_p50_p95": (pct(st[k], 0.5), pct(st[k], 0.95))
                        for k in (
                            "handler_ms",
                            "to_worker_ms",
                            "worker_wait_ms",
                            "from_worker_ms",
                            "queue_ms",
                            "frame_ms",
                            "mask_ms",
                            "draw_ms",
                        )
                        if st.get(k)
                    },
                }
            )
        await br.close()
    return out


def native_decode_ms(model, rgb, folder, n=40):
    """Native ONNX Runtime (1 thread), same run, the benchmark's 40 drag boxes, interleaved:
    the single-graph decoder (authors' order, full 256 x 256 logits) vs the split one
    (per-box graph on the box's token window; the per-image graph timed once per image)."""
    import onnxruntime as ort
    import torch

    from napari_medsam.engine.fast import auto_window
    from napari_medsam.engine.fast.split_decoder import IMAGE_OUTPUTS
    from napari_medsam.server.decoder_onnx import export_decoder, export_web_decoder

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1

    def session(path):
        return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])

    old, split = session(export_decoder(model, folder)), export_web_decoder(model, folder)
    image, box_s = session(split.image), session(split.box)
    emb = model.embed_rgb(rgb)
    e16 = emb.features.to(torch.float16).numpy()
    r = model.recipe.input_size / max(emb.original_size)
    t_image, t_old, t_box = [], [], []
    for i in range(n + 2):
        t = time.perf_counter()
        state = dict(zip(IMAGE_OUTPUTS, image.run(None, {"embedding": e16}), strict=True))
        t_image.append((time.perf_counter() - t) * 1000)
        f = (i % n + 1) / n
        box = np.array([[int(v * r) for v in (150, 120, 150 + 100 * f, 120 + 100 * f)]], np.float32)
        t = time.perf_counter()
        old.run(None, {"embedding": e16, "box": box})
        t_old.append((time.perf_counter() - t) * 1000)
        ty0, ty1, tx0, tx1 = auto_window(model.recipe, torch.from_numpy(box), emb.resized, (64, 64))
        feed = {**state, "box": box, "rows": np.arange(ty0, ty1), "cols": np.arange(tx0, tx1)}
        t = time.perf_counter()
        box_s.run(None, feed)
        t_box.append((time.perf_counter() - t) * 1000)

    def summary(v):
        return {"p50_ms": pct(v[2:], 0.5), "p95_ms": pct(v[2:], 0.95)}

    return {"single_graph": summary(t_old), "split_box": summary(t_box), "split_image": summary(t_image)}


def call(url, method="GET", body=None, client="c"):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", "X-Medsam-Client": client}
    )
    with urllib.request.urlopen(req, timeout=900) as r:
        return r.read()


def labelers(url, n, per, boxes):
    res = {"embed_s": [], "accept_s": []}
    lock = threading.Lock()

    def one(k):
        client = f"labeler-{k}"
        for j in range(per):
            i = k * per + j
            call(f"{url}/api/open/{i}", "POST", client=client)
            t = time.perf_counter()
            call(f"{url}/api/images/{i}/embedding", client=client)
            e = time.perf_counter() - t
            acc = []
            for b in boxes:
                t = time.perf_counter()
                call(f"{url}/api/images/{i}/objects", "POST", {"box": b}, client)
                acc.append(time.perf_counter() - t)
            with lock:
                res["embed_s"].append(e)
                res["accept_s"].extend(acc)

    t0 = time.perf_counter()
    ts = [threading.Thread(target=one, args=(k,)) for k in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    wall = time.perf_counter() - t0
    a = res["accept_s"]
    return {
        "labelers": n,
        "images": n * per,
        "accepts": len(a),
        "wall_s": wall,
        "accepts_per_s": len(a) / wall,
        "embed_p50_s": pct(res["embed_s"], 0.5),
        "embed_max_s": max(res["embed_s"]),
        "accept_p50_ms": 1000 * pct(a, 0.5),
        "accept_p95_ms": 1000 * pct(a, 0.95),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip-server", action="store_true")
    ap.add_argument(
        "--pacing", choices=("60hz", "acked"), default="60hz", help="moves on the clock, or each after the last's ack"
    )
    ap.add_argument("--skip-browser", action="store_true")
    ap.add_argument(
        "--configs", nargs="+", default=["1x1", "1x2", "2x1"], help="decoder workers x wasm threads each, to run"
    )
    a = ap.parse_args()
    import torch

    from napari_medsam.engine.predictor import MedSAM
    from napari_medsam.server import ServerThread, build

    work = Path(tempfile.mkdtemp(prefix="medsam-webbench-"))
    model = MedSAM.load("litemedsam", device="cpu")
    report = {
        "pacing": a.pacing,
        "machine": {"cpus": os.cpu_count(), "load_before": os.getloadavg(), "torch_threads": torch.get_num_threads()},
    }
    if not a.skip_browser:
        imgs = work / "drag"
        imgs.mkdir()
        shutil.copy(SAMPLES / "dsb2018_nuclei.png", imgs / "dsb2018_nuclei.png")  # 512 x 512
        b = build(imgs, work / "drag-out", model_obj=model, web_cache=work / "web", prefetch=False, lease_s=2.0)
        srv = ServerThread(b.app).start()
        for conf in a.configs:
            workers, threads = (int(v) for v in conf.split("x"))
            runs = browser_drag(srv.url, a.runs, threads, workers, a.pacing)
            key = f"browser_{workers}_workers_x_{threads}_threads"
            key += f"_again_{sum(k.startswith(key) for k in report)}" if key in report else ""  # a config given twice
            # the page's first drag is the one a user meets first: apart, not among the runs
            report[key] = {"first_drag": runs[0], "runs": runs[1:], "load": os.getloadavg()}
            time.sleep(3)  # the closed page's hold on the image lapses (lease 2 s)
        rgb = b.service.slice_rgb(0, None, None)  # what the model sees of the image
        report["native_ort_1_thread"] = native_decode_ms(model, rgb, work / "web")
        srv.stop()
        b.service.close()
    if not a.skip_server:
        from napari_medsam.engine.io import read_image

        src = read_image(SAMPLES / "busi_malignant_1.png").array
        imgs = work / "many"
        imgs.mkdir()
        import cv2

        for i in range(16):  # 16 distinct real images: shifted crops of the sample (distinct embeddings)
            crop = src[i * 4 : i * 4 + 520, i * 2 : i * 2 + 440]
            cv2.imwrite(str(imgs / f"img{i:02d}.png"), crop[..., ::-1])
        boxes = [[8, 133, 400, 380], [100, 150, 300, 350], [30, 60, 200, 220]]
        report["server"] = []
        for n in (1, 4, 8):
            out = work / f"many-out-{n}"
            b = build(imgs, out, model_obj=model, web_cache=work / "web", prefetch=False)
            model.cache.clear()  # every run encodes its images (no hits from the previous one)
            srv = ServerThread(b.app).start()
            r = labelers(srv.url, n, 2, boxes)
            r["encodes"] = b.service.queue.encodes
            r["load"] = os.getloadavg()
            report["server"].append(r)
            srv.stop()
            b.service.close()
    text = json.dumps(report, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
