"""Mask agreement of LiteMedSAM under autocast (bfloat16, float16) against the authors' exact path.

    python benchmarks/precision.py [--data DIR] [--images-per-dataset 2] [--threads 1]

For the first images of every dataset of ``DATA/cases.csv`` (2D), the authors' exact
encoder + decoder give the reference mask per box; then the encoder runs under
``torch.autocast`` with each type (CPU autocast: the type's rounding, float32
accumulation), once with the float32 decoder and once with the decoder under autocast
too. Prints mean / min Dice per setting and the worst boxes. The bar of the default path
is mean >= 0.999, min >= 0.99 (``engine.precision.BAR``); the result goes into
``engine.precision.MEASURED`` by hand (it decides ``autocast_dtype``). float16 on a CPU is
emulated: minutes.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    from napari_medsam import MedSAM
    from napari_medsam.engine.cache import Embedding
    from napari_medsam.engine.cases import load_cases
    from napari_medsam.engine.fast import build_encoder
    from napari_medsam.engine.io import read_image
    from napari_medsam.engine.metrics import dice
    from napari_medsam.engine.precision import BAR, DTYPES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--images-per-dataset", type=int, default=2)
    ap.add_argument("--boxes-per-image", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--types", nargs="+", default=sorted(DTYPES))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    ex = MedSAM.load("litemedsam", device="cpu", exact=True)
    enc = build_encoder(ex, "fused")  # the encoder the default path runs (BN folded), in float32 or autocast
    by = defaultdict(list)
    for c in load_cases(a.data, dims=2):
        by[c.image].append(c)
    per_ds: dict[str, int] = defaultdict(int)
    res: dict[tuple[str, str], list[tuple[float, str]]] = defaultdict(list)
    for img, cases in by.items():
        ds = img.parent.parent.name
        if per_ds[ds] >= a.images_per_dataset:
            continue
        per_ds[ds] += 1
        rgb = ex.prepare(read_image(img).array, cases[0].modality)
        e = ex.embed_rgb(rgb)
        x, resized = ex.recipe.preprocess(rgb)
        for name in a.types:
            with torch.inference_mode(), torch.autocast("cpu", dtype=DTYPES[name]):
                f = enc(x).float()
            eb = Embedding(f, tuple(rgb.shape[:2]), resized, ex.name, f"{name}:{img}")
            for c in cases[: a.boxes_per_image]:
                ref = ex.predict(e, c.box).masks[0]
                res[(name, "encoder")].append((dice(ex.predict(eb, c.box).masks[0], ref), c.case))
                with torch.autocast("cpu", dtype=DTYPES[name]):
                    m = ex.predict(eb, c.box).masks[0]
                res[(name, "encoder + decoder")].append((dice(m, ref), c.case))
        print(f"{img.name}: done", file=sys.stderr)
    print(f"| type | under autocast | boxes | mean Dice vs exact | min | meets the bar ({BAR[0]}, {BAR[1]}) |")
    print("|---|---|---|---|---|---|")
    for (name, what), rows in sorted(res.items()):
        d = np.array([r[0] for r in rows])
        ok = d.mean() >= BAR[0] and d.min() >= BAR[1]
        print(f"| {name} | {what} | {len(d)} | {d.mean():.4f} | {d.min():.4f} | {'yes' if ok else 'no'} |")
    for (name, what), rows in sorted(res.items()):
        print(f"worst {name} / {what}:", ", ".join(f"{c} {v:.3f}" for v, c in sorted(rows)[:3]))


if __name__ == "__main__":
    main()
