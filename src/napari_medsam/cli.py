"""``napari-medsam`` command line: segment, batch, models, download, demo.

A thin argparse layer over :mod:`napari_medsam.engine.batch`. Every error the engine
raises on purpose (:class:`MedSAMError`) ends as one line
``napari-medsam: error: ...`` and exit status 2; ``batch`` exits 1 when some rows
failed (they are listed on stderr and in ``summary.csv``), 0 otherwise.
"""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from typing import List, Optional

PROG = "napari-medsam"


def _quiet_third_party_warnings() -> None:
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"timm(\.|$)")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch(\.|$)")


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="litemedsam", help="registered model (see `napari-medsam models`; default litemedsam)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument("--checkpoint", metavar="PATH", help="weights file (default: env var, installed package, user cache)")


def _fast_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--exact", action="store_true", help=(
        "the authors' pipeline end to end (their encoder and decoder numerics, no mask refinement). "
        "Default: the fastest path that keeps the masks (ONNX Runtime or fused TinyViT encoder, fused decoder; "
        "masks agree with --exact at mean Dice >= 0.999, docs/benchmarks_speed.md)"))
    p.add_argument("--fast", action="store_true", help="no effect, kept for old scripts: the fast path is the default")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog=PROG, description="Box-prompted MedSAM / LiteMedSAM segmentation.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("segment", help="segment one image from one box", description="Segment one image (or one volume) from a box prompt.")
    s.add_argument("image", help="PNG/JPEG/BMP, TIFF, NIfTI or DICOM file (or DICOM folder)")
    s.add_argument("--box", required=True, metavar="x0,y0,x1,y1", help="inclusive pixel bounds (x = column, y = row)")
    s.add_argument("-o", "--output", required=True, metavar="MASK", help="output label file (.tif, .nii.gz or .png); 1 = object")
    s.add_argument("--modality", default="auto", help="auto, ct, mr, rgb, ultrasound, xray, ... (default auto)")
    s.add_argument("--window", metavar="L,W|PRESET", help="CT window 'level,width' or a preset (soft_tissue, lung, brain, ...)")
    s.add_argument("--channels", metavar="C[,C[,C]]", help=(
        "multichannel image, channel axis first (e.g. a CYX TIFF): channels combined as red, green, blue, "
        "each scaled on its own (--modality/--window apply per channel)"))
    s.add_argument("--slice", type=int, metavar="Z", help="volume: index (axis 0) of the slice the box is on")
    s.add_argument("--propagate", action="store_true", help="volume: segment the object in 3D from the key slice")
    s.add_argument("--z-range", metavar="FIRST,LAST", help="volume: limit propagation to these slices")
    _model_options(s)
    _fast_option(s)

    b = sub.add_parser("batch", help="segment every row of a prompts CSV", description=(
        "Segment every row of a prompts CSV (columns image, box; optional modality, window, slice, propagate, "
        "z_range, gt, gt_select, name). Writes DIR/<name>.tif and DIR/summary.csv."))
    b.add_argument("prompts", help="prompts CSV; relative paths are resolved against its folder")
    b.add_argument("--out-dir", required=True, metavar="DIR", help="folder for masks and summary.csv")
    _model_options(b)
    _fast_option(b)
    par = b.add_mutually_exclusive_group()
    par.add_argument("--workers", type=int, metavar="N", help="run on a local Dask cluster of N processes (needs napari-medsam[dask])")
    par.add_argument("--scheduler", metavar="ADDRESS", help="run on this Dask scheduler, e.g. tcp://host:8786 (needs napari-medsam[dask])")
    b.add_argument("--cache-dir", metavar="DIR", help="on-disk embedding cache shared by workers and later runs")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")

    w = sub.add_parser("serve", help="serve the labeling session of a folder to web browsers", description=(
        "Serve the labeling session of IMAGES (labels, records, autosave, resume in OUT) to any browser; "
        "the mask follows the box while it is dragged (docs/web.md)."))
    w.add_argument("images", help="folder of images (or a list file), as for the napari session")
    w.add_argument("--out", required=True, metavar="OUT", help="session folder: labels/, records/, session.json")
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; others require a token)")
    w.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    w.add_argument("--token", help="access token (default: none on 127.0.0.1, generated and printed otherwise)")
    _model_options(w)

    pc = sub.add_parser("precompute", help="fill a disk embedding cache for a folder of images or a volume", description=(
        "Run the image encoder once per 2D image and per volume slice of IMAGES and store the embeddings in "
        "--cache-dir, so later `batch --cache-dir`, sessions and 3D propagation with that folder skip the encoder."))
    pc.add_argument("images", help="folder of images, an image file or a volume (NIfTI, TIFF stack, DICOM folder)")
    pc.add_argument("--cache-dir", required=True, metavar="DIR", help="disk embedding cache folder (created if missing)")
    pc.add_argument("--modality", default="auto", help="auto, ct, mr, rgb, ultrasound, xray, ... (default auto)")
    pc.add_argument("--window", metavar="L,W|PRESET", help="CT window 'level,width' or a preset")
    pc.add_argument("--slice", type=int, metavar="Z", help="volumes: encode from this slice outward")
    pc.add_argument("--no-progress", action="store_true", help="no progress bar")
    _model_options(pc)
    _fast_option(pc)

    se = sub.add_parser("session", help="open (resume) a labeling session: progress, repairs, export", description=(
        "Open the labeling session in OUT: finishes or undoes a save a crash interrupted, sets damaged records "
        "aside (each reported on stderr), prints the progress; --export writes MedSAM training data (npz + CSV)."))
    se.add_argument("out", metavar="OUT", help="session folder (labels/, records/, session.json)")
    se.add_argument("--images", help="image folder or list file (default: the one the session was made from)")
    se.add_argument("--export", nargs="?", const="", metavar="DIR", help="export to DIR (default OUT/export)")

    sub.add_parser("models", help="list models and where their weights are (never downloads)")

    d = sub.add_parser("download", help="download and verify a model's weights (explicit; needs internet)")
    d.add_argument("model", help="registered model name, e.g. medsam")

    m = sub.add_parser("demo", help="segment the bundled ultrasound sample and write a mask and an overlay")
    m.add_argument("-o", "--out-dir", default="medsam-demo", metavar="OUT_DIR", help="output folder (default ./medsam-demo)")
    _model_options(m)
    return parser


def _fmt_s(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f} s"


def cmd_segment(a: argparse.Namespace) -> int:
    from .engine.batch import BatchError, ImageSegmenter, load_model, parse_box_text, parse_z_range
    from .engine.io import read_image, write_labels

    box = parse_box_text(a.box)
    z_range = None
    if a.z_range:
        try:
            z_range = parse_z_range(a.z_range, "--z-range")
        except ValueError as exc:
            raise BatchError(str(exc)) from None
    image = read_image(a.image)
    modality, window = a.modality, a.window
    if a.channels:
        image, modality, window = _composed(image, a.channels, modality, window)
    model = load_model(a.model, a.device, a.checkpoint, exact=a.exact)
    seg = ImageSegmenter(model, image).segment(box, modality, window, a.slice, a.propagate, z_range)
    out = write_labels(a.output, seg.mask.astype("uint8"), like=image)
    iou = "" if seg.iou is None else f", predicted IoU {seg.iou:.3f}"
    print(f"wrote {out}: {int(seg.mask.sum())} object pixels of {seg.mask.size}{iou}; "
          f"encode {_fmt_s(seg.encode_s)}, decode {_fmt_s(seg.decode_s)} ({model.name} on {model.device})")
    return 0


def _composed(image, channels: str, modality: str, window):
    """ImageData with its first axis taken as channels -> RGB ImageData the model reads as is."""
    import dataclasses

    from .engine.errors import ImageError
    from .engine.intensity import compose_channels

    if image.kind == "rgb":
        raise ImageError(f"--channels needs a multichannel image (channel axis first), {image.path} is RGB")
    rgb = compose_channels(image.array, channels, axis=0, modality=modality, window=window)
    spacing = image.spacing[1:] if image.spacing else None
    kind = "rgb" if rgb.ndim == 3 else "volume"
    return dataclasses.replace(image, array=rgb, spacing=spacing, kind=kind, affine=None), "rgb", None


def cmd_batch(a: argparse.Namespace) -> int:
    from .engine.batch import run_batch

    res = run_batch(
        a.prompts, a.out_dir, model=a.model, device=a.device, checkpoint=a.checkpoint,
        workers=a.workers, scheduler=a.scheduler, cache_dir=a.cache_dir, progress=not a.no_progress,
        exact=a.exact,
    )
    print(f"{len(res.rows)} rows: {res.n_ok} ok, {res.n_failed} failed in {res.seconds:.1f} s; "
          f"masks in {res.out_dir}, summary {res.summary_path}")
    per = res.by_modality()
    if per:
        print(f"{'modality':16s} {'n':>4s} {'Dice':>7s} {'NSD':>7s}")
        for mod, v in per.items():
            print(f"{mod:16s} {v['n']:4d} {v['dice']:7.4f} {v['nsd']:7.4f}")
    return res.exit_code


def cmd_models(a: argparse.Namespace) -> int:
    from .engine.errors import CheckpointError
    from .engine.models.registry import REGISTRY

    for name, spec in REGISTRY.items():
        src = spec.checkpoint
        print(f"{name}: {spec.description}")
        try:
            path = spec.locate_checkpoint(None, allow_download=False)
        except CheckpointError as exc:
            print(f"    checkpoint: not found: {exc}")
            continue
        checks = [k for k in ("sha256", "md5") if getattr(src, k)]
        if checks:
            state = f"verified ({'size + ' if src.size else ''}{checks[0]})"
        elif src.size:
            state = "size checked (no checksum published: not verified)"
        else:
            state = "not verified (no checksum known)"
        print(f"    checkpoint: {path}  [{state}]")
    return 0


def cmd_download(a: argparse.Namespace) -> int:
    from .engine.batch import model_spec

    spec = model_spec(a.model)
    path = spec.locate_checkpoint(None, allow_download=True)
    print(f"{spec.name}: {path} (verified)")
    return 0


def cmd_session(a: argparse.Namespace) -> int:
    import logging

    from .engine.session import LabelingSession, export_session

    logging.getLogger("napari_medsam.engine.session").addHandler(logging.NullHandler())  # printed below instead
    s = LabelingSession(a.images, a.out)
    for i in range(len(s)):  # check every pair: damaged records set aside, out-of-step records rebuilt
        s.load_record(i)
        s.load_labels(i)
    for message in s.warnings:
        print(f"{PROG}: warning: {message}", file=sys.stderr)
    print(f"{s.output_dir}: {s.progress_text()} ({len(s)} images from {s.input})")
    if a.export is None:
        return 0
    res = export_session(s, a.export or None)
    for name, why in res.errors.items():
        print(f"{PROG}: {name}: {why}", file=sys.stderr)
    print(f"exported {len(res.files)} images to {res.out_dir}, summary {res.summary_path}")
    return 1 if res.errors else 0


def cmd_serve(a: argparse.Namespace) -> int:
    from .server.serve import serve

    return serve(a.images, a.out, a.host, a.port, a.model, a.device, a.checkpoint, a.token)


def cmd_precompute(a: argparse.Namespace) -> int:
    from .engine.precompute import precompute

    res = precompute(
        a.images, a.cache_dir, a.model, a.device, a.checkpoint, modality=a.modality, window=a.window,
        start_slice=a.slice, exact=a.exact, progress=not a.no_progress,
    )
    for name, why in res.failed:
        print(f"napari-medsam: {name}: {why}", file=sys.stderr)
    print(f"{res.images} images, {res.planes} planes: {res.encoded} encoded, {res.cached} already cached, "
          f"{len(res.failed)} failed in {res.seconds:.1f} s; cache {res.cache_dir}")
    return 1 if res.failed else 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .engine.batch import run_demo

    r = run_demo(a.out_dir, a.model, a.device, a.checkpoint)
    x0, y0, x1, y1 = (int(v) for v in r.box)
    print(f"{r.model} on {r.device}: bundled breast ultrasound sample, box {x0},{y0},{x1},{y1}")
    print(f"model load {r.load_s:.2f} s, encode {r.encode_s:.3f} s, decode {r.decode_s:.3f} s")
    print(f"predicted IoU {r.iou:.3f}, Dice vs ground truth {r.dice:.3f}")
    print(f"wrote {r.mask_path}")
    print(f"wrote {r.overlay_path}")
    return 0


COMMANDS = {"segment": cmd_segment, "batch": cmd_batch, "models": cmd_models, "download": cmd_download, "demo": cmd_demo, "precompute": cmd_precompute, "serve": cmd_serve, "session": cmd_session}


#: options whose value may start with a minus sign (a box left of the image, a negative CT level)
NUMERIC_VALUE_OPTIONS = ("--box", "--z-range", "--window", "--slice", "--channels")


def _negative_value(text: str) -> bool:
    """``-5,0,10,10``, ``-600,1500``, ``-3``, ``-inf,...``: a value, not an option such as ``-o``."""
    return text.startswith("-") and not text.startswith("--") and (
        "," in text or re.match(r"^-\s*([\d.]|inf|nan)", text, re.IGNORECASE) is not None
    )


def join_negative_values(argv: List[str]) -> List[str]:
    """``--box -5,0,10,10`` -> ``--box=-5,0,10,10``: argparse would read ``-5,...`` as an option."""
    out: List[str] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok == "--":
            out.extend(argv[i:])
            break
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if tok in NUMERIC_VALUE_OPTIONS and nxt is not None and _negative_value(nxt):
            out.append(f"{tok}={nxt}")
            i += 2
            continue
        out.append(tok)
        i += 1
    return out


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; returns the exit status (0 ok, 1 some batch rows failed, 2 error)."""
    _quiet_third_party_warnings()
    args = build_parser().parse_args(join_negative_values(sys.argv[1:] if argv is None else list(argv)))
    from .engine.errors import MedSAMError

    try:
        return COMMANDS[args.command](args)
    except MedSAMError as exc:
        print(f"{PROG}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except OSError as exc:  # cannot write the output, disk full...
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
