"""The ``napari-medsam`` argument parser: one subcommand per engine entry point."""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version

PROG = "napari-medsam"


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="litemedsam", help="registered model (see `napari-medsam models`; default litemedsam)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default auto)")
    p.add_argument(
        "--checkpoint", metavar="PATH", help="weights file (default: env var, installed package, user cache)"
    )


def _fast_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--exact",
        action="store_true",
        help=(
            "the authors' pipeline end to end (their encoder and decoder numerics, no mask refinement). "
            "Default: the fast path (ONNX Runtime or fused TinyViT encoder, fused decoder: same masks as --exact "
            "at mean Dice >= 0.999 on one view) and small boxes answered from zoomed crops (docs/accuracy.md)"
        ),
    )
    p.add_argument("--fast", action="store_true", help="no effect, kept for old scripts: the fast path is the default")


def _version() -> str:
    """The installed napari-medsam version, from the package metadata (the CLI never imports the top-level package)."""
    try:
        return version("napari-medsam")
    except PackageNotFoundError:  # a source tree that was not installed
        return "0.0.0+unknown"


def build_parser() -> argparse.ArgumentParser:
    __version__ = _version()

    parser = argparse.ArgumentParser(prog=PROG, description="Box-prompted MedSAM / LiteMedSAM segmentation.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser(
        "segment",
        help="segment one image from one box",
        description="Segment one image (or one volume) from a box prompt.",
    )
    s.add_argument("image", help="PNG/JPEG/BMP, TIFF, NIfTI or DICOM file (or DICOM folder)")
    s.add_argument("--box", required=True, metavar="x0,y0,x1,y1", help="inclusive pixel bounds (x = column, y = row)")
    s.add_argument(
        "-o", "--output", required=True, metavar="MASK", help="output label file (.tif, .nii.gz or .png); 1 = object"
    )
    s.add_argument("--modality", default="auto", help="auto, ct, mr, rgb, ultrasound, xray, ... (default auto)")
    s.add_argument(
        "--window", metavar="L,W|PRESET", help="CT window 'level,width' or a preset (soft_tissue, lung, brain, ...)"
    )
    s.add_argument(
        "--channels",
        metavar="C[,C[,C]]",
        help=(
            "multichannel image, channel axis first (e.g. a CYX TIFF): channels combined as red, green, blue, "
            "each scaled on its own (--modality/--window apply per channel)"
        ),
    )
    s.add_argument("--slice", type=int, metavar="Z", help="volume: index (axis 0) of the slice the box is on")
    s.add_argument("--propagate", action="store_true", help="volume: segment the object in 3D from the key slice")
    s.add_argument("--z-range", metavar="FIRST,LAST", help="volume: limit propagation to these slices")
    _model_options(s)
    _fast_option(s)

    b = sub.add_parser(
        "batch",
        help="segment every row of a prompts CSV",
        description=(
            "Segment every row of a prompts CSV (columns image, box; optional modality, window, slice, propagate, "
            "z_range, gt, gt_select, name). Writes DIR/<name>.tif and DIR/summary.csv."
        ),
    )
    b.add_argument("prompts", help="prompts CSV; relative paths are resolved against its folder")
    b.add_argument("--out-dir", required=True, metavar="DIR", help="folder for masks and summary.csv")
    _model_options(b)
    _fast_option(b)
    par = b.add_mutually_exclusive_group()
    par.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="run on a local Dask cluster of N processes (needs napari-medsam[dask])",
    )
    par.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="run on this Dask scheduler, e.g. tcp://host:8786 (needs napari-medsam[dask])",
    )
    b.add_argument("--cache-dir", metavar="DIR", help="on-disk embedding cache shared by workers and later runs")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")

    w = sub.add_parser(
        "serve",
        help="serve the labeling session of a folder to web browsers",
        description=(
            "Serve the labeling session of IMAGES (labels, records, autosave, resume in OUT) to any browser; "
            "the mask follows the box while it is dragged (docs/web.md)."
        ),
    )
    w.add_argument("images", help="folder of images (or a list file), as for the napari session")
    w.add_argument("--out", required=True, metavar="OUT", help="session folder: labels/, records/, session.json")
    w.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; others require a token)"
    )
    w.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    w.add_argument("--token", help="access token (default: none on 127.0.0.1, generated and printed otherwise)")
    _model_options(w)

    pc = sub.add_parser(
        "precompute",
        help="fill a disk embedding cache for a folder of images or a volume",
        description=(
            "Run the image encoder once per 2D image and per volume slice of IMAGES and store the embeddings in "
            "--cache-dir, so later `batch --cache-dir`, sessions and 3D propagation with that folder skip the encoder."
        ),
    )
    pc.add_argument("images", help="folder of images, an image file or a volume (NIfTI, TIFF stack, DICOM folder)")
    pc.add_argument(
        "--cache-dir", required=True, metavar="DIR", help="disk embedding cache folder (created if missing)"
    )
    pc.add_argument("--modality", default="auto", help="auto, ct, mr, rgb, ultrasound, xray, ... (default auto)")
    pc.add_argument("--window", metavar="L,W|PRESET", help="CT window 'level,width' or a preset")
    pc.add_argument("--slice", type=int, metavar="Z", help="volumes: encode from this slice outward")
    pc.add_argument("--no-progress", action="store_true", help="no progress bar")
    _model_options(pc)
    _fast_option(pc)

    se = sub.add_parser(
        "session",
        help="open (resume) a labeling session: progress, repairs, export",
        description=(
            "Open the labeling session in OUT: finishes or undoes a save a crash interrupted, sets damaged records "
            "aside (each reported on stderr), prints the progress; --export writes MedSAM training data (npz + CSV)."
        ),
    )
    se.add_argument("out", metavar="OUT", help="session folder (labels/, records/, session.json)")
    se.add_argument("--images", help="image folder or list file (default: the one the session was made from)")
    se.add_argument("--export", nargs="?", const="", metavar="DIR", help="export to DIR (default OUT/export)")

    sub.add_parser("models", help="list models and where their weights are (never downloads)")

    d = sub.add_parser("download", help="download and verify a model's weights (explicit; needs internet)")
    d.add_argument("model", help="registered model name, e.g. medsam")

    m = sub.add_parser("demo", help="segment the bundled ultrasound sample and write a mask and an overlay")
    m.add_argument(
        "-o", "--out-dir", default="medsam-demo", metavar="OUT_DIR", help="output folder (default ./medsam-demo)"
    )
    _model_options(m)
    return parser
