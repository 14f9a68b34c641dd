"""Speed of the fast paths (engine/fast/) against the authors' pipeline.

    python benchmarks/speed.py                  # 100 boxes + 8 encodes, agreement on the dev cases
    python benchmarks/speed.py --quick          # 30 boxes, 4 encodes, samples only

Every variant is timed in the same process, interleaved with the authors' pipeline
(``benchmarks/run.py``: ``authors_encode`` / ``authors_decode``) and with the default
path, so all see the same (noisy, 2-core, shared) machine. Ratios are variant /
authors'. Agreement: masks of each variant against the authors' fp32 masks on the
2D dev cases (the shared data set, ``$MEDSAM_SHARED_DATA``, if present, else the bundled samples).
Prints a markdown table and writes a section to docs/benchmarks_speed.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from napari_medsam.engine import fast as F  # noqa: E402
from run import authors_decode, authors_encode, machine, stats  # noqa: E402

SHARED = Path(os.environ.get("MEDSAM_SHARED_DATA", ROOT.parent / "shared" / "data"))

ENCODER_VARIANTS = {  # label -> encoder kind (library ones: engine/fast.py; the rest built here)
    "fused TinyViT (conv-BN folded, SDPA)": "fused",
    "ONNX Runtime fp32 (fused TinyViT)": "onnx",
    "experimental: TorchScript trace + freeze": "trace",
    "experimental: torch.ao int8 dynamic Linear": "torch-int8",
    "experimental: ONNX Runtime int8 dynamic MatMul": "onnx-int8",
    "experimental: torch.compile (inductor, freezing)": "compile",
}


def experimental_encoder(base, kind):
    """Encoders measured but not offered by engine/fast.py (they lose agreement or gain nothing)."""
    from torch import nn

    fused = F.fuse_tinyvit(base.module.image_encoder)
    if kind == "trace":
        tr = torch.jit.trace(fused, torch.zeros(1, 3, 256, 256), check_trace=False)
        return torch.jit.optimize_for_inference(torch.jit.freeze(tr.eval()))
    if kind == "torch-int8":
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(fused, {nn.Linear}, dtype=torch.qint8)
    if kind == "onnx-int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        path = F.export_onnx(fused)
        qpath = path.replace(".onnx", "-int8.onnx")
        if not os.path.exists(qpath):
            quantize_dynamic(path, qpath, weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"])
        return F.OrtEncoder(qpath)
    if kind == "compile":
        if F.triton_blocked():
            raise RuntimeError("triton import is blocked in this process (OpenGL context)")
        import torch._inductor.config as ic

        ic.freezing = True
        c = torch.compile(fused)
        with torch.inference_mode():
            c(torch.zeros(1, 3, 256, 256))
        return c
    raise ValueError(kind)


DESIGN = """## How the fast paths work (`engine/fast/`)

`MedSAM.load()` attaches separate fast copies of the encoder and decoder as `model.fast`;
the shared weights are never changed, and `MedSAM.load(..., exact=True)` (or `predict(..., exact=True)`)
runs the authors' pipeline.

Decoder (`decoder="fused"`, `engine/fast/decoder.py`, `lowrank.py`, `windows.py`), pure PyTorch:

* **prompt-independent work cached per embedding**: image tokens + no-mask embedding, and in the
  first two-way layer the token->image keys/values and the image->token queries (they see only the
  image and its positional encoding);
* **low-rank cross-attention**: with 7 prompt tokens and 8 heads the 4096 image tokens only ever meet
  56 head-token vectors, so each 4096 x 256 x 128 projection of the image side is folded into a
  4096 x 256 x 56 product with the projection weights moved to the token side (same maths, different
  rounding). The key bias of token->image attention is dropped: it is constant along the softmax
  axis. In layer 1 the image-side keys are `LN(x + A^T v)` (x the image tokens, A the layer-0
  attention, v 56 token vectors): its token->image logits and values and its image->token logits are
  taken through that form - per-image projections of x with the LayerNorm weight folded in, plus 56
  attention weights and the LayerNorm mean and scale per image token - instead of 256-wide products
  with the keys;
* **chunked image side**: the 4096 image tokens are walked in chunks of 1024, twice, so each chunk's
  intermediates stay in cache (softmaxes over all image tokens are accumulated online); the
  positional encoding's share of each image-side logit comes from projections made once per model;
* **only what `multimask_output=False` reads**: one hypernetwork MLP, and in the final token->image
  attention only the IoU token and the first mask token attend;
* **only the needed part of the output upscaling**: the two stride-2 transposed convolutions and the
  per-pixel LayerNorm are local (each 256-grid logit depends on one 64-grid token), so for
  `predict(region=...)` only the tokens under the region are upscaled, as three channels-last matrix
  products - identical values there;
* `auto_region=True`: a full-size mask is computed in the box grown by `grow_box` (25 % of its size
  + 8 px per side); if any positive logit lies on that window's border the whole plane is computed
  instead. Differs from the full computation only when the decoder puts a separate blob far outside
  the box.

Encoder (`engine/fast/encoders.py`, `onnx.py`):

* `encoder="fused"`: TinyViT with BatchNorm folded into the convolutions, attention biases gathered
  once, fused scaled-dot-product attention, channels-last memory order.
* `encoder="onnx"`: that fused TinyViT exported with `torch.onnx` (needs the `onnx` package; cached in
  the user cache folder, named by a digest of the weights) and run by ONNX Runtime with its own
  threads and no spinning; falls back to `fused` where ONNX Runtime cannot load.

Measured and *not* offered (`benchmarks/speed.py` still times them): int8 dynamic quantisation of the
Linear/MatMul layers (torch.ao and ONNX Runtime) - masks at mean Dice ~0.93 against the authors';
TorchScript trace + freeze - no gain over `fused`; `torch.compile` - minutes of warm-up on two cores,
and it imports triton, which must not happen in a process with an OpenGL context
(see `engine.fast.triton_blocked`).
"""


NOTES = """### What was tried, and why the default (`MedSAM.load()`) is what it is

* **Decoder** (`decoder="fused"`): per-image precompute of the prompt-independent first-layer
  projections, low-rank cross-attention (the 4096 image tokens only meet 7 tokens x 8 heads = 56
  vectors, so every 4096 x 256 x 128 image-side projection becomes a 4096 x 256 x 56 product), only
  the IoU token and mask token 0 in the final attention, only the token window under the box (+25 %
  + 8 px) through the transposed-conv upscaling, full plane only if the mask reaches the window
  edge. Masks agree with the default path at min Dice 1.0000 in the table above (and in
  `tests/test_fast.py`).
  Profiled in place, the decoder was bound by memory, not arithmetic: each 4096 x 256
  intermediate (keys, keys + positional encoding, residual copies, LayerNorm) cost 1.5-2 ms for
  its round trip through memory against ~0.2 ms when it stayed in cache, and glibc returned
  freed 4 MB blocks to the kernel so every new one page-faulted again. The transformer now walks
  the image tokens in 1024-token chunks, twice (layer 0's update, layer 1's token->image logits;
  then layer 1's image->token update and the final attention's logits), with the two softmaxes
  over all image tokens accumulated online; the upscaling is three channels-last matrix products.
  That took the median from ~38-42 ms to ~26-30 ms in the same conditions. Then layer 1's
  three products with the keys went through their low-rank form: the keys are LN(x + A^T v),
  so each product splits into per-image projections of x (LayerNorm weight folded in), the 56
  attention weights and the LayerNorm mean and scale per token (~15 % off the transformer).
  What is left is ~210 M multiply-adds per box (the two residual updates 4096 x 56 x 256, which
  the LayerNorms need in full, and the low-rank and final-attention products), plus ~250 small
  ops (MLPs whose 2 MB weights are read for 7 tokens, softmaxes, LayerNorms, copies): the 15 ms
  p95 target is not reached on this machine. A second torch thread helps a little when the
  machine is idle (the "torch default threads" row) and hurts when another process holds a core.
* **Threads**: torch's OpenMP pool with 2 threads on 2 shared cores is the single largest factor
  on a busy machine: the authors' decoder went from ~250 ms (1 thread) to ~1.5-2 s per box
  (2 threads) while other jobs ran. The plugin's previews therefore decode in a child process
  that runs on 1 torch thread; the library never changes torch's thread count around a decode
  (it is process-wide state: threads started meanwhile kept the 1 thread for good); ONNX Runtime
  runs without spinning.
* **Encoder**: TinyViT at 256 x 256 costs 75 GFLOP per image (stage 0 runs at full 256 x 256
  resolution); the 0.25 s target needs 300 GFLOP/s, above the fp32 peak of two AVX2 cores
  (no AVX-512 / VNNI / bf16 here). ONNX Runtime fp32 of the BN-folded TinyViT was the best exact
  path (~0.45x). Conv-BN folding + precomputed attention bias + SDPA in PyTorch: ~0.85x.
  channels-last: ~10 % (oneDNN's depthwise 3x3 convs of stage 0 run ~2.5x faster), now part of
  the fused encoder. OpenVINO 2026.4 on the exported ONNX: same as ONNX Runtime.
  TorchScript trace + freeze: ~0.7-0.95x, slow build.
  `torch.compile` (inductor, freezing): ~0.55x after 200 s of warm-up on this machine, and it imports
  triton (must not happen next to an OpenGL context; `engine.fast.triton_blocked()` detects a
  blocked import) - not shipped. int8 dynamic quantisation (torch.ao or ONNX Runtime): 0.4-0.8x but
  masks at mean Dice ~0.94 against the authors' (layer-3 fc2 alone gives 19 % embedding error) - not
  shipped.
* **MedSAM ViT-B encoder** (the default of `medsam` / `sam_*`): segment-anything's attention builds
  the (heads, 4096, 4096) score matrix, adds the decomposed relative positions in two broadcast
  passes that allocate 800 MB each, then soft-maxes in a third; `scaled_dot_product_attention` with
  the relative positions as its additive mask does it in one fused kernel (same maths, embeddings
  equal to float rounding, tested). Windowed blocks use the same kernel. The mask itself is built
  4 query rows at a time into one reused buffer: the whole mask of a global block is 805 MB, and
  writing it, copying it (the broadcast sum came out non-contiguous) and reading it back cost
  ~1.5 s per global block (ViT-B: 15.9 s -> ~10 s per slice on this CPU, ~1.6 GB less peak memory).
  What is left is mostly the 12 blocks' linear layers (~700 GFLOP, near the GEMM peak) and the
  flash-attention kernel itself.
* **ONNX Runtime for the decoder**: the restructured transformer exported to ONNX ran ~15 % slower
  than eager PyTorch on one thread (skinny GEMMs; no fusable work left) - not shipped.
* **Memory**: the default stores embeddings as fp16, 2.10 MB each (its agreement row above includes
  the fp16 storage).
"""


def facade(base, **fast):
    """A second MedSAM over the same weights, with its own cache and fast paths."""
    from napari_medsam import MedSAM
    from napari_medsam.engine.cache import EmbeddingCache

    return MedSAM(base.spec, base.module, base.device, EmbeddingCache(), base.checkpoint, fast=fast or None)


def random_boxes(n, size=512, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x0, y0 = rng.integers(0, size - 112, 2)
        w, h = rng.integers(15, 110, 2)
        out.append((int(x0), int(y0), int(min(size - 1, x0 + w)), int(min(size - 1, y0 + h))))
    return out


def bench_decoder(base, fast, rgb, boxes):
    """Per-box times (s) of: authors', default predict, fast full-plane, fast auto-region, fast preview region."""
    from napari_medsam.engine.evaluation import dice

    emb = base.embed_rgb(rgb)
    a_emb, new_hw = authors_encode(base.module, rgb)
    f_emb = fast.embed_rgb(rgb)
    fast_full = facade(base, encoder=None, decoder="fused", auto_region=False)
    ff_emb = fast_full.embed_rgb(rgb)
    fast_full.predict(ff_emb, boxes[0])  # per-image precompute, reported apart
    t = time.perf_counter()
    fast.fast.decoder.clear()
    fast.predict(f_emb, boxes[0])
    first = time.perf_counter() - t
    fast_nt = facade(base, encoder=None, decoder="fused")
    nt_emb = fast_nt.embed_rgb(rgb)
    fast_nt.predict(nt_emb, boxes[0])
    nthreads = torch.get_num_threads()
    kinds = ("authors", "authors 1t", "default", "fast full", "fast auto", "fast auto nt", "fast region")
    rows = {k: [] for k in kinds}
    dices = {k: [] for k in ("fast full", "fast auto", "fast region")}
    same_as_authors = 0
    for b in boxes:  # interleaved: every variant sees the same machine state
        t = time.perf_counter()
        ref_a = authors_decode(base.module, a_emb, b, rgb.shape[:2], new_hw)
        rows["authors"].append(time.perf_counter() - t)
        torch.set_num_threads(1)
        t = time.perf_counter()
        authors_decode(base.module, a_emb, b, rgb.shape[:2], new_hw)
        rows["authors 1t"].append(time.perf_counter() - t)
        torch.set_num_threads(nthreads)
        t = time.perf_counter()
        ref = base.predict(emb, b).masks[0]
        rows["default"].append(time.perf_counter() - t)
        t = time.perf_counter()
        fast_nt.predict(nt_emb, b)
        rows["fast auto nt"].append(time.perf_counter() - t)
        # the decoder child process runs on 1 torch thread (set once there); the library itself
        # never changes torch's (process-wide) thread count, the benchmark does it here
        torch.set_num_threads(1)
        t = time.perf_counter()
        m_full = fast_full.predict(ff_emb, b).masks[0]
        rows["fast full"].append(time.perf_counter() - t)
        t = time.perf_counter()
        m_auto = fast.predict(f_emb, b).masks[0]
        rows["fast auto"].append(time.perf_counter() - t)
        reg = F.grown_region(b, rgb.shape[:2])  # the plugin's preview region
        t = time.perf_counter()
        m_reg = fast.predict(f_emb, b, region=reg).masks[0]
        rows["fast region"].append(time.perf_counter() - t)
        torch.set_num_threads(nthreads)
        y0, y1, x0, x1 = reg
        same_as_authors += int(np.array_equal(ref_a.astype(bool), ref))
        dices["fast full"].append(dice(m_full, ref))
        dices["fast auto"].append(dice(m_auto, ref))
        dices["fast region"].append(dice(m_reg, ref[y0:y1, x0:x1]))
    return rows, dices, first, same_as_authors


def bench_encoder(base, variants, rgb, n):
    rows = {k: [] for k in ["authors", "default"] + list(variants)}
    for i in range(n):
        shifted = np.ascontiguousarray(np.roll(rgb, i + 1, axis=0))
        t = time.perf_counter()
        authors_encode(base.module, shifted)
        rows["authors"].append(time.perf_counter() - t)
        t = time.perf_counter()
        base.embed_rgb(shifted, use_cache=False)
        rows["default"].append(time.perf_counter() - t)
        for k, m in variants.items():
            t = time.perf_counter()
            m.embed_rgb(shifted, use_cache=False)
            rows[k].append(time.perf_counter() - t)
    return rows


def bench_vit(rgb, n):
    """MedSAM ViT-B encoder at 1024 x 1024: default attention vs the fused kernel (random weights:
    no MedSAM weights can be had here, and the time does not depend on them)."""
    import copy

    from napari_medsam import MedSAM
    from napari_medsam.engine.fast import sdpa_vit

    torch.manual_seed(0)
    m = MedSAM.load("medsam", device="cpu", weights="random")
    x, _ = m.recipe.preprocess(rgb)
    default = m.module.image_encoder
    fused = copy.deepcopy(default)
    sdpa_vit(fused)
    rows = {"default": [], "fused": []}
    for i in range(n + 1):  # the first round warms up
        for k, enc in (("default", default), ("fused", fused)):
            t = time.perf_counter()
            out = enc(x)
            if i:
                rows[k].append(time.perf_counter() - t)
            if k == "default":
                ref = out
        diff = float((out - ref).abs().max() / ref.abs().max())
    return rows, diff


def sgemm_peak(threads: int, n: int = 2048, reps: int = 8) -> float:
    """Best fp32 GFLOP/s of one n x n x n matrix product with ``threads`` torch threads."""
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best = min(_timed(lambda: a @ b) for _ in range(reps))
    finally:
        torch.set_num_threads(prev)
    return 2 * n**3 / best / 1e9


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def counted_flops(fn) -> float:
    """Floating-point operations of ``fn()`` as torch's FlopCounterMode counts them (2 per multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        fn()
    return float(fc.get_total_flops())


def roofline(base, fast, rgb, box):
    """Work per encode / per box, the machine's measured fp32 GEMM peak, and the times they bound."""
    x, _ = base.recipe.preprocess(rgb)
    enc = counted_flops(lambda: base.module.image_encoder(x))
    emb = fast.embed_rgb(rgb)
    st = fast.fast.decoder.image_state(emb.features, emb.key)
    box_t = base.recipe.scale_boxes(np.asarray([box], float), emb.original_size, emb.resized)
    win = F.auto_window(base.recipe, box_t, emb.resized, st.grid)
    dec = counted_flops(lambda: fast.fast.decoder.logits(st, box_t, win))
    ref = counted_flops(lambda: base.predict(emb, box, exact=True))
    return {"encoder": enc, "decoder": dec, "decoder_authors": ref, "peak1": sgemm_peak(1), "peak2": sgemm_peak(2)}


def dev_cases(limit_images=None):
    from napari_medsam.engine.evaluation import load_cases

    root = SHARED if (SHARED / "cases.csv").exists() else ROOT / "src" / "napari_medsam" / "samples"
    cases = load_cases(root, dims=2)
    if limit_images:
        seen, keep = [], []
        for c in cases:
            if c.image not in seen:
                if len(seen) >= limit_images:
                    continue
                seen.append(c.image)
            keep.append(c)
        cases = keep
    return root, cases


def agreement(base, variants, cases):
    """Mean / min Dice of each variant's masks vs the authors' fp32 masks, per dev case."""
    from napari_medsam.engine.evaluation import dice
    from napari_medsam.engine.io import read_image

    out = {k: [] for k in variants}
    by_image = {}
    for c in cases:
        by_image.setdefault(c.image, []).append(c)
    for path, cs in by_image.items():
        img = read_image(path).array
        if img.ndim == 3 and img.shape[-1] not in (3, 4):
            continue
        rgb = base.prepare(img, cs[0].modality)
        a_emb, new_hw = authors_encode(base.module, rgb)
        refs = [authors_decode(base.module, a_emb, c.box, rgb.shape[:2], new_hw).astype(bool) for c in cs]
        for k, m in variants.items():
            emb = m.embed_rgb(rgb)
            for c, ref in zip(cs, refs, strict=True):
                # tiny boxes (< 4 px short side at 256) flip in the authors' own pipeline; reported apart
                if c.short_side_at(256, rgb.shape) < 4:
                    continue
                out[k].append(dice(m.predict(emb, c.box).masks[0], ref))
        for m in variants.values():
            m.cache.clear()
    return out


def default_vs_exact(cases):
    """Dice of ``MedSAM.load()``'s default masks against ``exact=True``'s on every 2D dev case
    (tiny boxes included): (mean, min, n, n_images, worst three (dice, case))."""
    from napari_medsam import MedSAM
    from napari_medsam.engine.cache import EmbeddingCache
    from napari_medsam.engine.evaluation import dice
    from napari_medsam.engine.io import read_image

    exact = MedSAM.load("litemedsam", device="cpu", exact=True)
    default = MedSAM(exact.spec, exact.module, exact.device, EmbeddingCache(), exact.checkpoint, fast=True, exact=False)
    by_image = {}
    for c in cases:
        by_image.setdefault(c.image, []).append(c)
    rows = []
    for path, cs in by_image.items():
        rgb = exact.prepare(read_image(path).array, cs[0].modality)
        e, d = exact.embed_rgb(rgb), default.embed_rgb(rgb)
        for c in cs:
            rows.append((float(dice(default.predict(d, c.box).masks[0], exact.predict(e, c.box).masks[0])), c.case))
        exact.cache.clear()
        default.cache.clear()
    v = np.asarray([r[0] for r in rows])
    return float(v.mean()), float(v.min()), len(v), len(by_image), sorted(rows)[:3], default.fast.describe()


def default_vs_exact_section(mean, low, n, n_img, worst, desc):
    """The markdown section for :func:`default_vs_exact`'s numbers."""
    w = "; ".join(f"{c} {d:.4f}" for d, c in worst)
    return (
        f"### Default `MedSAM.load()` vs `exact=True` (every 2D dev case, tiny boxes included)\n\n"
        f"Default: {desc}, fp16 embeddings. {n} cases on {n_img} images: mean Dice {mean:.5f}, min {low:.5f} "
        f"(goal: mean >= 0.999, min >= 0.99). Lowest: {w}. `tests/test_fast.py` checks the same on every "
        "case of one image per dataset (26 cases, 9 datasets)."
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boxes", type=int, default=100)
    ap.add_argument("--encodes", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="30 boxes, 4 encodes, bundled samples only")
    ap.add_argument("--no-agreement", action="store_true")
    ap.add_argument("--compile", action="store_true", help="also try torch.compile on the encoder (slow warm-up)")
    ap.add_argument("--vit-encodes", type=int, default=3, help="MedSAM ViT-B encodes per variant (0: skip)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks_speed.md"))
    ap.add_argument(
        "--agreement-only", action="store_true", help="only default vs exact=True on the 2D dev cases; print"
    )
    a = ap.parse_args(argv)
    if a.agreement_only:
        root, cases = dev_cases()
        mean, low, n, n_img, worst, desc = default_vs_exact(cases)
        print(f"default ({desc}) vs exact=True: {n} 2D cases on {n_img} images: mean Dice {mean:.5f}, min {low:.5f}")
        print("worst:", worst)
        return
    if a.quick:
        a.boxes, a.encodes = 30, 4

    from napari_medsam import MedSAM
    from napari_medsam.engine.fast import have_onnxruntime
    from napari_medsam.engine.io import read_image

    base = MedSAM.load("litemedsam", device="cpu", exact=True)
    img = read_image(ROOT / "src/napari_medsam/samples/dsb2018_nuclei.png").array  # 512 x 512
    rgb = base.prepare(img)

    enc_variants = {}
    build_s = {}
    skipped = []
    for label, kind in ENCODER_VARIANTS.items():
        if kind.startswith("onnx") and not have_onnxruntime():
            skipped.append(f"{label}: onnxruntime/onnx not installed")
            continue
        if kind == "compile" and not a.compile:
            skipped.append(f"{label}: not run (pass --compile; minutes of warm-up)")
            continue
        t = time.perf_counter()
        try:
            if kind in ("fused", "onnx"):
                m = facade(base, encoder=kind, decoder="fused")
                if m.fast is None or m.fast.encoder_kind != kind:
                    raise RuntimeError("unavailable")
            else:
                m = facade(base, encoder=None, decoder="fused")
                m.fast.encoder = experimental_encoder(base, kind)
                m.fast.encoder_kind = m.fast.key_suffix = kind
            m.embed_rgb(rgb, use_cache=False)  # warm-up (compile happens here)
        except Exception as exc:  # noqa: BLE001 - report, never abort the whole benchmark
            skipped.append(f"{label}: {type(exc).__name__}: {exc}")
            continue
        build_s[label] = time.perf_counter() - t
        enc_variants[label] = m
    fast = facade(base, encoder=None, decoder="fused")

    dec_rows, dec_dice, first, same = bench_decoder(base, fast, rgb, random_boxes(a.boxes))
    enc_rows = bench_encoder(base, enc_variants, rgb, a.encodes)

    vit = bench_vit(rgb, a.vit_encodes) if a.vit_encodes else None
    roof = roofline(base, fast, rgb, (200, 180, 290, 260))

    agree = {}
    if not a.no_agreement:
        root, cases = dev_cases(limit_images=3 if a.quick else None)
        shipped = MedSAM(base.spec, base.module, base.device, None, base.checkpoint, fast=True, exact=False)
        variants = {"exact=True": base, **enc_variants, "default `MedSAM.load()` (as shipped)": shipped}
        agree = agreement(base, variants, cases)
        dve = default_vs_exact(cases)
        agree_root = "the shared data" if root == SHARED else "the bundled samples"

    am, ap95 = stats(dec_rows["authors"])
    em, ep95 = stats(enc_rows["authors"])
    labels = {
        "authors": "authors' pipeline (torch default threads)",
        "authors 1t": "authors' pipeline, torch 1 thread",
        "default": "default `predict` (authors' numerics)",
        "fast full": "fused decoder, full plane, 1 thread",
        "fast auto": "**fused decoder, auto region (full-size mask), 1 thread** (the default)",
        "fast auto nt": "fused decoder, auto region, torch default threads",
        "fast region": "fused decoder, `region=` preview window, 1 thread",
    }
    lines = [
        "## Fast paths vs the authors' pipeline (`benchmarks/speed.py`)",
        "",
        (
            f"Machine: {machine()}; run {time.strftime('%Y-%m-%d %H:%M')}, load average "
            f"{os.getloadavg()[0]:.1f} at the end (a shared machine: compare ratios, not absolute times). "
            "LiteMedSAM, CPU. Every row is timed in the same process, interleaved with the authors' pipeline; "
            "ratio = median / authors' median."
        ),
        "",
        f"### Box -> mask, 512 x 512, cached embedding ({a.boxes} random boxes, 15-110 px)",
        "",
        "| variant | median ms | p95 ms | ratio | Dice vs default (mean / min) |",
        "|---|---|---|---|---|",
    ]
    for k, v in dec_rows.items():
        m, p = stats(v)
        d = f"{np.mean(dec_dice[k]):.4f} / {np.min(dec_dice[k]):.4f}" if k in dec_dice else "-"
        lines.append(f"| {labels[k]} | {m:.1f} | {p:.1f} | {m / am:.2f} | {d} |")
    lines += [
        "",
        (
            f"Default masks identical to the authors' on {same} of {a.boxes} boxes. First box on a new embedding "
            f"with the fused decoder (per-image precompute included): {first * 1000:.0f} ms."
        ),
        "",
        f"### Encoder per image/slice ({a.encodes} encodes of the 512 x 512 sample, preprocessing included)",
        "",
        "| variant | median s | p95 s | ratio | build + first run s |",
        "|---|---|---|---|---|",
    ]
    for k, v in enc_rows.items():
        m, p = stats(v)
        b = f"{build_s[k]:.1f}" if k in build_s else "-"
        label = "default `embed_rgb` (authors' numerics)" if k == "default" else labels.get(k, k)
        lines.append(f"| {label} | {m / 1000:.3f} | {p / 1000:.3f} | {m / em:.2f} | {b} |")
    if skipped:
        lines += ["", "Not timed: " + "; ".join(skipped) + "."]
    emb = base.embed_rgb(rgb)
    lines += [
        "",
        (
            f"Cached embedding: {emb.nbytes / 1e6:.2f} MB fp32, {emb.nbytes / 2e6:.2f} MB "
            "with `EmbeddingCache(fp16=True)` "
            "(the default `MedSAM.load()` stores its own embeddings as fp16, under their own cache keys)."
        ),
    ]
    e_bound = roof["encoder"] / (roof["peak2"] * 1e9)
    d_bound = roof["decoder"] / (roof["peak1"] * 1e9)
    lines += [
        "",
        "### Lower bounds on this machine (work / measured peak)",
        "",
        (
            f"fp32 matrix product peak measured here (2048^3, best of 8): {roof['peak1']:.0f} GFLOP/s on 1 thread, "
            f"{roof['peak2']:.0f} GFLOP/s on 2. Work counted by `torch.utils.flop_counter`."
        ),
        "",
        "| | work | at the peak | target |",
        "|---|---|---|---|",
        f"| encoder, per 256 x 256 image | {roof['encoder'] / 1e9:.1f} GFLOP | {e_bound:.2f} s on 2 threads | 0.25 s |",
        (
            f"| fused decoder, per box (a 90 x 80 px box) | {roof['decoder'] / 1e9:.2f} GFLOP "
            f"(default decoder: {roof['decoder_authors'] / 1e9:.2f}) | {d_bound * 1e3:.1f} ms on 1 thread | 15 ms p95 |"
        ),
        "",
        (
            "The encoder bound assumes every operation runs as fast as one large matrix product; "
            "TinyViT's depthwise convolutions, LayerNorms and small attention windows run far below it."
        ),
    ]
    if vit:
        rows, diff = vit
        dm = stats(rows["default"])[0]
        lines += [
            "",
            f"### MedSAM ViT-B encoder, 1024 x 1024 ({a.vit_encodes} encodes each, interleaved; random weights)",
            "",
            "| variant | median s | p95 s | ratio |",
            "|---|---|---|---|",
        ]
        for k, label in (
            ("default", "segment-anything attention (authors' code)"),
            ("fused", "**fused attention** (the default for ViT models)"),
        ):
            m, p = stats(rows[k])
            lines.append(f"| {label} | {m / 1000:.2f} | {p / 1000:.2f} | {m / dm:.2f} |")
        lines += ["", f"Largest embedding difference, relative to the largest value: {diff:.1e}."]
    if agree:
        n = len(next(iter(agree.values()))) if agree else 0
        lines += [
            "",
            (
                f"### Mask agreement with the authors' fp32 pipeline ({n} 2D dev cases of {agree_root}; "
                "boxes under 4 px at 256 excluded)"
            ),
            "",
            "| variant | mean Dice | min Dice | cases with Dice < 0.99 |",
            "|---|---|---|---|",
        ]
        for k, v in agree.items():
            v = np.asarray(v)
            lines.append(f"| {k} | {v.mean():.4f} | {v.min():.4f} | {int((v < 0.99).sum())} |")
    if agree:
        lines += ["", default_vs_exact_section(*dve)]
    lines += ["", NOTES, "", DESIGN]
    text = "\n".join(lines) + "\n"
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    head = "# Speed of the fast paths\n\n"
    out.write_text(head + text)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
