"""Better masks than the authors' with the same weights: measure, cross-validate, report.

    python benchmarks/better_masks.py collect [DATA_DIR]   # encode/decode every candidate view (cached)
    python benchmarks/better_masks.py analyze [DATA_DIR]   # rules, leave-one-dataset-out CV, tables

``collect`` runs, for every 2D row of ``cases.csv`` (tight boxes) and ``cases_jitter.csv``
(loose boxes): the authors' path (exact model, full view), the default encoder on the full
view, and the box decoded in zoomed crops of several sizes (:mod:`napari_medsam.engine.zoom`
geometry), each also with the box scaled by 0.9 and 1.1 (a box-jitter ensemble). Embeddings
are cached on disk (``$H8CACHE``, default a folder under the system temp dir) and the
decoded views in ``views.pkl`` there, so trying a new rule costs no model time.

``analyze`` scores candidate rules, chooses their thresholds by leave-one-dataset-out
cross-validation (datasets = the ``dataset`` column) and prints the held-out folds per
modality: authors (exact) vs the rule, tight and loose.
"""

from __future__ import annotations

import inspect
import os
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from napari_medsam import MedSAM
from napari_medsam.engine import zoom
from napari_medsam.engine.cache import EmbeddingCache
from napari_medsam.engine.evaluation import dice, load_cases
from napari_medsam.engine.io import read_image

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("H8CACHE", Path(tempfile.gettempdir()) / "h8cache"))
# candidate crops: (context, min_crop); the ladder makes many coincide, each distinct crop is encoded once
CROPS = [(1.5, 64), (2.0, 64), (3.0, 64), (4.0, 64), (2.0, 128), (3.0, 128), (2.0, 256)]
if os.environ.get("H8CROPS") == "shipped":  # only the default's three crops (a third of the encodes)
    CROPS = CROPS[:3]
SCALES = (0.9, 1.1)


def load_model(exact: bool, cache_dir: Path) -> MedSAM:
    cache = EmbeddingCache(max_bytes=256 << 20, disk_dir=cache_dir, disk_max_bytes=16 << 30)
    params = inspect.signature(MedSAM.load).parameters
    if "exact" in params:
        return MedSAM.load("litemedsam", device="cpu", cache=cache, exact=exact)
    return MedSAM.load("litemedsam", device="cpu", cache=cache, fast=None if exact else True)


def scaled(box, s):
    x0, y0, x1, y1 = box
    cx, cy, hw, hh = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2 * s, (y1 - y0) / 2 * s
    return (cx - hw, cy - hh, cx + hw, cy + hh)


def pack(m):
    return np.packbits(m.ravel()), m.shape


def unpack(p):
    bits, shape = p
    return np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(bool)


def views_for(exact_m, fast_m, rgb, box):
    shape = rgb.shape[:2]
    out = {}
    emb = exact_m.embed_rgb(rgb)
    p = exact_m.predict(emb, box)
    out["exact"] = {"mask": pack(p.masks[0]), "iou": float(p.iou[0]), "window": (0, shape[0], 0, shape[1])}
    emb = fast_m.embed_rgb(rgb)
    for tag, b in [("", box)] + [(f"@{s}", scaled(box, s)) for s in SCALES]:
        p = fast_m.predict(emb, b)
        out["full" + tag] = {"mask": pack(p.masks[0]), "iou": float(p.iou[0]), "window": (0, shape[0], 0, shape[1])}
    done = {}
    for ctx, mn in CROPS:
        win = zoom.crop_window(box, shape, zoom.ZoomSettings(min_crop=mn), ctx)
        if win not in done:
            emb_c, _ = zoom.encode_window(fast_m, rgb, win)
            rec = {"window": win, "z": zoom.zoom_factor(win, shape)}
            for tag, b in [("", box)] + [(f"@{s}", scaled(box, s)) for s in SCALES]:
                m, iou = zoom.decode_window(fast_m, emb_c, win, b)
                rec["mask" + tag], rec["iou" + tag] = pack(m), iou
                rec["edge" + tag] = zoom.touches_crop_edge(m, win, shape)
            done[win] = rec
        out[f"zoom{ctx}/{mn}"] = done[win]
    return out


def collect(data: Path):
    CACHE.mkdir(parents=True, exist_ok=True)
    # several processes may share the work: H8KINDS (tight / loose), H8DATASETS (these, or "-" + those
    # left out), each writing its own H8STORE; every views*.pkl counts as done and analyze merges them
    kinds = os.environ.get("H8KINDS", "tight,loose").split(",")
    sel = os.environ.get("H8DATASETS", "")
    only = set(sel.lstrip("-").split(",")) if sel else set()
    store = CACHE / os.environ.get("H8STORE", "views.pkl")
    res = pickle.loads(store.read_bytes()) if store.exists() else {}
    done = set(res) | {k for f in CACHE.glob("views*.pkl") if f != store for k in pickle.loads(f.read_bytes())}
    exact_m = load_model(True, CACHE / "exact")
    fast_m = load_model(False, CACHE / "fast")
    t0 = time.time()
    for kind, fname in (("tight", "cases.csv"), ("loose", "cases_jitter.csv")):
        if kind not in kinds:
            continue
        cases = load_cases(data, dims=2, cases_file=fname)
        imgs = {}
        for i, c in enumerate(cases):
            key = (kind, c.case.replace("~jitter", ""))
            ds = c.image.relative_to(data).parts[0]
            if key in done or (only and (ds in only) == sel.startswith("-")):
                continue
            if c.image not in imgs:
                imgs = {c.image: exact_m.prepare(read_image(c.image).array)}
            rgb = imgs[c.image]
            gt = c.ground_truth()
            rec = {
                "modality": c.modality,
                "dataset": c.image.relative_to(data).parts[0],
                "box": c.box,
                "shape": rgb.shape[:2],
                "gt": pack(gt),
                "views": views_for(exact_m, fast_m, rgb, c.box),
            }
            if kind == "tight":
                ref = np.load(data / "reference" / f"2D_{c.name}.npz")["segs"] > 0
                rec["ref"] = pack(ref)
            res[key] = rec
            done.add(key)
            if i % 10 == 0:
                store.write_bytes(pickle.dumps(res))
                print(f"{kind} {i}/{len(cases)} {time.time() - t0:.0f}s", flush=True)
    store.write_bytes(pickle.dumps(res))
    print("done", len(res), f"{time.time() - t0:.0f}s")


# ---------------------------------------------------------------- analysis
VARIANTS = ("plain", "vote", "fill", "vote+fill")
THREE = ("zoom1.5/64", "zoom2.0/64", "zoom3.0/64")  # the default's crops (zoom.DEFAULT.contexts)
_F = [
    ("zoom2.0/64",),
    ("zoom1.5/64",),
    ("zoom3.0/64",),
    ("zoom2.0/128",),
    THREE,
    ("zoom1.5/64", "zoom3.0/64"),
    ("zoom2.0/64", "zoom3.0/64"),
    ("zoom2.0/64", "zoom4.0/64"),
    ("zoom2.0/64", "zoom2.0/128"),
    ("zoom2.0/128", "zoom2.0/256"),
]
_F = [f for f in _F if all(v in {f"zoom{c}/{m}" for c, m in CROPS} for v in f)]
# (crop views, with the full view, lenient: a tie counts as object)
FUSIONS = [(v, True, lenient) for v in _F for lenient in (False, True)] + [(THREE, False, False)]


def _variants(rec, view, shape):
    """Dice vs GT of one view: as is, majority of the 3 box scales, holes filled, both."""
    from scipy import ndimage

    win = view["window"]
    gt = unpack(rec["gt"])
    ms = [unpack(view["mask"])] + [unpack(view[f"mask@{s}"]) for s in SCALES if f"mask@{s}" in view]
    vote = np.sum(ms, axis=0) >= 2 if len(ms) == 3 else ms[0]
    out = []
    for m in (ms[0], vote, ndimage.binary_fill_holes(ms[0]), ndimage.binary_fill_holes(vote)):
        out.append(dice(zoom.paste(m, win, shape) if m.shape != tuple(shape) else m, gt))
    return out, zoom.paste(ms[0], win, shape) if ms[0].shape != tuple(shape) else ms[0]


def tabulate(res):
    """Per record: dice of every view x variant, and the rule features (cached)."""
    store = CACHE / "table.pkl"
    if store.exists() and all(store.stat().st_mtime > f.stat().st_mtime for f in CACHE.glob("views*.pkl")):
        return pickle.loads(store.read_bytes())
    zviews = [f"zoom{c}/{m}" for c, m in CROPS]
    keys = sorted(res)
    n, nv = len(keys), len(zviews)
    T = {
        "keys": keys,
        "zviews": zviews,
        "dice": np.zeros((n, nv, 4)),
        "iou": np.zeros((n, nv)),
        "z": np.zeros((n, nv)),
        "edge": np.zeros((n, nv), bool),
        "agree": np.zeros((n, nv)),
        "full": np.zeros((n, 4)),
        "iou_full": np.zeros(n),
        "exact": np.zeros(n),
        "ref": np.full(n, np.nan),
        "fuse": np.zeros((n, len(FUSIONS), 2)),
        "fuse_distinct": np.zeros((n, 2)),
        "side256": np.zeros(n),
        "windows": [],
        "kind": [k[0] for k in keys],
        "dataset": [res[k]["dataset"] for k in keys],
        "modality": [res[k]["modality"] for k in keys],
    }
    for i, k in enumerate(keys):
        rec = res[k]
        shape = tuple(rec["shape"])
        gt = unpack(rec["gt"])
        T["exact"][i] = dice(unpack(rec["views"]["exact"]["mask"]), gt)
        if "ref" in rec:
            T["ref"][i] = dice(unpack(rec["ref"]), gt)
        full_view = rec["views"]["full"] | {f"mask@{s}": rec["views"][f"full@{s}"]["mask"] for s in SCALES}
        T["full"][i], full_m = _variants(rec, full_view, shape)
        T["iou_full"][i] = rec["views"]["full"]["iou"]
        x0, y0, x1, y1 = rec["box"]
        T["side256"][i] = max(x1 - x0 + 1, y1 - y0 + 1) * 256 / max(shape)
        zm = []
        for j, v in enumerate(zviews):
            view = rec["views"][v]
            T["dice"][i, j], m = _variants(rec, view, shape)
            T["iou"][i, j], T["z"][i, j], T["edge"][i, j] = view["iou"], view["z"], view["edge"]
            T["agree"][i, j] = dice(m, full_m)
            zm.append(m)
        from scipy import ndimage

        # multi-crop fusion ("stability across crops"): pixel-wise majority of several views
        for f, (members, with_full, lenient) in enumerate(FUSIONS):
            ms = [zm[zviews.index(v)] for v in members] + ([full_m] if with_full else [])
            votes = np.sum(ms, axis=0) * 2
            fz = votes >= len(ms) if lenient else votes > len(ms)
            T["fuse"][i, f] = [dice(fz, gt), dice(ndimage.binary_fill_holes(fz), gt)]
        # the 3-crop vote with each distinct crop voting once (crops that snap to one square count once)
        wins = {}
        for v in THREE:
            wins.setdefault(tuple(rec["views"][v]["window"]), zm[zviews.index(v)])
        ms = [*wins.values(), full_m]
        fz = np.sum(ms, axis=0) * 2 >= len(ms)
        T["fuse_distinct"][i] = [dice(fz, gt), dice(ndimage.binary_fill_holes(fz), gt)]
        T["windows"].append({v: tuple(rec["views"][v]["window"]) for v in zviews})
    store.write_bytes(pickle.dumps(T))
    return T


def rule_grid(T):
    """Every candidate rule as (name, params, dice per record)."""
    out = []
    for x, xname in enumerate(VARIANTS):
        out.append(("full", {"variant": xname}, T["full"][:, x]))
    for f, (members, with_full, lenient) in enumerate(FUSIONS):
        for x, fill in enumerate((False, True)):
            for zmin in (1.0, 1.5, 2.0, 3.0, 4.0):
                j = T["zviews"].index(members[0])
                sel = T["z"][:, j] >= zmin
                d = np.where(sel, T["fuse"][:, f, x], T["full"][:, 2 * x])
                params = {"views": members, "with_full": with_full, "lenient": lenient, "fill": fill, "min_zoom": zmin}
                out.append(("fuse", params, d))
    out += gated_rules(T)
    for j, v in enumerate(T["zviews"]):
        for x, xname in enumerate(VARIANTS):
            for zmin in (1.0, 1.25, 1.5, 2.0, 3.0, 4.0):
                for border in (False, True):
                    for delta in (None, 0.0, 0.05, 0.1):
                        sel = T["z"][:, j] >= zmin
                        if border:
                            sel &= ~T["edge"][:, j]
                        if delta is not None:
                            sel &= ~(T["iou_full"] - T["iou"][:, j] > delta)
                        d = np.where(sel, T["dice"][:, j, x], T["full"][:, x])
                        out.append(
                            (
                                "zoom",
                                {"view": v, "variant": xname, "min_zoom": zmin, "border": border, "iou_delta": delta},
                                d,
                            )
                        )
    return out


GATE_IOU = (None, 0.86, 0.88, 0.9, 0.92, 0.94)
GATE_DELTA = (None, 0.0, 0.02, 0.05)


def gated_rules(T):
    """The 3-crop vote (with the full view, lenient, filled), but the full view alone is
    answered when its predicted IoU is at least ``full_iou`` and beats the crops' mean
    predicted IoU by ``iou_delta`` (a confident full view of a clear object: fundus discs).
    ``votes``: ``context`` = one vote per context (crops that snap to one square vote as
    often as they were wanted), ``distinct`` = one vote per distinct crop."""
    members = THREE
    f = FUSIONS.index((members, True, True))
    js = [T["zviews"].index(v) for v in members]
    crop_iou = T["iou"][:, js].mean(axis=1)
    out = []
    for votes, fused in (("context", T["fuse"][:, f, 1]), ("distinct", T["fuse_distinct"][:, 1])):
        for zmin in (1.5, 2.0, 3.0, 4.0):
            zoomed = T["z"][:, js[0]] >= zmin
            for t in GATE_IOU:
                for delta in GATE_DELTA:
                    if t is None and delta is None and votes == "context":
                        continue  # = the plain "fuse" rule
                    keep = (
                        np.zeros(len(crop_iou), bool) if t is None and delta is None else np.ones(len(crop_iou), bool)
                    )
                    if t is not None:
                        keep &= T["iou_full"] >= t
                    if delta is not None:
                        keep &= T["iou_full"] - crop_iou >= delta
                    d = np.where(zoomed & ~keep, fused, T["full"][:, 2])
                    params = {"views": members, "with_full": True, "lenient": True, "fill": True, "min_zoom": zmin}
                    out.append(("gated", params | {"full_iou": t, "iou_delta": delta, "votes": votes}, d))
    return out


def objective(d, T, idx, penalty=2.0):
    """Mean over datasets of the gain vs the authors (tight and loose together), losses weighted up."""
    gains = []
    ds = np.array(T["dataset"])[idx]
    for name in sorted(set(ds)):
        m = idx[ds == name]
        gains.append(float(np.mean(d[m] - T["exact"][m])))
    g = np.array(gains)
    return float(g.mean() - penalty * np.clip(-g, 0, None).mean())


def encodes_per_box(T, params, images):
    """Crop encodes per box for a rule, crops shared within an image (the embedding cache)."""
    views = params.get("views") or ((params["view"],) if "view" in params else ())
    seen, n = set(), len(T["keys"])
    for i in range(n):
        j = T["zviews"].index(views[0]) if views else None
        if j is None or T["z"][i, j] < params.get("min_zoom", 1.0):
            continue
        for v in views:
            seen.add((T["kind"][i], images[T["keys"][i][1]], T["windows"][i][v]))
    return len(seen) / n


def cross_validate(T, rules):
    ds = np.array(T["dataset"])
    allidx = np.arange(len(ds))
    held = np.zeros(len(ds))
    chosen = {}
    for name in sorted(set(ds)):
        train, test = allidx[ds != name], allidx[ds == name]
        best = max(rules, key=lambda r: objective(r[2], T, train))
        held[test] = best[2][test]
        chosen[name] = (best[0], best[1])
    best_all = max(rules, key=lambda r: objective(r[2], T, allidx))
    return held, chosen, best_all


def analyze(data: Path):
    res = {}
    for f in sorted(CACHE.glob("views*.pkl")):  # collected by one or several processes
        res |= pickle.loads(f.read_bytes())
    T = tabulate(res)
    images = {c.case: str(c.image) for c in load_cases(data, dims=2)}
    rules = rule_grid(T)
    allidx = np.arange(len(T["keys"]))
    ranked = sorted(rules, key=lambda r: -objective(r[2], T, allidx))
    print("top rules on all data (objective, encodes/box):")
    for r in ranked[:12]:
        print(f"  {objective(r[2], T, allidx):.4f} {encodes_per_box(T, r[1], images):.2f} {r[0]} {r[1]}")
    out = {}
    for family, subset in (("any", rules), ("one-crop", [r for r in rules if len(r[1].get("views", (1,))) == 1])):
        print(f"\n=== CV over {family} rules ===")
        held, chosen, best_all = cross_validate(T, subset)
        report(T, held, chosen, best_all)
        print(f"encodes per box (all-data choice): {encodes_per_box(T, best_all[1], images):.2f}")
        out[family] = (held, chosen, best_all)
    print("\n=== fixed rules (no CV), all data ===")
    for label, pick in FIXED.items():
        hits = [r for r in rules if r[0] == pick[0] and all(r[1].get(k) == v for k, v in pick[1].items())]
        if hits:
            print(f"--- {label}: {hits[0][0]} {hits[0][1]}")
            report_fixed(T, hits[0][2])
    return T, out


# the shipped defaults before / after this round, looked up in the grid by their parameters
FIXED = {
    "min_zoom 3, no gate (previous default)": (
        "fuse",
        {"views": THREE, "lenient": True, "fill": True, "min_zoom": 3.0},
    ),
    "min_zoom 2, full_iou 0.9": ("gated", {"min_zoom": 2.0, "full_iou": 0.9, "iou_delta": None, "votes": "context"}),
    "min_zoom 3, full_iou 0.9": ("gated", {"min_zoom": 3.0, "full_iou": 0.9, "iou_delta": None, "votes": "context"}),
    "min_zoom 3, distinct votes": (
        "gated",
        {"min_zoom": 3.0, "full_iou": None, "iou_delta": None, "votes": "distinct"},
    ),
}


def report_fixed(T, d):
    mods, kinds = np.array(T["modality"]), np.array(T["kind"])
    for mod in sorted(set(mods)) + ["all"]:
        row = []
        for kind in ("tight", "loose"):
            m = (kinds == kind) & ((mods == mod) if mod != "all" else True)
            row += [T["exact"][m].mean(), d[m].mean()]
        print(f"  {mod:14s} tight {row[0]:.3f} -> {row[1]:.3f}   loose {row[2]:.3f} -> {row[3]:.3f}")


def report(T, held, chosen, best_all):
    mods = np.array(T["modality"])
    kinds = np.array(T["kind"])
    print("per-fold choices:")
    for k, v in chosen.items():
        print(f"  held out {k}: {v}")
    print("chosen on all data:", best_all[0], best_all[1])
    print(
        f"{'modality':14s} {'n':>3s} {'tight auth':>10s} {'tight CV':>9s} {'loose auth':>10s} {'loose CV':>9s} {'loose all-data':>14s}"
    )
    for mod in sorted(set(mods)) + ["all"]:
        row = []
        for kind in ("tight", "loose"):
            m = (kinds == kind) & ((mods == mod) if mod != "all" else True)
            row.append((int(m.sum()), T["exact"][m].mean(), held[m].mean(), best_all[2][m].mean()))
        (n, ta, tc, tb), (_, la, lc, lb) = row
        print(f"{mod:14s} {n:3d} {ta:10.3f} {tc:9.3f} {la:10.3f} {lc:9.3f} {lb:14.3f}")


def run_default(data: Path, settings: zoom.ZoomSettings = zoom.DEFAULT, tag: str = ""):
    """The implemented default (engine/zoom.py) end to end on every case: Dice, crops, time.

    Cases run in file order, one image's boxes after another, as an annotator would; the
    record of crops already encoded (crop sharing) starts empty for the tight and for the
    loose boxes. Crop encodes per box = distinct crops per image / boxes (the embedding
    cache holds each crop once; the run itself reads them from the disk cache)."""
    fast_m = load_model(False, CACHE / "fast")
    exact_m = load_model(True, CACHE / "exact")
    rows = []
    for kind, fname in (("tight", "cases.csv"), ("loose", "cases_jitter.csv")):
        fast_m._zoom_windows = None  # type: ignore[attr-defined]
        rgb, full, img = None, None, None
        for c in load_cases(data, dims=2, cases_file=fname):
            if c.image != img:
                img, rgb = c.image, exact_m.prepare(read_image(c.image).array)
                full = fast_m.embed_rgb(rgb)
            gt = c.ground_truth()
            t0 = time.perf_counter()
            mask, info = zoom.segment_box(fast_m, rgb, c.box, full_embedding=full, settings=settings)
            dt = time.perf_counter() - t0
            ex = exact_m.predict(exact_m.embed_rgb(rgb), c.box).masks[0]
            ds = c.image.relative_to(data).parts[0]
            rows.append(
                (kind, c.modality, ds, dice(ex, gt), dice(mask, gt), info.path, dt, c.case, info.crops, str(c.image))
            )
    (CACHE / f"default_rows{tag}.pkl").write_bytes(pickle.dumps(rows))
    print(f"{settings}")
    print(f"{'modality':14s} {'n':>3s} {'tight auth':>10s} {'tight ours':>10s} {'loose auth':>10s} {'loose ours':>10s}")
    mods = sorted({r[1] for r in rows})
    for mod in mods + ["all"]:
        vals = []
        for kind in ("tight", "loose"):
            sel = [r for r in rows if r[0] == kind and (mod == "all" or r[1] == mod)]
            vals += [len(sel), np.mean([r[3] for r in sel]), np.mean([r[4] for r in sel])]
        print(f"{mod:14s} {vals[0]:3d} {vals[1]:10.3f} {vals[2]:10.3f} {vals[4]:10.3f} {vals[5]:10.3f}")
    print(f"{'dataset':28s} {'kind':5s} {'boxes':>5s} {'zoomed':>6s} {'crops':>5s} {'per box':>7s}")
    for kind in ("tight", "loose"):
        for ds in sorted({r[2] for r in rows}):
            sel = [r for r in rows if r[0] == kind and r[2] == ds]
            crops = {(r[9], w) for r in sel for w in r[8]}
            zoomed = sum(r[5] != "full" for r in sel)
            print(f"{ds:28s} {kind:5s} {len(sel):5d} {zoomed:6d} {len(crops):5d} {len(crops) / len(sel):7.2f}")
    return rows


def session_cost(n=25):
    """Crop encodes per accepted box in an annotator's session: the ``n`` labelled nuclei nearest the
    centre of the bundled nuclei sample, accepted in reading order (benchmarks/latency.py's boxes),
    with and without crop sharing; Dice vs the sample's labels. Encodes = distinct crops the session
    used (what a fresh cache pays); crops are encoded once for all variants."""
    import dataclasses

    from latency import SAMPLES, _neighbour_nuclei

    model = MedSAM.load("litemedsam", device="cpu", cache=EmbeddingCache(max_bytes=2 << 30))
    img = read_image(SAMPLES / "dsb2018_nuclei.png").array
    lab = read_image(SAMPLES / "dsb2018_nuclei_labels.png").array
    lab = lab if lab.ndim == 2 else lab[..., 0]
    rgb = model.prepare(img)
    full = model.embed_rgb(rgb)
    boxes = _neighbour_nuclei(n)
    gts = []
    for x0, y0, x1, y1 in boxes:  # the nucleus a box was made from: the commonest label inside it
        inside = lab[y0 : y1 + 1, x0 : x1 + 1].ravel()
        gts.append(lab == np.bincount(inside[inside > 0]).argmax())
    variants = {}
    for gate in dict.fromkeys((zoom.DEFAULT.full_iou, 0.88, 0.9, None)):
        for share in (True, False):
            st = dataclasses.replace(zoom.DEFAULT, full_iou=gate, share=share)
            variants[
                f"full_iou {gate}, {'crops shared' if share else 'no sharing'}"
                + (" (default)" if st == zoom.DEFAULT else "")
            ] = st
    print("| settings | boxes | zoomed | crops used | distinct crops (encodes) | encodes per box | Dice vs labels |")
    print("|---|---|---|---|---|---|---|")
    for label, st in variants.items():
        model._zoom_windows = None  # type: ignore[attr-defined]
        used, distinct, zoomed, ds = 0, set(), 0, []
        for b, gt in zip(boxes, gts, strict=True):
            mask, info = zoom.segment_box(model, rgb, b, full_embedding=full, settings=st)
            used += len(info.crops)
            distinct |= set(info.crops)
            zoomed += info.path != "full"
            ds.append(dice(mask, gt))
        print(
            f"| {label} | {len(boxes)} | {zoomed} | {used} | {len(distinct)} | {len(distinct) / len(boxes):.2f} | {np.mean(ds):.3f} |"
        )
    print(
        f"| full view alone | {len(boxes)} | 0 | 0 | 0 | 0.00 | {np.mean([dice(model.predict(full, b).masks[0], gt) for b, gt in zip(boxes, gts, strict=True)]):.3f} |"
    )


def _outline(m):
    from scipy import ndimage

    return m & ~ndimage.binary_erosion(m)


def panels(data: Path, cases: list, out_dir: Path = ROOT / "docs" / "images"):
    """PNG per case: image crop | ground truth (green) | authors (red) | default (blue)."""
    from PIL import Image

    fast_m = load_model(False, CACHE / "fast")
    exact_m = load_model(True, CACHE / "exact")
    allc = {c.case: c for f in ("cases.csv", "cases_jitter.csv") for c in load_cases(data, dims=2, cases_file=f)}
    for name in cases:
        c = allc[name]
        rgb = exact_m.prepare(read_image(c.image).array)
        gt = c.ground_truth()
        ex = exact_m.predict(exact_m.embed_rgb(rgb), c.box).masks[0]
        ours, _ = zoom.segment_box(fast_m, rgb, c.box, full_embedding=fast_m.embed_rgb(rgb))
        y0, y1, x0, x1 = zoom.crop_window(c.box, rgb.shape[:2], zoom.DEFAULT, 3.0)
        tiles = []
        for m, col in ((None, None), (gt, (0, 255, 0)), (ex, (255, 0, 0)), (ours, (0, 128, 255))):
            t = rgb[y0:y1, x0:x1].copy()
            if m is not None:
                t[_outline(m[y0:y1, x0:x1])] = col
                bx0, by0, bx1, by1 = (int(v) for v in c.box)
                for yy in (by0 - y0, by1 - y0):
                    t[max(0, min(yy, y1 - y0 - 1)), max(0, bx0 - x0) : bx1 - x0 + 1] = (255, 255, 0)
            tiles.append(np.asarray(Image.fromarray(t).resize((256, 256), Image.NEAREST)))
        img = np.concatenate([np.concatenate([t, np.full((256, 4, 3), 255, np.uint8)], 1) for t in tiles], 1)
        path = out_dir / f"accuracy_{evaluation_safe(name)}.png"
        Image.fromarray(img).save(path)
        print(path.name, f"authors {dice(ex, gt):.3f} default {dice(ours, gt):.3f}")


def evaluation_safe(name: str) -> str:
    from napari_medsam.engine.evaluation import safe_name

    return safe_name(name.split("/")[-1])


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else "analyze"
    data = Path(sys.argv[2]) if len(sys.argv) > 2 else ROOT.parent / "shared" / "data"
    if cmd == "collect":
        collect(data)
    elif cmd == "default":  # default [DATA] [field=value ...], e.g. share=False full_iou=None min_zoom=3.0
        kw = {k: eval(v) for k, v in (a.split("=", 1) for a in sys.argv[3:])}
        run_default(data, zoom.ZoomSettings(**kw), "".join(f"_{k}{v}" for k, v in kw.items()))
    elif cmd == "cost":
        session_cost()
    elif cmd == "panels":
        panels(data, sys.argv[3:])
    else:
        analyze(data)


if __name__ == "__main__":
    main()
