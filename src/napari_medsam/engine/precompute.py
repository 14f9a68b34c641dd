"""Fill a disk embedding cache ahead of time: every image of a folder, or every slice of a volume.

``napari-medsam precompute IMAGES --cache-dir DIR`` (or :func:`precompute`) runs the
image encoder once per 2D image / volume slice and stores the embeddings in
``DIR``, so a later ``napari-medsam batch --cache-dir DIR``, a session or a 3D
propagation with the same cache folder finds them without running the encoder.
The 8-bit conversion is the one those paths use (``MedSAM.prepare`` for 2D images,
volume-wide :func:`engine.volume.volume_to_uint8` for volumes) and the cache key
holds the model, the exact 8-bit pixels and the model's speed mode, so embeddings
made with ``exact=True`` and with the default fast path never mix.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cache import EmbeddingCache
from .errors import MedSAMError, ReadError, WriteError
from .intensity import WindowLike, gray_to_rgb
from .io import ImageData, read_image
from .predictor import MedSAM
from .session.inputs import list_images
from .volume import volume_to_uint8

log = logging.getLogger(__name__)

PathLike = str | Path


@dataclass
class PrecomputeResult:
    """What :func:`precompute` did.

    Attributes:
        images: images (files, DICOM series) read.
        planes: 2D images + volume slices seen.
        encoded: planes the encoder ran on.
        cached: planes already in the cache.
        failed: (name, reason) per image that could not be read or encoded.
        cache_dir: the disk cache folder.
        seconds: wall time.
    """

    images: int = 0
    planes: int = 0
    encoded: int = 0
    cached: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    cache_dir: Path | None = None
    seconds: float = 0.0


def outward(depth: int, start: int | None) -> list[int]:
    """Slice indices from ``start`` outward (start, start+1, start-1, ...); 0..depth-1 without one."""
    if start is None:
        return list(range(depth))
    if not 0 <= start < depth:
        raise MedSAMError(f"start slice {start} is outside the volume (0..{depth - 1})")
    order = [start]
    for d in range(1, depth):
        order += [z for z in (start + d, start - d) if 0 <= z < depth]
    return order


def planes(
    model: MedSAM, image: ImageData, modality: str = "auto", window: WindowLike = None, start: int | None = None
) -> Iterator[tuple[int | None, np.ndarray]]:
    """(slice index or None, (H, W, 3) uint8 model input) of every plane of ``image``."""
    if image.kind != "volume":
        yield None, model.prepare(image.array, modality, window)
        return
    u8, _, rgb = volume_to_uint8(image.array, modality, window)
    for z in outward(u8.shape[0], start):
        yield z, (np.ascontiguousarray(u8[z]) if rgb else gray_to_rgb(u8[z]))


def _sources(source: Path) -> list[tuple[Path, str]]:
    if not source.exists():
        raise ReadError(f"{source} does not exist")
    if source.is_dir():
        found = list_images(source)
        if not found:
            raise ReadError(f"{source} holds no image this reader knows")
        return found
    return [(source, source.name)]


def precompute(
    source: PathLike,
    cache_dir: PathLike,
    model: str | MedSAM = "litemedsam",
    device: str = "auto",
    checkpoint: str | None = None,
    *,
    modality: str = "auto",
    window: WindowLike = None,
    start_slice: int | None = None,
    exact: bool = False,
    progress: bool = True,
) -> PrecomputeResult:
    """Encode every image under ``source`` (a folder, an image file or a volume) into ``cache_dir``.

    Args:
        model: registry name, or a loaded :class:`MedSAM` (its speed mode then decides the keys).
        modality, window: the intensity rule, as for ``segment`` / ``batch``.
        start_slice: volumes are encoded from this slice outward (default: first to last).
        exact: load the model with the authors' pipeline (``MedSAM.load(exact=True)``);
            its embeddings serve only ``--exact`` runs.
        progress: a tqdm bar on stderr, one step per plane.

    Raises:
        MedSAMError: ``source`` is missing or holds no image, or the cache folder cannot be written.
    """
    from tqdm import tqdm

    t0 = time.perf_counter()
    entries = _sources(Path(source).expanduser())
    cache = EmbeddingCache(max_bytes=64 << 20, disk_dir=Path(cache_dir).expanduser())
    if not cache.disk_writable:
        raise WriteError(f"cannot write the embedding cache folder {cache_dir}: {cache.disk_error}")
    if isinstance(model, MedSAM):
        m, saved = model, model.cache
    else:
        from .segment import load_model

        m = load_model(model, device, checkpoint, exact=exact)
        saved = m.cache
    res = PrecomputeResult(cache_dir=cache.disk_dir)
    bar = tqdm(total=len(entries), desc="napari-medsam precompute", unit="plane", disable=not progress, file=sys.stderr)
    m.cache = cache
    try:
        for path, name in entries:
            try:
                image = read_image(path)
                res.images += 1
                if image.kind == "volume":
                    bar.total += image.array.shape[0] - 1
                    bar.refresh()
                for _z, rgb in planes(m, image, modality, window, start_slice):
                    _, ran = m.embed_rgb_status(rgb)
                    res.planes += 1
                    res.encoded += int(ran)
                    res.cached += int(not ran)
                    bar.update(1)
            except MedSAMError as exc:
                res.failed.append((name, str(exc)))
                bar.update(1)
            if not cache.disk_writable:
                raise WriteError(f"writing the embedding cache {cache_dir} failed: {cache.disk_error}")
    finally:
        m.cache = saved
        bar.close()
    res.seconds = time.perf_counter() - t0
    return res
