"""Leave-one-dataset-out choice of the 3D stop rule, reported on the held-out folds.

Usage::

    PYTHONPATH=src python benchmarks/accuracy_3d_cv.py [--data DIR] [--work DIR]
        [--stardist-wheel stardist-*.whl] [--check] [--figures docs/images]

For every 3D case of ``DATA/cases.csv`` (and, with ``--stardist-wheel``, the largest nuclei
of the 3D test image inside stardist's wheel) two never-stop propagations over the whole
volume are run once: from the key-slice box (``one``) and from ground-truth boxes on the
slices at 1/4 and 3/4 of the object's extent (``two``). Their per-slice traces (mask,
decoder IoU, area, mean intensity inside the mask, inside-minus-ring contrast, and a
forward-backward IoU that costs one extra decode per slice) are stored under ``--work``
with the slice embeddings, so reruns cost no encoder time. Any stop rule, with or without
a z-range, is a truncation of a trace (:func:`kept_slices`), so a grid of rules is scored
at no model cost. For each dataset, the rule with the best mean Dice over the *other*
datasets (each dataset weighted equally) is applied to the held-out one, separately for
one box, one box + z-range and two boxes, once on the old signals and once with the new
ones. ``--check`` runs the default rule for real and compares with the simulation;
``--figures`` writes PNGs of the worst one-box cases.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
import zipfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scipy import ndimage

from accuracy_3d import MODALITY, default_data, simulate, slice_figure, worst_slices
from napari_medsam.engine.cache import EmbeddingCache
from napari_medsam.engine.cases import load_cases
from napari_medsam.engine.intensity import gray_to_rgb
from napari_medsam.engine.io import read_image
from napari_medsam.engine.labels import mask_box
from napari_medsam.engine.metrics import dice
from napari_medsam.engine.predictor import MedSAM
from napari_medsam.engine.volume import DEFAULT_STOP, StopRule, chained_box, propagate, volume_to_uint8


def _ring_contrast(u8z: np.ndarray, m: np.ndarray, width: int = 3) -> float:
    """Mean 8-bit intensity inside ``m`` minus the mean in a ``width``-pixel ring around it (0 when empty)."""
    if not m.any():
        return 0.0
    ring = ndimage.binary_dilation(m, iterations=width) & ~m
    return float(u8z[m].mean() - (u8z[ring].mean() if ring.any() else 0.0))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 1.0


def _signals(model, u8: np.ndarray, mask: np.ndarray, recs: list[dict]) -> None:
    """Add to each record what the propagation can measure beyond area / IoU / mean (in place).

    ``contrast``: inside-minus-ring intensity of the slice's mask. ``fb``: forward-backward
    consistency, the IoU between the previous slice's mask and the mask the model gives on
    the previous slice when prompted with the box chained from this slice's mask (one extra
    decode per slice).
    """
    shape = u8.shape[1:3]
    sx, sy = model.recipe.model_scale(shape)
    mxy = (model.recipe.chain_margin / sx, model.recipe.chain_margin / sy)
    for r in recs:
        z = r["z"]
        r["contrast"] = _ring_contrast(u8[z], mask[z])
        r["fb"] = 1.0
        if r["direction"] in ("up", "down"):
            prev = z - (1 if r["direction"] == "up" else -1)
            b = chained_box(mask[z], mxy)
            if b is not None:
                back = np.asarray(model.predict(model.embed_rgb(gray_to_rgb(u8[prev])), b).masks[0], bool)
                r["fb"] = _iou(back, mask[prev])
            else:
                r["fb"] = 0.0


def _two_boxes(gt: np.ndarray) -> dict[int, tuple[int, int, int, int]]:
    """Boxes from the ground truth on the slices at 1/4 and 3/4 of the object's z-extent."""
    zs = np.flatnonzero(gt.reshape(gt.shape[0], -1).any(axis=1))
    lo, hi = int(zs[0]), int(zs[-1])
    out = {}
    for f in (0.25, 0.75):
        z = lo + round(f * (hi - lo))
        while not gt[z].any():  # a gap in the object: the nearest slice that has it
            z += 1
        b = mask_box(gt[z])
        assert b is not None
        out[z] = b
    return out


def _record(tr) -> list[dict]:
    return [
        {
            "z": s.z,
            "direction": s.direction,
            "prompt": s.prompt,
            "box": s.box,
            "area": s.area,
            "iou": s.iou,
            "mean": s.mean,
        }
        for s in tr.slices
    ]


@dataclass
class WheelCase:
    """A 3D case from data shipped inside a registry package (same fields as ``engine.cases.Case``)."""

    case: str
    image: Path
    gt: np.ndarray
    box: tuple[int, int, int, int]
    key_slice: int
    z_range: tuple[int, int]
    modality: str = "fluorescence"
    name: str = ""

    def ground_truth(self) -> np.ndarray:
        return self.gt


def wheel_cases(wheel: Path, work: Path, n: int = 8) -> list[WheelCase]:
    """The ``n`` largest nuclei of stardist's bundled 3D test image (``stardist/data/images/img3d.tif``
    + ``mask3d.tif``, synthetic nuclei, BSD-3-Clause), read from the wheel file itself.

    Box and key slice as in the shared ``cases.csv``: the ground truth's box on the slice where
    the object is largest; z-range = the object's extent.
    """
    import tifffile

    folder = work / "stardist"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as zf:
        for part in ("img3d", "mask3d"):
            (folder / f"{part}.tif").write_bytes(zf.read(f"stardist/data/images/{part}.tif"))
    labels = tifffile.imread(folder / "mask3d.tif")
    ids, counts = np.unique(labels[labels > 0], return_counts=True)
    out = []
    for i in ids[np.argsort(-counts, kind="stable")][:n]:
        gt = labels == i
        areas = gt.reshape(gt.shape[0], -1).sum(axis=1)
        key = int(np.argmax(areas))
        zs = np.flatnonzero(areas)
        box = mask_box(gt[key])
        assert box is not None
        out.append(
            WheelCase(
                f"stardist_synthetic3d/img3d#label{i}", folder / "img3d.tif", gt, box, key, (int(zs[0]), int(zs[-1]))
            )
        )
    return out


def traces(data: Path, work: Path, wheel: Path | None = None):
    """{case: trace dict}, cached under ``work``.

    Each holds the dataset, the case's key slice and z-range, the ground truth, the authors'
    Dice, and two never-stop traces (mask + per-slice records): ``one`` from the key-slice
    box, ``two`` from ground-truth boxes on the slices at 1/4 and 3/4 of the object's extent.
    """
    work.mkdir(parents=True, exist_ok=True)
    model = None
    out = {}
    cases: list = list(load_cases(data, dims=3)) + (wheel_cases(wheel, work) if wheel else [])
    for c in cases:
        f = work / (c.case.replace("/", "__").replace("#", "_") + ".npz")
        gt = c.ground_truth()
        if not f.is_file():
            if model is None:
                cache = EmbeddingCache(max_bytes=1 << 30, disk_dir=work / "embeddings", disk_max_bytes=20 << 30)
                model = MedSAM.load("litemedsam", device="cpu", cache=cache)
            mod, win = MODALITY[c.modality]
            u8, _, _ = volume_to_uint8(read_image(c.image).array, mod, win)
            t0 = time.perf_counter()
            never = StopRule.never()
            one = propagate(model, None, c.box, c.key_slice, stop=never, volume_u8=u8)
            keys = _two_boxes(gt)
            two = propagate(model, None, None, None, key_boxes=keys, stop=never, volume_u8=u8)
            r1, r2 = _record(one), _record(two)
            _signals(model, u8, one.mask, r1)
            _signals(model, u8, two.mask, r2)
            ref_file = data / "reference" / f"3D_{c.name}.npz"
            if isinstance(c, WheelCase):  # no authors' masks: their recipe = never stop inside the z-range
                ref = simulate(one.mask, r1, c.key_slice, never, c.z_range)
            else:
                ref = np.load(ref_file)["segs"] > 0
            np.savez_compressed(
                f,
                one=one.mask,
                two=two.mask,
                recs=json.dumps({"one": r1, "two": r2, "keys": {str(k): v for k, v in keys.items()}}),
                ref_dice=dice(ref, gt),
            )
            print(f"traced {c.case} in {time.perf_counter() - t0:.0f} s", flush=True)
        z = np.load(f)
        rec = json.loads(str(z["recs"]))
        dataset = c.case.split("/")[0] + (f"-{c.modality}" if "totalseg" in c.case else "")
        out[c.case] = {
            "dataset": dataset,
            "gt": gt,
            "key": c.key_slice,
            "box": tuple(c.box),
            "z_range": c.z_range,
            "ref_dice": float(z["ref_dice"]),
            "one": (z["one"], rec["one"]),
            "two": (z["two"], rec["two"]),
            "keys": {int(k): tuple(v) for k, v in rec["keys"].items()},
            "image": c.image,
            "modality": c.modality,
        }
    return out


#: a rule = (StopRule, contrast loss, min forward-backward IoU); the last two are the new
#: signals (None / 0 = off). contrast loss X: stop when the inside-minus-ring contrast has
#: lost more than X of the reference slice's contrast.
Rule = tuple[StopRule, float | None, float]


def grid(new_signals: bool = True) -> list[Rule]:
    base: list[StopRule] = [DEFAULT_STOP, StopRule.never()]
    for ar, iou, shift, floor, keep in itertools.product(
        [0, 0.2, 0.4], [0, 0.5, 0.6, 0.7], [None, 0.25, 0.35, 0.5], [20, 30], [False, True]
    ):
        if shift is None and floor != 30:
            continue
        base.append(
            StopRule(
                min_area_ratio=ar, min_iou=iou, max_intensity_shift=shift, intensity_shift_floor=floor, keep_last=keep
            )
        )
    extras = itertools.product([None, 0.5, 0.75], [0.0, 0.5, 0.7]) if new_signals else [(None, 0.0)]
    return [(b, c, f) for c, f in extras for b in base]


def kept_slices(recs: list[dict], rule: Rule, z_range=None) -> list[int]:
    """The slices ``propagate`` keeps with ``rule`` (and ``z_range``), from a never-stop trace.

    Slices with a user box or an interpolated box always stay and become the intensity
    reference beyond them, as in ``propagate``; the StopRule part is ``StopRule.check``.
    """
    stop, closs, min_fb = rule
    key = next(r for r in recs if r["direction"] == "key")
    out = [key["z"]]
    for d in ("up", "down"):
        prev_area, ref, refc = key["area"], (key["mean"] if key["area"] else None), key["contrast"]
        for r in (r for r in recs if r["direction"] == d):
            if z_range is not None and not z_range[0] <= r["z"] <= z_range[1]:
                break
            if r["prompt"] in ("key", "interpolated"):
                out.append(r["z"])
                if r["area"]:
                    ref, refc = r["mean"], r["contrast"]
                prev_area = r["area"]
                continue
            if r["prompt"] == "fallback" and stop.stop_on_empty:
                break
            reason = stop.check(r["area"], prev_area, r["iou"], r["mean"], ref)
            if reason is None and r["area"]:
                if closs is not None and refc and np.sign(refc) * r["contrast"] < (1 - closs) * abs(refc):
                    reason = "contrast"
                elif min_fb and r["fb"] < min_fb:
                    reason = "fb"
            if reason is None or (stop.keep_last and reason != "empty"):
                out.append(r["z"])
            if reason is not None:
                break
            prev_area = r["area"]
    return out


def _counts(mask: np.ndarray, gt: np.ndarray):
    flat_m, flat_g = mask.reshape(mask.shape[0], -1), gt.reshape(gt.shape[0], -1)
    return (flat_m & flat_g).sum(axis=1), flat_m.sum(axis=1), int(flat_g.sum())


def score(tr, rule: Rule, mode: str) -> dict[str, float]:
    """{case: Dice vs GT} for mode ``one`` (one box), ``one_z`` (one box + z-range) or ``two`` (two boxes)."""
    out = {}
    for case, t in tr.items():
        inter, msum, gsum = t["counts"]["two" if mode == "two" else "one"]
        recs = t["two" if mode == "two" else "one"][1]
        zs = kept_slices(recs, rule, t["z_range"] if mode == "one_z" else None)
        den = msum[zs].sum() + gsum
        out[case] = float(2 * inter[zs].sum() / den) if den else 1.0
    return out


def by_dataset(tr, d):
    groups = defaultdict(list)
    for case, v in d.items():
        groups[tr[case]["dataset"]].append(v)
    return {k: float(np.mean(v)) for k, v in groups.items()}


def describe(rule: Rule) -> str:
    r, closs, fb = rule
    if r == StopRule.never() and closs is None and not fb:
        return "never stop"
    parts = []
    if r.min_area_ratio:
        parts.append(f"area < {r.min_area_ratio}")
    if r.min_iou:
        parts.append(f"IoU < {r.min_iou}")
    if r.max_intensity_shift is not None:
        parts.append(f"shift > {r.max_intensity_shift} (floor {r.intensity_shift_floor:g})")
    if closs is not None:
        parts.append(f"contrast loss > {closs}")
    if fb:
        parts.append(f"fwd-bwd IoU < {fb}")
    return (", ".join(parts) or "empty only") + (", keep last" if r.keep_last else "")


def rule_mask(t: dict, rule: Rule, mode: str) -> np.ndarray:
    trace = t["two" if mode == "two" else "one"]
    out = np.zeros_like(trace[0])
    zs = kept_slices(trace[1], rule, t["z_range"] if mode == "one_z" else None)
    out[zs] = trace[0][zs]
    return out


def check_real_runs(tr, work: Path) -> None:
    """The default rule run for real (one box, one box + z-range, two boxes; decoder cost only,
    the embeddings are on disk) must give the masks the trace simulation gives."""
    cache = EmbeddingCache(max_bytes=1 << 30, disk_dir=work / "embeddings", disk_max_bytes=20 << 30)
    model = MedSAM.load("litemedsam", device="cpu", cache=cache)
    bad = []
    for c, t in tr.items():
        mod, win = MODALITY[t["modality"]]
        u8, _, _ = volume_to_uint8(read_image(t["image"]).array, mod, win)
        one = t["box"]
        runs = {
            "one": propagate(model, None, one, t["key"], volume_u8=u8).mask,
            "one_z": propagate(model, None, one, t["key"], volume_u8=u8, z_range=t["z_range"]).mask,
            "two": propagate(model, None, None, None, key_boxes=t["keys"], volume_u8=u8).mask,
        }
        for m, real in runs.items():
            differ = int((real != rule_mask(t, (DEFAULT_STOP, None, 0.0), m)).sum())
            if differ:
                bad.append((c, m, f"{differ} voxels"))
    print("real runs = simulation" if not bad else f"WARNING: simulation differs from the real run: {bad}")


def _extent(m: np.ndarray) -> tuple[int, int]:
    zs = np.flatnonzero(m.reshape(m.shape[0], -1).any(axis=1))
    return (int(zs[0]), int(zs[-1])) if zs.size else (-1, -1)


def failure_figures(tr, per_case, folder: Path, n: int = 4) -> None:
    """PNGs of the ``n`` cases where one box (default rule) falls furthest below the authors or
    below our own z-range run, on the slices with the most wrong voxels."""
    loss = {c: max(t["ref_dice"], per_case["one_z"][c]) - per_case["one"][c] for c, t in tr.items()}
    picked = sorted(loss, key=lambda c: -loss[c])[:n]
    # plus the worst case of each kind of z error, if not among them: ran past the object, stopped early
    masks = {c: rule_mask(t, (DEFAULT_STOP, None, 0.0), "one") for c, t in tr.items()}
    for past in (True, False):
        kind = []
        for c, t in tr.items():
            (a, b), (lo, hi) = _extent(masks[c]), _extent(t["gt"])
            if (past and (a < lo or b > hi)) or (not past and a >= 0 and (a > lo or b < hi)):
                kind.append(c)
        picked += [c for c in sorted(kind, key=lambda c: -loss[c]) if c not in picked][
            : max(0, 2 - len(set(kind) & set(picked)))
        ]
    for c in picked:
        t = tr[c]
        mask = masks[c]
        mod, win = MODALITY[t["modality"]]
        u8, _, _ = volume_to_uint8(read_image(t["image"]).array, mod, win)
        zs = worst_slices(mask, t["gt"])
        ours, gt_z = _extent(mask), _extent(t["gt"])
        outside = [z for z in range(mask.shape[0]) if mask[z].any() and not gt_z[0] <= z <= gt_z[1]]
        if outside and not set(outside) & set(zs):  # show one slice past the object too
            zs = sorted(zs[:3] + [max(outside, key=lambda z: int(mask[z].sum()))])
        name = c.split("/")[0].split("_")[0] + "_" + c.split("#")[-1] + "_" + Path(t["image"]).name.split(".")[0]
        title = (
            f"{c.split('/')[0]} {c.split('#')[-1]}: one box {per_case['one'][c]:.2f}, "
            f"z-range {per_case['one_z'][c]:.2f}, authors {t['ref_dice']:.2f}\nkey z={t['key']}, "
            f"ours z {ours[0]}-{ours[1]}, gt z {gt_z[0]}-{gt_z[1]}"
        )
        slice_figure(folder / f"3d_fail_{name}.png", u8, t["gt"], mask, zs, title)
        print(f"figure {c}: slices {zs}, loss {loss[c]:.3f}, ours z {ours}, gt z {gt_z}")


MODES = ("one", "one_z", "two")


def cross_validate(tr, rules: list[Rule]):
    """Per mode: {held-out dataset: (held-out Dice, rule chosen on the others)}, and the default's Dice."""
    datasets = sorted({v["dataset"] for v in tr.values()})
    res, default, per_mode = {}, {}, {}
    for mode in MODES:
        tables = per_mode[mode] = [by_dataset(tr, score(tr, r, mode)) for r in rules]
        res[mode] = {}
        for ds in datasets:
            train = [np.mean([t[o] for o in datasets if o != ds]) for t in tables]
            best = int(np.argmax(train))
            res[mode][ds] = (tables[best][ds], rules[best])
        default[mode] = tables[0]
        allfit = [np.mean([t[d] for d in datasets]) for t in tables]
        b = int(np.argmax(allfit))
        res[mode]["_all"] = (float(allfit[b]), rules[b])
    # one rule for all three modes, as the engine has one DEFAULT_STOP for every front-end
    joint = [{d: float(np.mean([per_mode[m][i][d] for m in MODES])) for d in datasets} for i in range(len(rules))]
    res["joint"] = {}
    for ds in datasets:
        best = int(np.argmax([np.mean([t[o] for o in datasets if o != ds]) for t in joint]))
        res["joint"][ds] = ({m: per_mode[m][best][ds] for m in MODES}, rules[best])
    b = int(np.argmax([np.mean(list(t.values())) for t in joint]))
    res["joint"]["_all"] = ({m: float(np.mean(list(per_mode[m][b].values()))) for m in MODES}, rules[b])
    return datasets, res, default


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "medsam-3d-cv")
    ap.add_argument(
        "--stardist-wheel",
        type=Path,
        default=None,
        help="a stardist wheel: adds its bundled 3D nuclei (synthetic, BSD-3)",
    )
    ap.add_argument("--check", action="store_true", help="run the default rule for real and compare")
    ap.add_argument("--figures", type=Path, default=None, help="write failure-case PNGs into this folder")
    args = ap.parse_args(argv)
    tr = traces(args.data, args.work, args.stardist_wheel)
    for t in tr.values():
        t["counts"] = {k: _counts(t[k][0], t["gt"]) for k in ("one", "two")}
    datasets = sorted({v["dataset"] for v in tr.values()})
    n = {ds: sum(v["dataset"] == ds for v in tr.values()) for ds in datasets}
    authors = by_dataset(tr, {c: v["ref_dice"] for c, v in tr.items()})
    mean = lambda xs: float(np.mean(list(xs)))  # noqa: E731
    results = {}
    for label, new in (("area / IoU / intensity", False), ("+ contrast, forward-backward", True)):
        rules = grid(new)
        _, res, default = cross_validate(tr, rules)
        results[new] = res
        print(f"\n### grid: {label} ({len(rules)} rules), held-out Dice per dataset")
        print(
            "\n| held-out dataset | n | authors (z-range given) | one box | one box + z-range | two key-slice boxes | "
            "default: one box | default: + z-range | default: two boxes |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for ds in datasets:
            cells = " | ".join(f"{res[m][ds][0]:.3f}" for m in MODES)
            dcells = " | ".join(f"{default[m][ds]:.3f}" for m in MODES)
            print(f"| {ds} | {n[ds]} | {authors[ds]:.3f} | {cells} | {dcells} |")
        cells = " | ".join(f"**{mean(res[m][d][0] for d in datasets):.3f}**" for m in MODES)
        dcells = " | ".join(f"{mean(default[m][d] for d in datasets):.3f}" for m in MODES)
        print(f"| mean over datasets | {len(tr)} | {mean(authors.values()):.3f} | {cells} | {dcells} |")
        print("\n| held-out dataset | rule chosen on the others: one box | one box + z-range | two boxes |")
        print("|---|---|---|---|")
        for ds in datasets:
            print(f"| {ds} | " + " | ".join(describe(res[m][ds][1]) for m in MODES) + " |")
        for m in MODES:
            print(f"fitted on all datasets, {m} (in-sample): {describe(res[m]['_all'][1])}: {res[m]['_all'][0]:.3f}")
        print("\none rule for all three modes, chosen on the other datasets (mean of the modes):")
        print("\n| held-out dataset | one box | one box + z-range | two key-slice boxes | rule chosen |")
        print("|---|---|---|---|---|")
        for ds in datasets:
            d, r = res["joint"][ds]
            print(f"| {ds} | " + " | ".join(f"{d[m]:.3f}" for m in MODES) + f" | {describe(r)} |")
        cells = " | ".join(f"**{mean(res['joint'][d][0][m] for d in datasets):.3f}**" for m in MODES)
        print(f"| mean over datasets | {cells} | |")
        d, r = res["joint"]["_all"]
        print(f"fitted on all datasets (in-sample): {describe(r)}: " + " / ".join(f"{d[m]:.3f}" for m in MODES))
    per_case = {m: score(tr, (DEFAULT_STOP, None, 0.0), m) for m in MODES}
    print("\nper case, default rule: one box / one box + z-range / two boxes / authors")
    for c, t in tr.items():
        print(
            f"{c:72s} {per_case['one'][c]:.3f} {per_case['one_z'][c]:.3f} {per_case['two'][c]:.3f} "
            f"{t['ref_dice']:.3f} keys {sorted(t['keys'])}"
        )
    if args.check:
        check_real_runs(tr, args.work)
    if args.figures:
        failure_figures(tr, per_case, args.figures)


if __name__ == "__main__":
    main()
