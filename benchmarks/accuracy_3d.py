"""3D propagation accuracy on the shared 3D cases: ours vs the authors' reference masks.

Usage::

    PYTHONPATH=src python benchmarks/accuracy_3d.py [--data DIR] [--cache-dir DIR] [--tune] [--markdown]

For every 3D row of ``DATA/cases.csv`` it runs the propagation once with no stop
rule over the whole volume (``StopRule.never()``, start at the key slice) and keeps
the per-slice trace. Because a direction's masks only depend on the slices before
it, any stop rule or ``z_range`` is a truncation of that trace, so stop rules can be
compared (``--tune``) at decoder cost only. The default rule is then also run for
real through :func:`segment_volume` (with and without the case's ``z_range``) and
checked against the simulation. The authors' masks are read from
``DATA/reference/3D_<case>.npz``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from napari_medsam.engine.cache import EmbeddingCache
from napari_medsam.engine.cases import load_cases
from napari_medsam.engine.io import read_image
from napari_medsam.engine.metrics import dice
from napari_medsam.engine.predictor import MedSAM
from napari_medsam.engine.volume import DEFAULT_STOP, StopRule, propagate, volume_to_uint8

#: cases.csv modality -> (modality argument, window)
MODALITY = {"ct": ("ct", (40, 400)), "ct-windowed": ("uint8", None), "mr": ("mr", None), "fluorescence": ("mr", None)}
PSEUDO_GT = ("ct3d_mr3d_totalseg_examples", "microscopy3d_cells3d_nuclei_napari")


def default_data() -> Path:
    env = os.environ.get("MEDSAM_SHARED_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def simulate(trace_mask, records, key, rule: StopRule, z_range=None):
    """The mask ``propagate`` would give with ``rule`` (and ``z_range``), from a never-stop trace."""
    out = np.zeros_like(trace_mask)
    out[key] = trace_mask[key]
    key_rec = next(r for r in records if r["direction"] == "key")
    ref = key_rec["mean"] if key_rec["area"] else None
    for d in ("up", "down"):
        prev_area = key_rec["area"]
        for r in (r for r in records if r["direction"] == d):
            z = r["z"]
            if z_range is not None and not z_range[0] <= z <= z_range[1]:
                break
            if r["prompt"] == "fallback" and rule.stop_on_empty:
                break
            reason = rule.check(r["area"], prev_area, r["iou"], r["mean"], ref)
            if reason is None or (rule.keep_last and reason != "empty"):
                out[z] = trace_mask[z]
            if reason is not None:
                break
            prev_area = r["area"]
    return out


def worst_slices(mask: np.ndarray, gt: np.ndarray, n: int = 4) -> list[int]:
    """The ``n`` slices with the most wrong voxels (false positives + false negatives), in z order."""
    wrong = (mask ^ gt).reshape(mask.shape[0], -1).sum(axis=1)
    return sorted(int(z) for z in np.argsort(-wrong, kind="stable")[:n] if wrong[z])


def _edge(m: np.ndarray, width: int = 1) -> np.ndarray:
    from scipy import ndimage

    return m & ~ndimage.binary_erosion(m, iterations=width)


def _crop(gt: np.ndarray, mask: np.ndarray, zs: list[int], shape: tuple[int, int]) -> tuple[slice, slice]:
    """A square around the ground truth and our mask on slices ``zs`` (2.5 x their size, >= 48 px)."""
    both = (gt[zs] | mask[zs]).any(axis=0)
    if not both.any():
        return slice(0, shape[0]), slice(0, shape[1])
    rows, cols = np.flatnonzero(both.any(axis=1)), np.flatnonzero(both.any(axis=0))
    side = max(48, round(2.5 * max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1)))
    out = []
    for lo, hi, n in ((rows[0], rows[-1], shape[0]), (cols[0], cols[-1], shape[1])):
        s = min(side, n)
        a = min(max(0, (lo + hi) // 2 - s // 2), n - s)
        out.append(slice(int(a), int(a + s)))
    return out[0], out[1]


def slice_figure(path: Path, u8: np.ndarray, gt: np.ndarray, mask: np.ndarray, zs: list[int], title: str) -> None:
    """A small PNG: slices ``zs`` of the 8-bit volume side by side, cropped to a square around
    the object, ground-truth outline in green, our mask's outline in red (yellow where they
    coincide), 192 px high; ``title`` may hold line breaks."""
    from PIL import Image, ImageDraw

    size = 192
    rows, cols = _crop(gt, mask, zs, u8.shape[1:3])
    panels = []
    for z in zs:
        img = u8[z] if u8.ndim == 3 else u8[z].mean(axis=-1).astype(np.uint8)
        img, g, m = img[rows, cols], gt[z][rows, cols], mask[z][rows, cols]
        w = max(1, round(img.shape[1] * size / img.shape[0]))
        big = np.asarray(Image.fromarray(img).resize((w, size), Image.NEAREST))
        up = [
            np.asarray(Image.fromarray(a.astype(np.uint8) * 255).resize((w, size), Image.NEAREST)) > 0 for a in (g, m)
        ]
        eg, em = (_edge(a, 2) for a in up)
        rgb = np.repeat(big[..., None], 3, axis=-1).copy()
        rgb[eg] = (0, 255, 0)
        rgb[em] = (255, 0, 0)
        rgb[eg & em] = (255, 255, 0)
        canvas = Image.new("RGB", (max(w, 130), size + 14), (0, 0, 0))
        canvas.paste(Image.fromarray(rgb), (0, 14))
        ImageDraw.Draw(canvas).text((2, 1), f"z={z} gt {int(gt[z].sum())} ours {int(mask[z].sum())}", fill="white")
        panels.append(canvas)
    width = sum(p.width for p in panels) + 4 * (len(panels) - 1)
    lines = title.split("\n")
    top = 14 * len(lines)
    out = Image.new("RGB", (max(width, 300), size + 14 + top), (0, 0, 0))
    for i, line in enumerate(lines):
        ImageDraw.Draw(out).text((2, 1 + 14 * i), line, fill="white")
    x = 0
    for p in panels:
        out.paste(p, (x, top))
        x += p.width + 4
    path.parent.mkdir(parents=True, exist_ok=True)
    # a fixed palette (greys + the outline colours) keeps the file small and the outlines exact
    pal = Image.new("P", (1, 1))
    greys = [round(i * 255 / 63) for i in range(64)]
    pal.putpalette([v for g in greys for v in (g, g, g)] + [0, 255, 0, 255, 0, 0, 255, 255, 0, 255, 255, 255])
    out.quantize(palette=pal, dither=Image.Dither.NONE).save(path, optimize=True)


def per_modality(rows, key):
    groups = defaultdict(list)
    for r in rows:
        groups[r["modality"]].append(r[key])
    return {m: float(np.mean(v)) for m, v in sorted(groups.items())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=default_data())
    ap.add_argument("--cache-dir", type=Path, default=None, help="disk embedding cache (re-runs skip the encoder)")
    ap.add_argument("--tune", action="store_true", help="grid-search stop rules on the traces")
    ap.add_argument("--json", type=Path, default=None, help="write per-case results here")
    args = ap.parse_args(argv)

    if not (args.data / "cases.csv").is_file():
        sys.exit(f"no cases.csv in {args.data} (set --data or MEDSAM_SHARED_DATA)")
    cache = (
        EmbeddingCache(max_bytes=2 << 30, disk_dir=args.cache_dir)
        if args.cache_dir
        else EmbeddingCache(max_bytes=2 << 30)
    )
    model = MedSAM.load("litemedsam", device="cpu", cache=cache)
    cases = load_cases(args.data, dims=3)
    volumes = {}
    rows, traces = [], {}
    t_all = time.perf_counter()
    for c in cases:
        mod, win = MODALITY[c.modality]
        if c.image not in volumes:
            volumes[c.image] = read_image(c.image).array
        vol = volumes[c.image]
        gt = c.ground_truth()
        u8, _, _ = volume_to_uint8(vol, mod, win)
        t0 = time.perf_counter()
        tr = propagate(model, None, c.box, c.key_slice, stop=StopRule.never(), volume_u8=u8)
        recs = [
            {"z": s.z, "direction": s.direction, "prompt": s.prompt, "area": s.area, "iou": s.iou, "mean": s.mean}
            for s in tr.slices
        ]
        traces[c.case] = (tr.mask, recs, gt)
        ref = np.load(args.data / "reference" / f"3D_{c.name}.npz")["segs"] > 0
        row = {
            "case": c.case,
            "modality": c.modality,
            "pseudo": c.case.startswith(PSEUDO_GT),
            "z_range": c.z_range,
            "key": c.key_slice,
            "ref": dice(ref, gt),
            "encoded": tr.n_encoded,
            "trace_s": time.perf_counter() - t0,
        }
        # ours, for real, default rule: no z_range (viewer user) and with the case's z_range
        st = propagate(model, vol, c.box, c.key_slice, modality=mod, window=win)
        sz = propagate(model, vol, c.box, c.key_slice, modality=mod, window=win, z_range=c.z_range)
        row.update(
            ours=dice(st.mask, gt),
            ours_z=dice(sz.mask, gt),
            extent=st.z_extent,
            stopped=st.stopped,
            reencoded=st.n_encoded + sz.n_encoded,
        )
        sim = simulate(tr.mask, recs, c.key_slice, DEFAULT_STOP)
        row["sim_matches"] = bool((sim == st.mask).all())
        rows.append(row)
        print(
            f"{c.case:70s} ref {row['ref']:.3f} ours {row['ours']:.3f} ours+z {row['ours_z']:.3f} "
            f"extent {row['extent']} gt {c.z_range} stop {st.stopped} enc {tr.n_encoded}+{row['reencoded']}",
            flush=True,
        )
    print(f"total {time.perf_counter() - t_all:.0f} s")
    if not all(r["sim_matches"] for r in rows):
        print("WARNING: simulation differs from the real run for", [r["case"] for r in rows if not r["sim_matches"]])

    print("\n| modality | n | authors (z-range given) | ours, no z-range | ours, z-range given |")
    print("|---|---|---|---|---|")
    ref_m, ours_m, oz_m = per_modality(rows, "ref"), per_modality(rows, "ours"), per_modality(rows, "ours_z")
    for m in ref_m:
        n = sum(r["modality"] == m for r in rows)
        print(f"| {m} | {n} | {ref_m[m]:.3f} | {ours_m[m]:.3f} | {oz_m[m]:.3f} |")
    allm = lambda k: float(np.mean([r[k] for r in rows]))  # noqa: E731
    print(f"| all | {len(rows)} | {allm('ref'):.3f} | {allm('ours'):.3f} | {allm('ours_z'):.3f} |")
    print("\n| dataset | n | authors | ours, no z-range | ours, z-range |")
    print("|---|---|---|---|---|")
    by_ds = defaultdict(list)
    for r in rows:
        by_ds[r["case"].split("/")[0] + ("-" + r["modality"] if "totalseg" in r["case"] else "")].append(r)
    for ds, rs in sorted(by_ds.items()):
        ref, ours, ours_z = (float(np.mean([r[k] for r in rs])) for k in ("ref", "ours", "ours_z"))
        print(f"| {ds} | {len(rs)} | {ref:.3f} | {ours:.3f} | {ours_z:.3f} |")

    if args.tune:
        keys = {c.case: (c.key_slice, c.z_range) for c in cases}
        grid = []
        for ar, iou, shift, floor, keep in itertools.product(
            [0, 0.2, 0.4], [0, 0.5, 0.6, 0.7], [None, 0.25, 0.3, 0.35, 0.4, 0.5], [20, 30, 40], [False, True]
        ):
            if shift is None and floor != 30:
                continue
            rule = StopRule(
                min_area_ratio=ar, min_iou=iou, max_intensity_shift=shift, intensity_shift_floor=floor, keep_last=keep
            )
            d = {c: dice(simulate(m, r, keys[c][0], rule), g) for c, (m, r, g) in traces.items()}
            dz = {c: dice(simulate(m, r, keys[c][0], rule, keys[c][1]), g) for c, (m, r, g) in traces.items()}
            mods = defaultdict(list)
            for row in rows:
                mods[row["modality"]].append(d[row["case"]])
            grid.append(
                (
                    float(np.mean(list(d.values()))),
                    float(np.mean([np.mean(v) for v in mods.values()])),
                    float(np.mean(list(dz.values()))),
                    rule,
                    {k: round(float(np.mean(v)), 3) for k, v in mods.items()},
                )
            )
        grid.sort(key=lambda g: -g[0])
        print("\nmean(all) mean(per-modality) mean(all, z_range) rule per-modality")
        for g in grid[:25]:
            r = g[3]
            print(
                f"{g[0]:.3f} {g[1]:.3f} {g[2]:.3f}  area {r.min_area_ratio} iou {r.min_iou} "
                f"shift {r.max_intensity_shift} floor {r.intensity_shift_floor} keep {r.keep_last} {g[4]}"
            )
        never = StopRule.never()
        dn = [dice(simulate(m, r, keys[c][0], never), g) for c, (m, r, g) in traces.items()]
        print(f"never stop, whole volume: {np.mean(dn):.3f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
