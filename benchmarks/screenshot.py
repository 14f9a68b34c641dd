"""The README screenshot (docs/images/widget.png) from a real viewer: the MedSAM dock, one box accepted.

Run under an X server with OpenGL::

    xvfb-run -a -s "-screen 0 1600x1000x24" python benchmarks/screenshot.py [--out PATH]

It drags the breast-ultrasound sample's box with real mouse events on the canvas,
waits for the accepted label, checks it against the sample's ground truth (Dice > 0.85)
and writes the window. Tests never write into docs/; this script is how the image is made.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
DEFAULT_OUT = ROOT / "docs" / "images" / "widget.png"


def _wait(predicate, timeout_s: float, what: str) -> None:
    from _gui import pump

    end = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > end:
            raise TimeoutError(f"timed out waiting for {what}")
        pump(50)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="PNG to write (default: docs/images/widget.png)")
    args = parser.parse_args(argv)

    import napari

    from _gui import drag, pump
    from napari_medsam._widget import MedSAMWidget
    from napari_medsam.engine.evaluation import dice, load_cases
    from napari_medsam.engine.io import read_image

    samples = ROOT / "src" / "napari_medsam" / "samples"
    case = next(c for c in load_cases(samples) if c.image.name == "busi_malignant_1.png")
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    layer = viewer.add_image(read_image(case.image).array, name="breast ultrasound")
    widget = MedSAMWidget(viewer)
    viewer.window.add_dock_widget(widget, name="MedSAM")
    _wait(lambda: widget.controller is not None and widget.controller.image is not None, 300, "the model")
    c = widget.controller
    fut = c.encoder.request(c.current_index())
    _wait(fut.done, 300, "the first encode")
    viewer.reset_view()
    pump(200)
    x0, y0, x1, y1 = case.box
    drag(viewer, layer, (y0, x0), (y1, x1), steps=8)
    _wait(lambda: c.stats["accepts"] >= 1, 120, "the accepted label")
    pump(300)
    score = dice(c.labels.data == 1, case.ground_truth())
    if score <= 0.85:
        raise SystemExit(f"the accepted mask is off (Dice {score:.3f} against the ground truth): no screenshot")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(args.out), canvas_only=False)
    print(f"wrote {args.out} (Dice {score:.3f} against the ground truth)")
    c.close()
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
