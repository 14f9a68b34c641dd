"""A slide as a dask-backed layer stays lazy: the plugin reads only the regions around the box
(and, for 16-bit data, streams the slide once, a few chunks at a time, for the intensity rule's
statistics), never holding the whole slide (a real viewer, the real model, real mouse events;
every read of the slide is recorded with its thread; napari's own display reads are not ours)."""

from __future__ import annotations

import threading

import dask
import dask.array as da
import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from _gui import drag, open_slide, pump
from napari_medsam.engine.evaluation import dice, load_cases
from napari_medsam.engine.intensity import model_input
from napari_medsam.engine.io import read_image
from napari_medsam.engine.lazy import LazyU8
from napari_medsam.engine.zoom import DEFAULT

pytestmark = pytest.mark.gui
REPS = 9  # 9 x 9 tiles of 512 px: a 4608 px mosaic, over the zoom's large_side
TILE_AT = (4, 5)  # the tile whose nucleus is annotated


class Tile:
    """A numpy tile that records every window read from it (slide coordinates, reading thread)."""

    def __init__(self, array: np.ndarray, origin: tuple[int, int], log: list):
        self.array, self.origin, self.log = array, origin, log
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        ys, xs = (k.indices(n)[:2] for k, n in zip(key, self.shape, strict=False))
        y0, x0 = self.origin
        self.log.append((threading.current_thread().name, (y0 + ys[0], y0 + ys[1], x0 + xs[0], x0 + xs[1])))
        return self.array[key]


def mosaic(tile: np.ndarray, log: list):
    """REPS x REPS copies of ``tile`` as one dask array, one chunk per tile."""
    h, w = tile.shape[:2]
    return da.block(
        [
            [
                da.from_array(Tile(tile, (i * h, j * w), log), chunks=tile.shape, name=f"tile-{i}-{j}")
                for j in range(REPS)
            ]
            for i in range(REPS)
        ]
    )


def read_by_plugin(log: list, shape) -> np.ndarray:
    """Where the plugin's worker threads read the slide (napari's own display reads not counted)."""
    seen = np.zeros(shape, bool)
    for thread, (y0, y1, x0, x1) in log:
        if thread.startswith("medsam"):
            seen[y0:y1, x0:x1] = True
    return seen


def annotate(make_napari_viewer, qtbot, tile: np.ndarray, case):
    """(controller, slide, box, log): the mosaic opened as a dask layer, its box drawn and accepted."""
    log: list = []
    big = mosaic(tile, log)
    assert max(big.shape) > DEFAULT.large_side
    viewer = make_napari_viewer(show=True)
    viewer.window._qt_window.resize(1400, 900)
    with dask.config.set(scheduler="synchronous"):  # chunks are read in the thread that asks for them
        lo, hi = float(tile.min()), float(tile.max())
        layer, ctl = open_slide(viewer, qtbot, big, name="slide", contrast_limits=(lo, hi))
        assert isinstance(ctl.encoder.model_input(), LazyU8), "the slide stays lazy"
        h, w = tile.shape[:2]
        oy, ox = TILE_AT[0] * h, TILE_AT[1] * w
        x0, y0, x1, y1 = case.box
        box = (x0 + ox, y0 + oy, x1 + ox, y1 + oy)
        viewer.camera.center = ((y0 + y1) / 2 + oy, (x0 + x1) / 2 + ox)
        viewer.camera.zoom = 8.0
        pump(100)
        n = ctl.stats["accepts"]
        drag(viewer, layer, (box[1], box[0]), (box[3], box[2]), steps=10)
        qtbot.waitUntil(lambda: ctl.stats["accepts"] > n, timeout=120_000)
    return ctl, big, box, log


def check_mask(ctl, big, case, tile_shape) -> None:
    h, w = tile_shape
    gt = np.zeros(big.shape[:2], bool)
    gt[TILE_AT[0] * h : TILE_AT[0] * h + h, TILE_AT[1] * w : TILE_AT[1] * w + w] = case.ground_truth()
    assert dice(ctl.labels.data == 1, gt) > 0.7
    sizes = [max(e.original_size) for e in ctl.model.cache._mem.values()]
    assert sizes and max(sizes) <= 1024, f"only crops were encoded, got sides {sizes}"


def near(seen: np.ndarray, box, margin: int) -> np.ndarray:
    """``seen`` outside the box grown by ``margin`` pixels."""
    x0, y0, x1, y1 = (int(v) for v in box)
    out = seen.copy()
    out[max(0, y0 - margin) : y1 + margin, max(0, x0 - margin) : x1 + margin] = False
    return out


@pytest.fixture(scope="module")
def nuclei(samples):
    c = next(c for c in load_cases(samples, dims=2) if c.modality == "fluorescence")
    return c, read_image(c.image).array


def test_8bit_dask_slide_reads_only_around_the_box(make_napari_viewer, qtbot, nuclei):
    case, raw = nuclei
    tile = model_input(raw, "planes")  # the nuclei as 8-bit: read as they are, no statistics
    ctl, big, box, log = annotate(make_napari_viewer, qtbot, tile, case)
    check_mask(ctl, big, case, tile.shape)
    seen = read_by_plugin(log, big.shape)
    assert seen.any(), "the plugin read the slide through the dask layer"
    assert not near(seen, box, 512).any(), "every read lies within 512 px of the box"
    assert seen.mean() < 0.02, f"the plugin read {seen.mean():.1%} of the slide"


def test_16bit_dask_slide_streams_its_statistics(make_napari_viewer, qtbot, nuclei):
    """16-bit data: the percentile rule's statistics are exact, from value counts streamed a few chunks
    at a time by the encoder thread; the boxes' crops are read by the decoder thread, near the box."""
    case, raw = nuclei
    tile = raw.astype(np.uint16) * 250  # a 16-bit fluorescence slide: the percentile rule
    ctl, big, box, log = annotate(make_napari_viewer, qtbot, tile, case)
    check_mask(ctl, big, case, tile.shape)
    u8 = ctl.encoder.model_input()
    assert u8.intensity.rule == "percentile"
    lo, hi = np.percentile(tile[tile > 0].astype(np.float64), [0.5, 99.5])  # the mosaic's: its tile's
    assert (u8.scalings[0].low, u8.scalings[0].high) == (lo, hi)
    ours = [(t, w) for t, w in log if t.startswith("medsam")]
    assert all(y1 - y0 <= tile.shape[0] and x1 - x0 <= tile.shape[1] for _, (y0, y1, x0, x1) in ours), "whole chunks"
    crops = read_by_plugin([(t, w) for t, w in ours if t == "medsam-decoder"], big.shape)
    assert crops.any() and not near(crops, box, 512).any(), "the boxes' crops lie within 512 px of the box"
