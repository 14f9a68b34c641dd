"""Leave-one-dataset-out choice of the 3D stop rule, reported on the held-out folds.

Usage::

    PYTHONPATH=src python benchmarks/accuracy_3d_cv.py [--data DIR] [--work DIR]

For every 3D case of ``DATA/cases.csv`` one never-stop propagation over the whole
volume is run once and its per-slice trace (mask, decoder IoU, area, mean intensity
inside the mask) is stored under ``--work`` (default: a folder in the system temp dir),
together with the slice embeddings, so reruns cost no encoder time. Any stop rule, with
or without a z-range, is a truncation of that trace (``accuracy_3d.simulate``), so a
grid of rules is scored at no model cost. For each dataset, the rule with the best mean
Dice over the *other* datasets (each dataset weighted equally) is applied to the held-out
one; the table reports those held-out numbers next to the authors' recipe (given the
z-range) and the current default rule.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy_3d import MODALITY, default_data, simulate
from napari_medsam.engine.cache import EmbeddingCache
from napari_medsam.engine.cases import load_cases
from napari_medsam.engine.io import read_image
from napari_medsam.engine.metrics import dice
from napari_medsam.engine.predictor import MedSAM
from napari_medsam.engine.volume import DEFAULT_STOP, StopRule, propagate, volume_to_uint8


def traces(data: Path, work: Path):
    """{case: (dataset, trace mask, records, gt, key, z_range, authors' Dice)}, cached under ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    model = None
    out = {}
    for c in load_cases(data, dims=3):
        f = work / (c.case.replace("/", "__") + ".npz")
        gt = c.ground_truth()
        if not f.is_file():
            if model is None:
                cache = EmbeddingCache(max_bytes=1 << 30, disk_dir=work / "embeddings", disk_max_bytes=20 << 30)
                model = MedSAM.load("litemedsam", device="cpu", cache=cache)
            mod, win = MODALITY[c.modality]
            u8, _, _ = volume_to_uint8(read_image(c.image).array, mod, win)
            t0 = time.perf_counter()
            tr = propagate(model, None, c.box, c.key_slice, stop=StopRule.never(), volume_u8=u8)
            recs = [
                {"z": s.z, "direction": s.direction, "prompt": s.prompt, "area": s.area, "iou": s.iou, "mean": s.mean}
                for s in tr.slices
            ]
            ref = np.load(data / "reference" / f"3D_{c.name}.npz")["segs"] > 0
            np.savez_compressed(f, mask=tr.mask, recs=json.dumps(recs), ref_dice=dice(ref, gt))
            print(f"traced {c.case} in {time.perf_counter() - t0:.0f} s", flush=True)
        z = np.load(f)
        dataset = c.case.split("/")[0] + (f"-{c.modality}" if "totalseg" in c.case else "")
        out[c.case] = (dataset, z["mask"], json.loads(str(z["recs"])), gt, c.key_slice, c.z_range, float(z["ref_dice"]))
    return out


def grid():
    rules = [DEFAULT_STOP, StopRule.never()]
    for ar, iou, shift, floor, keep in itertools.product(
        [0, 0.2, 0.4],
        [0, 0.5, 0.6, 0.7],
        [None, 0.25, 0.35, 0.5],
        [20, 30],
        [False, True],
    ):
        if shift is None and floor != 30:
            continue
        rules.append(
            StopRule(
                min_area_ratio=ar, min_iou=iou, max_intensity_shift=shift, intensity_shift_floor=floor, keep_last=keep
            )
        )
    return rules


def score(tr, rule, use_z: bool):
    return {
        case: dice(simulate(m, recs, key, rule, zr if use_z else None), gt)
        for case, (_, m, recs, gt, key, zr, _) in tr.items()
    }


def by_dataset(tr, d):
    groups = defaultdict(list)
    for case, v in d.items():
        groups[tr[case][0]].append(v)
    return {k: float(np.mean(v)) for k, v in groups.items()}


def describe(r: StopRule) -> str:
    if r == StopRule.never():
        return "never stop"
    return (
        f"area<{r.min_area_ratio} iou<{r.min_iou} shift>{r.max_intensity_shift} (floor {r.intensity_shift_floor})"
        f"{' keep-last' if r.keep_last else ''}"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "medsam-3d-cv")
    args = ap.parse_args(argv)
    tr = traces(args.data, args.work)
    rules = grid()
    print(f"{len(tr)} cases, {len(rules)} rules", flush=True)
    tables = {use_z: [by_dataset(tr, score(tr, r, use_z)) for r in rules] for use_z in (False, True)}
    datasets = sorted({v[0] for v in tr.values()})
    authors = by_dataset(tr, {c: v[6] for c, v in tr.items()})
    n = {ds: sum(v[0] == ds for v in tr.values()) for ds in datasets}
    print(
        "\n| held-out dataset | n | authors (z-range given) | default rule, one box | CV rule, one box | "
        "default rule + z-range | CV rule + z-range | rule chosen on the other datasets (one box) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    held = {False: [], True: []}
    for ds in datasets:
        row, chosen = [], None
        for use_z in (False, True):
            t = tables[use_z]
            train = [np.mean([s[o] for o in datasets if o != ds]) for s in t]
            best = int(np.argmax(train))
            held[use_z].append(t[best][ds])
            row += [t[0][ds], t[best][ds]]
            if not use_z:
                chosen = rules[best]
        print(
            f"| {ds} | {n[ds]} | {authors[ds]:.3f} | {row[0]:.3f} | {row[1]:.3f} | {row[2]:.3f} | {row[3]:.3f} | "
            f"{describe(chosen)} |"
        )
    mean = lambda xs: float(np.mean(xs))  # noqa: E731
    print(
        f"| mean over datasets | {len(tr)} | {mean(list(authors.values())):.3f} | "
        f"{mean([tables[False][0][d] for d in datasets]):.3f} | {mean(held[False]):.3f} | "
        f"{mean([tables[True][0][d] for d in datasets]):.3f} | {mean(held[True]):.3f} | |"
    )
    allfit = [np.mean([s[d] for d in datasets]) for s in tables[False]]
    best = int(np.argmax(allfit))
    print(f"\nrule fitted on all datasets (not a held-out number): {describe(rules[best])}: {allfit[best]:.3f}")


if __name__ == "__main__":
    main()
