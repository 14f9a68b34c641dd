"""Issue 14: resident memory while annotating a dask-backed 10,000 x 10,000 slide, against its size.

Each row runs in a child process of its own (``python benchmarks/lazy_slide.py --child MODE``), so
its RSS is its own. The slide is a 10,000 x 10,000 dask array of 512 px tiles of the bundled nuclei
image (``dsb2018_nuclei.png``; ``u16``: its values x 250, a 16-bit fluorescence slide; ``u8``: its
8-bit conversion), made on demand for each chunk read, as a zarr array reads its chunks: the slide
never exists whole unless something loads it. Five nuclei boxes on five tiles across the slide
are annotated.

Modes:

* ``lazy-u8`` / ``lazy-u16``: the plugin's path without a viewer: ``EncoderService`` on the dask
  slide (full view never encoded), each box previewed in its middle-context crop and accepted through
  ``segment_box`` on the lazy plane (the decoder thread's calls);
* ``whole-u16``: the same boxes after the whole-slide conversion the plugin made before (``convert``
  of the whole slide into a uint8 array in RAM);
* ``viewer-u8``: a real napari viewer (on xvfb when there is no display) with the MedSAM widget, the slide as a
  dask layer, each box drawn with a real mouse drag and accepted. napari itself computes the whole
  displayed plane once for its texture (a non-multiscale 2D layer), and the labels layer is a full
  (H, W) uint32 array: both are counted in this row.

``read``: pixels the plugin's threads read (summed over reads, statistics included) / the slide's.
The baseline (``before the slide``) has the model loaded and warm (one box on the small tile).
Prints a markdown table. Run: ``nice -n 10 python benchmarks/lazy_slide.py [--modes lazy-u8,...]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SIDE, TILE = 10_000, 512
TILES = [(3, 4), (7, 15), (12, 2), (16, 11), (18, 18)]  # (row, col) of the annotated tiles
MODES = ("lazy-u8", "lazy-u16", "whole-u16", "viewer-u8")


class RSS:
    """Peak resident memory of this process (psutil, sampled every 10 ms)."""

    def __init__(self):
        import psutil

        self.proc, self.peak, self._stop = psutil.Process(), 0, threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.01)

    def now(self) -> int:
        return self.proc.memory_info().rss

    def phase(self) -> int:
        """Peak since the last call (then reset to the current value)."""
        p = max(self.peak, self.now())
        self.peak = self.now()
        return p


class Mosaic:
    """A SIDE x SIDE slide of ``tile`` copies, made on demand for the slice read (as a zarr array reads
    its chunks); counts the pixels read by the plugin's threads (names starting with ``medsam``)."""

    read = 0

    def __init__(self, tile: np.ndarray):
        self.tile, self.shape, self.dtype, self.ndim = tile, (SIDE, SIDE), tile.dtype, 2

    def __getitem__(self, key):
        ys, xs = (k.indices(SIDE) for k in key)
        h, w = self.tile.shape
        out = self.tile[np.ix_(np.arange(*ys) % h, np.arange(*xs) % w)]
        if threading.current_thread().name.startswith("medsam"):
            Mosaic.read += out.size
        return out


def slide(tile: np.ndarray):
    """The slide as one dask array of TILE x TILE chunks (nothing computed until read)."""
    import dask.array as da

    return da.from_array(Mosaic(tile), chunks=TILE, name="slide")


def inputs():
    from napari_medsam.engine.evaluation import load_cases
    from napari_medsam.engine.intensity import convert
    from napari_medsam.engine.io import read_image

    samples = ROOT / "src" / "napari_medsam" / "samples"
    case = next(c for c in load_cases(samples, dims=2) if c.modality == "fluorescence")
    raw = read_image(case.image).array
    tiles = {"u16": raw.astype(np.uint16) * 250, "u8": convert(raw, "planes").pixels}
    boxes = [tuple(float(v) + o for v, o in zip(case.box, (j * TILE, i * TILE) * 2, strict=True)) for i, j in TILES]
    return tiles, boxes


def warm_up(model, tile: np.ndarray, box) -> None:
    """One box through the crop path on the small tile: the model's own first-use memory (about 0.4 GB
    of encoder/decoder buffers on a CPU, the same for any image) is in the baseline, not in the rows."""
    from napari_medsam.engine.intensity import gray_to_rgb
    from napari_medsam.engine.zoom import segment_box

    x0, y0, x1, y1 = box
    segment_box(model, gray_to_rgb(tile), (x0 % TILE, y0 % TILE, x1 % TILE, y1 % TILE))


def engine_child(mode: str) -> dict:
    import dask

    from napari_medsam import MedSAM
    from napari_medsam._annotator.encoding import EncoderService, Source
    from napari_medsam.engine.intensity import convert, gray_to_rgb
    from napari_medsam.engine.zoom import DEFAULT, crop_window, decode_window, encode_window, segment_box

    dask.config.set(scheduler="synchronous")  # chunks are read in the thread that asks (counted per thread)
    rss = RSS()
    tiles, boxes = inputs()
    model = MedSAM.load("litemedsam", device="cpu")
    warm_up(model, tiles["u8"], boxes[0])
    out = {"baseline_mb": rss.phase() / 1e6}
    data = slide(tiles[mode.split("-")[1]])
    out["slide_mb"] = data.nbytes / 1e6
    t0 = time.perf_counter()
    threading.current_thread().name = "medsam-bench"  # this thread does the plugin's work here
    svc = EncoderService(model)
    if mode.startswith("whole"):  # what the plugin did before: the whole slide converted to uint8 in RAM,
        u8 = convert(data, "planes").pixels  # and each box's plane() call repeating it into RGB
        plane = None
    else:
        svc.set_source(Source(data, rgb=False))
        assert svc.request(()).result(600) is None
        plane = svc.plane(())
    out["open_s"] = time.perf_counter() - t0
    out["open_mb"] = rss.phase() / 1e6
    for box in boxes:
        if mode.startswith("whole"):
            plane = gray_to_rgb(u8)
        w = crop_window(box, plane.shape[:2], DEFAULT, DEFAULT.contexts[len(DEFAULT.contexts) // 2])
        emb, _ = encode_window(model, plane, w)  # the drag's preview
        decode_window(model, emb, w, box)
        mask, _ = segment_box(model, plane, box)  # the accept
        assert mask.any()
        del mask
    out["annotate_mb"] = rss.phase() / 1e6
    out["read"] = Mosaic.read / SIDE**2
    svc.shutdown()
    return out


def viewer_child(mode: str) -> dict:
    import dask
    import napari

    sys.path.insert(0, str(ROOT / "tests"))
    from _gui import drag, pump
    from napari_medsam._widget import MedSAMWidget

    dask.config.set(scheduler="synchronous")
    rss = RSS()
    tiles, boxes = inputs()
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    viewer.add_image(tiles["u8"], name="warm-up")  # a small image first: the model loaded and warm
    widget = MedSAMWidget(viewer)
    viewer.window.add_dock_widget(widget, name="MedSAM")
    _until(lambda: widget.controller is not None and widget.controller.image is not None, pump)
    _until(widget.controller.encoder.request(widget.controller.current_index()).done, pump)
    warm_up(widget.controller.model, tiles["u8"], boxes[0])
    pump(200)
    out = {"baseline_mb": rss.phase() / 1e6}
    data = slide(tiles["u8"])
    out["slide_mb"] = data.nbytes / 1e6
    t0 = time.perf_counter()
    layer = viewer.add_image(data, name="slide", contrast_limits=(0, 255))
    widget.image_combo.setCurrentText("slide")
    widget.start()
    _until(lambda: widget.controller.image is layer, pump)
    ctl = widget.controller
    _until(ctl.encoder.request(ctl.current_index()).done, pump)
    out["open_s"] = time.perf_counter() - t0
    out["open_mb"] = rss.phase() / 1e6
    for x0, y0, x1, y1 in boxes:
        viewer.camera.center = ((y0 + y1) / 2, (x0 + x1) / 2)
        viewer.camera.zoom = 8.0
        pump(100)
        n = ctl.stats["accepts"]
        drag(viewer, layer, (y0, x0), (y1, x1), steps=10)
        _until(lambda n=n: ctl.stats["accepts"] > n, pump)
    out["annotate_mb"] = rss.phase() / 1e6
    out["labels"] = int(ctl.labels.data.max())
    out["layers_mb"] = (
        sum(ly.data.nbytes for ly in viewer.layers if ly.name != "slide" and hasattr(ly.data, "nbytes")) / 1e6
    )
    out["read"] = Mosaic.read / SIDE**2
    viewer.close()
    return out


def _until(predicate, pump, timeout_s: float = 600.0) -> None:
    end = time.perf_counter() + timeout_s
    while not predicate():
        if time.perf_counter() > end:
            raise TimeoutError("the viewer did not get there")
        pump(50)


def run_child(mode: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode]
    if mode.startswith("viewer") and "DISPLAY" not in env and shutil.which("xvfb-run"):
        cmd = ["xvfb-run", "-a", "-s", "-screen 0 1600x1000x24", *cmd]  # napari needs an OpenGL display
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=ROOT, env=env)
    if p.returncode != 0:
        raise RuntimeError(f"{mode} failed: {p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def table(rows: dict[str, dict]) -> list[str]:
    lines = [
        f"Annotating 5 boxes on a {SIDE:,} x {SIDE:,} dask slide (512 px chunks), resident memory (RSS):",
        "",
        (
            "| mode | slide as stored | before the slide | opened (peak) | annotating (peak) | annotating - before | "
            "read by the plugin | open |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, r in rows.items():
        lines.append(
            f"| {mode} | {r['slide_mb']:.0f} MB | {r['baseline_mb']:.0f} MB | {r['open_mb']:.0f} MB | "
            f"{r['annotate_mb']:.0f} MB | {r['annotate_mb'] - r['baseline_mb']:+.0f} MB | {r['read']:.1%} | "
            f"{r['open_s']:.1f} s |"
        )
    viewer = [r for m, r in rows.items() if m.startswith("viewer")]
    if viewer:
        lines += [
            "",
            (
                f"viewer: of the memory opened, the annotation layers (labels uint32 and preview uint8 of the slide's "
                f"size) hold {viewer[0]['layers_mb']:.0f} MB; napari computes the displayed plane of a non-multiscale "
                "2D layer for its texture."
            ),
        ]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(viewer_child(args.child) if args.child.startswith("viewer") else engine_child(args.child)))
        return
    rows = {}
    for mode in args.modes.split(","):
        rows[mode] = run_child(mode)
        print(f"{mode}: {rows[mode]}", file=sys.stderr)
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
