"""Latency a user feels: first mask after opening / after Next, 3D propagation, cost per accepted box.

Each function returns rows ``(what, n, ours median, ours p95, authors median, authors p95)`` in ms
(``bench_box_cost`` also returns a dict of counts). The authors' pipeline
(``run.authors_encode`` / ``run.authors_decode``) is timed in the same run, interleaved.
No Qt: the session's next-image prefetch is the plugin's own :class:`EncoderService`
(``napari_medsam._annotator.encoding``, Qt-free) fed with the same :class:`Source` the
session widget builds; the volume prefetch is ``engine.precompute.planes`` (current slice outward).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "src/napari_medsam/samples"
SHARED = ROOT.parent / "shared" / "data"


def _ms(values_s):
    a = np.asarray(values_s, float) * 1000
    return float(np.median(a)), float(np.percentile(a, 95))


def _session_images(n):
    """Up to ``n`` distinct 2D images with one box each (shared dev data, else the bundled samples)."""
    from napari_medsam.engine.evaluation import load_cases

    cases = load_cases(SHARED, dims=2) if (SHARED / "cases.csv").exists() else []
    cases += load_cases(SAMPLES, dims=2)
    seen, out = set(), []
    for c in cases:
        if c.image in seen:
            continue
        seen.add(c.image)
        out.append(c)
    # spread over datasets: take every k-th so several modalities appear
    step = max(1, len(out) // max(n, 1))
    return out[::step][:n]


def bench_first_mask(n_pairs=4):
    """Open -> first mask, cold (encoder on the critical path) and after Next with the next image prefetched.

    A LabelingSession over a folder of real images; the model uses the session's embedding cache as the
    session widget does. Image 2k is opened cold; while the user works on it for one encoder time, image
    2k+1 is prefetched by the plugin's EncoderService through its ``Prefetch.image`` (as
    ``_session_widget._prefetch_next``: the encode, then the decoder's per-image state); then Next. First preview = the full-view decode a drag shows;
    first accepted mask = ``engine.zoom.segment_box`` (the default accept, incl. its crop encodes).
    Authors: read + encode + decode for every image (they have no prefetch).
    """
    from napari_medsam import MedSAM
    from napari_medsam._annotator.decoding import LatestBoxDecoder
    from napari_medsam._annotator.encoding import EncoderService, Source
    from napari_medsam._annotator.prefetch import Prefetch
    from napari_medsam.engine.session import LabelingSession
    from napari_medsam.engine.zoom import segment_box
    from run import authors_decode, authors_encode

    cases = _session_images(2 * n_pairs)
    tmp = Path(tempfile.mkdtemp(prefix="medsam-bench-session-"))
    try:
        src = tmp / "in"
        src.mkdir()
        boxes = {}
        for i, c in enumerate(cases):
            name = f"{i:02d}_{c.image.name}"
            shutil.copy(c.image, src / name)
            boxes[name] = c.box
        session = LabelingSession(src, tmp / "out")
        model = MedSAM.load("litemedsam", device="cpu")
        exact = MedSAM.load("litemedsam", device="cpu", exact=True)
        model.cache = session.embedding_cache(max_bytes=model.cache.max_bytes)
        encoder = EncoderService(model)
        decoder = LatestBoxDecoder(model, on_result=lambda r: None)
        prefetch = Prefetch(encoder, decoder, on_progress=lambda d, t: None)  # the session widget's
        rows = {k: [] for k in ("cold_prev", "cold_acc", "next_prev", "next_acc", "authors", "enc_wait")}

        def source_of(img):
            return Source(img.array, img.kind == "rgb", "auto", None)

        def first_mask(index, kind):
            t0 = time.perf_counter()
            img = session.read(index)
            encoder.set_source(source_of(img))
            emb = encoder.request(()).result()
            t_emb = time.perf_counter()
            box = boxes[session.items[index].path.name]
            model.predict(emb, box)
            t_prev = time.perf_counter()
            segment_box(model, encoder.plane(()), box, full_embedding=emb)
            t_acc = time.perf_counter()
            rows[f"{kind}_prev"].append(t_prev - t0)
            rows[f"{kind}_acc"].append(t_acc - t0)
            if kind == "next":
                rows["enc_wait"].append(t_emb - t0)
            return encoder.plane(()), box

        def authors(index, rgb, box):
            t0 = time.perf_counter()
            session.read(index)  # the same file read
            emb, new_hw = authors_encode(exact.module, rgb)
            authors_decode(exact.module, emb, box, rgb.shape[:2], new_hw)
            rows["authors"].append(time.perf_counter() - t0)

        # warm-up (first ONNX/torch calls are slower): not timed
        warm = session.read(0)
        model.embed_rgb(model.prepare(warm.array), use_cache=False)
        for k in range(n_pairs):
            i = 2 * k
            session.jump(i)
            rgb, box = first_mask(i, "cold")
            authors(i, rgb, box)
            # the user works on image i for one encoder time; the session prefetches image i+1
            t_enc = model.last_encode_s or 0.7
            nxt = session.read(i + 1)
            prefetch.image(source_of(nxt))  # encode + the decoder's per-image state
            time.sleep(t_enc)
            session.next()
            rgb, box = first_mask(i + 1, "next")
            authors(i + 1, rgb, box)
        encoder.shutdown()
        encoder.join(30)
        decoder.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    a = _ms(rows["authors"])
    n = n_pairs
    return [
        ("first preview after opening an image (cold: encoder on the critical path)", n, *_ms(rows["cold_prev"]), *a),
        ("first accepted mask after opening (cold; default zoom accept)", n, *_ms(rows["cold_acc"]), *a),
        (
            "first preview after Next (next image prefetched, user spent one encoder time)",
            n,
            *_ms(rows["next_prev"]),
            *a,
        ),
        (
            "first accepted mask after Next (prefetched; zoom crops still encoded on accept)",
            n,
            *_ms(rows["next_acc"]),
            *a,
        ),
    ], {"wait_for_embedding_after_next_ms": _ms(rows["enc_wait"]), "images": [c.case for c in cases]}


def _authors_volume(module, u8, box, key, lo, hi):
    """The authors' 3D recipe on the given z-range: key box, then chained boxes (3 px at 256) up and down."""
    from run import authors_decode, authors_encode

    h, w = u8.shape[1:]
    margin = 3 * max(h, w) / 256

    def one(z, b):
        rgb = np.repeat(u8[z][..., None], 3, -1)
        emb, new_hw = authors_encode(module, rgb)
        return authors_decode(module, emb, b, (h, w), new_hw)

    def chained(m, fallback):
        ys, xs = np.nonzero(m)
        if not len(ys):
            return fallback
        return (
            max(0, xs.min() - margin),
            max(0, ys.min() - margin),
            min(w - 1, xs.max() + margin),
            min(h - 1, ys.max() + margin),
        )

    m0 = one(key, box)
    for step, bound in ((1, hi), (-1, lo)):
        m, z = m0, key + step
        while (step > 0 and z <= bound) or (step < 0 and z >= bound):
            m = one(z, chained(m, box))
            z += step


def bench_volume_20(repeats=2):
    """A 20-slice object (bundled TotalSegmentator CT, label 5, z-range of 20 slices, no stop rule as the
    authors fill a given range): propagation after the volume was prefetched, and cold (fresh cache)."""
    from napari_medsam import EmbeddingCache, MedSAM
    from napari_medsam.engine.cases import load_cases
    from napari_medsam.engine.io import read_image
    from napari_medsam.engine.precompute import planes
    from napari_medsam.engine.volume import StopRule, segment_volume, volume_to_uint8

    case = next(c for c in load_cases(SAMPLES, dims=3) if c.case.endswith("ct_img#label5"))
    image = read_image(case.image)
    vol = image.array
    key = int(case.key_slice)
    lo, hi = max(0, key - 14), min(vol.shape[0] - 1, key - 14 + 19)
    lo = hi - 19
    model = MedSAM.load("litemedsam", device="cpu")
    exact = MedSAM.load("litemedsam", device="cpu", exact=True)
    u8, _, _ = volume_to_uint8(vol, "ct", None)
    kw = {"modality": "ct", "z_range": (lo, hi), "stop": StopRule.never()}
    warm = segment_volume(model, vol, case.box, key, **{**kw, "z_range": (key, key)})
    del warm
    pre, cold, theirs, prefetch_s = [], [], [], []
    stats = {}
    for _ in range(repeats):
        model.cache = EmbeddingCache()
        t = time.perf_counter()
        for z, rgb in planes(model, image, "ct", None, start=key):  # the volume prefetch: current slice outward
            if lo <= z <= hi:
                model.embed_rgb_status(rgb)
        prefetch_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        segment_volume(model, vol, case.box, key, **kw, stats=stats)
        pre.append(time.perf_counter() - t)
        n_pre_encoded = stats["n_encoded"]
        model.cache = EmbeddingCache()
        t = time.perf_counter()
        segment_volume(model, vol, case.box, key, **kw, stats=stats)
        cold.append(time.perf_counter() - t)
        t = time.perf_counter()
        _authors_volume(exact.module, u8, case.box, key, lo, hi)
        theirs.append(time.perf_counter() - t)
    a = _ms(theirs)
    return [
        (
            f"3D: 20-slice object propagated, volume prefetched ({vol.shape[2]} x {vol.shape[1]} CT)",
            repeats,
            *_ms(pre),
            *a,
        ),
        ("3D: 20-slice object propagated, cold (every slice encoded)", repeats, *_ms(cold), *a),
    ], {
        "slices": hi - lo + 1,
        "encoded_when_prefetched": n_pre_encoded,
        "encoded_cold": stats["n_encoded"],
        "prefetch_ms": _ms(prefetch_s),
        "case": case.case,
    }


def _neighbour_nuclei(n):
    """Boxes (x0, y0, x1, y1) of the ``n`` labelled nuclei nearest the image centre, in reading order."""
    from scipy import ndimage

    from napari_medsam.engine.io import read_image

    lab = read_image(SAMPLES / "dsb2018_nuclei_labels.png").array
    lab = lab if lab.ndim == 2 else lab[..., 0]
    h, w = lab.shape
    found = []
    for i, sl in enumerate(ndimage.find_objects(lab)):
        if sl is None:
            continue
        y0, y1, x0, x1 = sl[0].start, sl[0].stop - 1, sl[1].start, sl[1].stop - 1
        if min(x1 - x0, y1 - y0) < 6:
            continue
        d = np.hypot((x0 + x1) / 2 - w / 2, (y0 + y1) / 2 - h / 2)
        found.append((d, (int(x0), int(y0), int(x1), int(y1)), i))
    found.sort()
    boxes = [b for _, b, _ in found[:n]]
    return sorted(boxes, key=lambda b: (b[1] // 40, b[0]))


def bench_box_cost(n_nuclei=25, n_large=10):
    """Issue 14: cost per accepted box (default zoom strategy incl. crop encodes) and per drag preview,
    small boxes (neighbouring nuclei, in the order an annotator goes) vs large boxes, on the nuclei sample."""
    from napari_medsam import MedSAM
    from napari_medsam.engine.io import read_image
    from napari_medsam.engine.zoom import crop_windows, segment_box
    from run import authors_decode, authors_encode

    model = MedSAM.load("litemedsam", device="cpu")
    exact = MedSAM.load("litemedsam", device="cpu", exact=True)
    img = read_image(SAMPLES / "dsb2018_nuclei.png").array
    rgb = model.prepare(img)
    emb = model.embed_rgb(rgb)
    a_emb, new_hw = authors_encode(exact.module, rgb)
    small = _neighbour_nuclei(n_nuclei)
    rng = np.random.default_rng(1)
    large = []
    for _ in range(n_large):
        x0, y0 = (int(v) for v in rng.integers(0, 250, 2))
        s = int(rng.integers(180, 260))
        large.append((x0, y0, min(511, x0 + s), min(511, y0 + s)))
    out = {}
    rows = []
    for label, boxes in (("small (nuclei, ~15-35 px)", small), ("large (180-260 px)", large)):
        acc, prev, theirs, encodes, crops = [], [], [], [], []
        for b in boxes:
            t = time.perf_counter()
            model.predict(emb, b)
            prev.append(time.perf_counter() - t)
            t = time.perf_counter()
            _, info = segment_box(model, rgb, b, full_embedding=emb)
            acc.append(time.perf_counter() - t)
            encodes.append(info.encodes)
            crops.append(len(info.crops) if info.path != "full" else 0)
            t = time.perf_counter()
            authors_decode(exact.module, a_emb, b, rgb.shape[:2], new_hw)
            theirs.append(time.perf_counter() - t)
        a = _ms(theirs)
        rows.append((f"accepted box, default (zoom), {label}", len(boxes), *_ms(acc), *a))
        rows.append((f"drag preview (full view), {label}", len(boxes), *_ms(prev), *a))
        distinct = {w for b in boxes for w in crop_windows(b, rgb.shape[:2])} if sum(crops) else set()
        out[label] = {
            "boxes": len(boxes),
            "crops_used": int(sum(crops)),
            "crop_encodes": int(sum(encodes)),
            "shared_hits": int(sum(crops) - sum(encodes)),
            "distinct_crops": len(distinct),
            "encodes_per_box": float(np.mean(encodes)),
        }
    return rows, out
