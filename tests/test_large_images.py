"""Large 2D images (slides, mosaics) through the CLI/batch front-end: crops only, never a full view.

A full-view embedding of a 10,000 px image sees a 20 px nucleus as half a pixel: useless, and
an encoder run on the critical path. ``ImageSegmenter`` (``napari-medsam segment`` / ``batch``)
answers such images through :func:`engine.zoom.segment_box`'s crop-only path.
"""

from __future__ import annotations

import csv

import numpy as np
import tifffile

from napari_medsam.engine.batch import ImageSegmenter, run_batch
from napari_medsam.engine.evaluation import dice, load_cases
from napari_medsam.engine.io import read_image
from napari_medsam.engine.zoom import DEFAULT


def _tiled(samples, model, tmp_path, reps=20):
    c = next(c for c in load_cases(samples, dims=2) if c.modality == "fluorescence")
    plane = model.prepare(read_image(c.image).array)[..., 0]  # uint8, as the model sees the sample
    big = np.tile(plane, (reps, reps))
    path = tmp_path / "mosaic.tif"
    tifffile.imwrite(path, big)
    oy, ox = 7 * plane.shape[0], 13 * plane.shape[1]
    box = (c.box[0] + ox, c.box[1] + oy, c.box[2] + ox, c.box[3] + oy)
    gt = np.zeros(big.shape, bool)
    gt[oy : oy + plane.shape[0], ox : ox + plane.shape[1]] = c.ground_truth()
    return path, big, box, gt


def test_large_image_segments_through_crops_only(lite_default, samples, tmp_path):
    path, big, box, gt = _tiled(samples, lite_default, tmp_path)
    assert max(big.shape) > DEFAULT.large_side
    model = lite_default
    before = set(model.cache._mem)
    seg = ImageSegmenter(model, read_image(path)).segment(",".join(str(v) for v in box))
    new = [model.cache._mem[k] for k in set(model.cache._mem) - before]
    assert new and all(max(e.original_size) <= 1024 for e in new), [e.original_size for e in new]
    assert seg.encode_s == 0.0  # no full-view encode
    assert seg.mask.shape == big.shape and dice(seg.mask, gt) > 0.7
    # batch gives the same mask from a prompts file
    prompts = tmp_path / "prompts.csv"
    with open(prompts, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["image", "box", "name"])
        w.writeheader()
        w.writerow({"image": str(path), "box": ",".join(map(str, box)), "name": "nucleus"})
    res = run_batch(prompts, tmp_path / "out", model=model, progress=False, log=None)
    got = read_image(tmp_path / "out" / res.rows[0].mask).array.astype(bool)
    assert (got == seg.mask).all()
