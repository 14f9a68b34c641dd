"""A slide-sized 2D image in the viewer: never encoded whole; the drag previews and the accept
work through the box's crops (a real viewer, the real model, real mouse events)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from _gui import drag, open_slide, pump
from napari_medsam.engine.evaluation import dice, load_cases
from napari_medsam.engine.io import read_image
from napari_medsam.engine.zoom import DEFAULT

pytestmark = pytest.mark.gui


def test_slide_is_annotated_through_crops_only(make_napari_viewer, qtbot, samples):
    c = next(c for c in load_cases(samples, dims=2) if c.modality == "fluorescence")
    raw = read_image(c.image).array
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    reps = 9
    h, w = raw.shape[:2]
    big = np.tile(raw, (reps, reps))
    assert max(big.shape) > DEFAULT.large_side
    layer, ctl = open_slide(viewer, qtbot, big, name="mosaic")
    oy, ox = 4 * h, 5 * w
    x0, y0, x1, y1 = c.box
    box = (x0 + ox, y0 + oy, x1 + ox, y1 + oy)
    viewer.camera.center = ((y0 + y1) / 2 + oy, (x0 + x1) / 2 + ox)
    viewer.camera.zoom = 8.0  # the nucleus spans a few hundred canvas pixels
    pump(100)
    previews = []  # (region, mask pixels) of each preview shown
    show = ctl._show_preview
    ctl._show_preview = lambda res: (previews.append((res.region, int(res.prediction.masks[0].sum()))), show(res))
    n = ctl.stats["accepts"]
    drag(viewer, layer, (box[1], box[0]), (box[3], box[2]), steps=10)
    qtbot.waitUntil(lambda: ctl.stats["accepts"] > n, timeout=120_000)
    assert previews and all(p > 0 for _, p in previews), "the mask followed the box during the drag"
    for (ry0, ry1, rx0, rx1), _ in previews:  # decoded in a crop around the box, not on a full view
        assert ry0 <= box[1] and box[3] < ry1 and rx0 <= box[0] and box[2] < rx1 and max(ry1 - ry0, rx1 - rx0) <= 1024
    gt = np.zeros(big.shape[:2], bool)
    gt[oy : oy + h, ox : ox + w] = c.ground_truth()
    labels = ctl.labels.data
    assert dice(labels == 1, gt) > 0.7
    sizes = [max(e.original_size) for e in ctl.model.cache._mem.values()]
    assert sizes and max(sizes) <= 1024, f"only crops were encoded, got sides {sizes}"
