"""The ``napari-medsam`` subcommands: each takes the parsed arguments and returns the exit status."""

from __future__ import annotations

import argparse
import sys

from .parser import PROG


def _fmt_s(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} s"


def cmd_segment(a: argparse.Namespace) -> int:
    from napari_medsam.engine.batch import BatchError, ImageSegmenter, load_model, parse_box_text, parse_z_range
    from napari_medsam.engine.io import read_image, write_labels

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
    print(
        f"wrote {out}: {int(seg.mask.sum())} object pixels of {seg.mask.size}{iou}; "
        f"encode {_fmt_s(seg.encode_s)}, decode {_fmt_s(seg.decode_s)} ({model.name} on {model.device})"
    )
    return 0


def _composed(image, channels: str, modality: str, window):
    """ImageData with its first axis taken as channels -> RGB ImageData the model reads as is."""
    import dataclasses

    from napari_medsam.engine.errors import ImageError
    from napari_medsam.engine.intensity import compose_channels

    if image.kind == "rgb":
        raise ImageError(f"--channels needs a multichannel image (channel axis first), {image.path} is RGB")
    rgb = compose_channels(image.array, channels, axis=0, modality=modality, window=window)
    spacing = image.spacing[1:] if image.spacing else None
    kind = "rgb" if rgb.ndim == 3 else "volume"
    return dataclasses.replace(image, array=rgb, spacing=spacing, kind=kind, affine=None), "rgb", None


def cmd_batch(a: argparse.Namespace) -> int:
    from napari_medsam.engine.batch import run_batch

    res = run_batch(
        a.prompts,
        a.out_dir,
        model=a.model,
        device=a.device,
        checkpoint=a.checkpoint,
        workers=a.workers,
        scheduler=a.scheduler,
        cache_dir=a.cache_dir,
        progress=not a.no_progress,
        exact=a.exact,
    )
    print(
        f"{len(res.rows)} rows: {res.n_ok} ok, {res.n_failed} failed in {res.seconds:.1f} s; "
        f"masks in {res.out_dir}, summary {res.summary_path}"
    )
    per = res.by_modality()
    if per:
        print(f"{'modality':16s} {'n':>4s} {'Dice':>7s} {'NSD':>7s}")
        for mod, v in per.items():
            print(f"{mod:16s} {v['n']:4d} {v['dice']:7.4f} {v['nsd']:7.4f}")
    return res.exit_code


def cmd_models(a: argparse.Namespace) -> int:
    from napari_medsam.engine.errors import CheckpointError
    from napari_medsam.engine.models.registry import REGISTRY

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
    from napari_medsam.engine.batch import model_spec

    spec = model_spec(a.model)
    path = spec.locate_checkpoint(None, allow_download=True)
    print(f"{spec.name}: {path} (verified)")
    return 0


def cmd_session(a: argparse.Namespace) -> int:
    import logging

    from napari_medsam.engine.session import LabelingSession, export_session

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
    from napari_medsam.server.serve import serve

    return serve(a.images, a.out, a.host, a.port, a.model, a.device, a.checkpoint, a.token)


def cmd_precompute(a: argparse.Namespace) -> int:
    from napari_medsam.engine.precompute import precompute

    res = precompute(
        a.images,
        a.cache_dir,
        a.model,
        a.device,
        a.checkpoint,
        modality=a.modality,
        window=a.window,
        start_slice=a.slice,
        exact=a.exact,
        progress=not a.no_progress,
    )
    for name, why in res.failed:
        print(f"napari-medsam: {name}: {why}", file=sys.stderr)
    print(
        f"{res.images} images, {res.planes} planes: {res.encoded} encoded, {res.cached} already cached, "
        f"{len(res.failed)} failed in {res.seconds:.1f} s; cache {res.cache_dir}"
    )
    return 1 if res.failed else 0


def cmd_demo(a: argparse.Namespace) -> int:
    from napari_medsam.engine.batch import run_demo

    r = run_demo(a.out_dir, a.model, a.device, a.checkpoint)
    x0, y0, x1, y1 = (int(v) for v in r.box)
    print(f"{r.model} on {r.device}: bundled breast ultrasound sample, box {x0},{y0},{x1},{y1}")
    print(f"model load {r.load_s:.2f} s, encode {r.encode_s:.3f} s, decode {r.decode_s:.3f} s")
    print(f"predicted IoU {r.iou:.3f}, Dice vs ground truth {r.dice:.3f}")
    print(f"wrote {r.mask_path}")
    print(f"wrote {r.overlay_path}")
    return 0


COMMANDS = {
    "segment": cmd_segment,
    "batch": cmd_batch,
    "models": cmd_models,
    "download": cmd_download,
    "demo": cmd_demo,
    "precompute": cmd_precompute,
    "serve": cmd_serve,
    "session": cmd_session,
}
