"""One image read once, answering many box prompts: :class:`ImageSegmenter`; and loading a model by name.

Used by the command line's ``segment``, by batch runs (one segmenter per image
group) and by the demo. No Qt, no napari.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import validate
from .cache import Embedding, EmbeddingCache
from .errors import BatchError, ImageError, MedSAMError
from .intensity import WindowLike, convert, gray_to_rgb, model_input, parse_window
from .io import ImageData
from .models.registry import ModelSpec, get_spec
from .predictor import MedSAM, pick_device
from .types import Segmenter
from .validate import parse_box
from .volume import segment_volume
from .zoom import DEFAULT as ZOOM_DEFAULT
from .zoom import segment_box

Box = tuple[float, float, float, float]


# ---------------------------------------------------------------------------
# prompt text: one home in engine.validate; these names stay for old imports
# ---------------------------------------------------------------------------
def parse_box_text(text: Any) -> Box:
    """``"x0,y0,x1,y1"`` (or a 4-sequence) -> four finite floats; :class:`BoxError` otherwise.

    See :func:`engine.validate.parse_box`.
    """
    return parse_box(text)


def parse_z_range(text: Any, what: str = "z_range") -> tuple[int, int]:
    """``"first,last"`` -> (low, high) slice indices; :class:`BoxError` (a ValueError) naming ``what``.

    See :func:`engine.validate.parse_z_range` (no ``assert``: holds under ``python -O``).
    """
    return validate.parse_z_range(text, what=what)


# ---------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------
def check_device(device: str) -> str:
    """``device`` normalised (``auto`` kept); :class:`BatchError` when it is unknown or absent here.

    The one device rule is :func:`engine.predictor.pick_device` (a :class:`ModelError` there).
    """
    dev = (device or "auto").strip().lower()
    if dev == "auto":
        return dev
    try:
        pick_device(dev)
    except MedSAMError as exc:
        raise BatchError(str(exc)) from None
    return dev


def model_spec(name: str) -> ModelSpec:
    """The registry entry of ``name``; :class:`BatchError` naming the known ones otherwise."""
    try:
        return get_spec(name)
    except KeyError as exc:
        raise BatchError(str(exc.args[0])) from None


def load_model(
    model: str | MedSAM = "litemedsam",
    device: str = "auto",
    checkpoint: str | None = None,
    cache: EmbeddingCache | None = None,
    fast: bool = False,
    exact: bool = False,
) -> MedSAM:
    """A :class:`MedSAM` from a registry name (an existing instance is returned as is).

    ``exact``: the authors' pipeline end to end (``MedSAM.load(exact=True)``); default: the
    fastest path that keeps the masks. ``fast``: accepted for compatibility, no effect (the
    fast path is the default).
    """
    if isinstance(model, MedSAM):
        return model
    spec = model_spec(model)
    return MedSAM.load(spec.name, check_device(device), checkpoint, cache=cache, exact=exact)


# ---------------------------------------------------------------------------
# one image, many boxes
# ---------------------------------------------------------------------------
def uses_zoom(model: Any) -> bool:
    """Boxes are answered by :func:`engine.zoom.segment_box` (as ``MedSAM.segment(image)`` does):
    LiteMedSAM not loaded ``exact``. Else the authors' pipeline: one decode on the full view."""
    return not getattr(model, "exact", False) and getattr(model, "name", None) == "litemedsam"


def crops_only(model: Any, shape: Sequence[int]) -> bool:
    """A plane of ``shape`` (H, W[, C]) is never encoded whole: a zoomed model and a side over the
    zoom's ``large_side`` (a slide or mosaic; a full view at 256 px would see nothing of a small object)."""
    return uses_zoom(model) and max(int(shape[0]), int(shape[1])) > ZOOM_DEFAULT.large_side


@dataclass
class Segmentation:
    """A mask for one prompt and what it cost.

    Attributes:
        mask: bool, the image's spatial shape ((H, W) or (Z, H, W)).
        iou: decoder's predicted IoU (3D propagation: on the key slice).
        encode_s / decode_s: seconds in the encoder (0 when the embedding was reused) and
            decoder; None for 3D propagation (many slices: see ``stats`` and the row's total).
    """

    mask: np.ndarray
    iou: float | None
    encode_s: float | None
    decode_s: float | None
    box: np.ndarray | None = None
    stats: dict[str, Any] | None = None  # 3D propagation: encoder counters, per-slice trace (see engine.volume)


class ImageSegmenter:
    """One image read once, with its embeddings, answering many prompts."""

    def __init__(self, model: Segmenter, image: ImageData):
        self.model = model
        self.image = image
        self._emb: dict[tuple, Embedding] = {}
        self._u8: dict[tuple, np.ndarray] = {}

    @property
    def is_volume(self) -> bool:
        return self.image.kind == "volume"

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return self.image.spatial_shape

    def _embedding(self, key: tuple, make: Callable[[], Embedding]) -> tuple[Embedding, float]:
        if key in self._emb:
            return self._emb[key], 0.0
        t0 = time.perf_counter()
        emb = make()
        self._emb[key] = emb
        return emb, time.perf_counter() - t0

    def _volume_u8(self, modality: str, window: WindowLike) -> np.ndarray:
        key = (modality, parse_window(window))
        if key not in self._u8:
            self._u8[key] = convert(self.image.array, "volume", modality, window).pixels  # the one uint8 path
        return self._u8[key]

    def segment(
        self,
        box: str | Sequence[float],
        modality: str = "auto",
        window: WindowLike = None,
        slice: int | None = None,
        propagate: bool = False,
        z_range: tuple[int, int] | None = None,
    ) -> Segmentation:
        b = parse_box(box)  # text or numbers; BoxError naming anything else
        win = parse_window(window)
        if not self.is_volume:
            if slice is not None or propagate:
                raise ImageError(
                    f"slice/propagate given but {self.image.path} is a 2D image of shape {self.image.array.shape}"
                )
            key = ("2d", modality, win)
            if key not in self._u8:  # what MedSAM.embed / prepare convert the image to
                self._u8[key] = model_input(self.image.array, "image", modality, win)
            rgb = self._u8[key]
            if crops_only(self.model, rgb.shape):  # a slide: no full view (it would see nothing at 256 px)
                t0 = time.perf_counter()
                mask, iou, used = self._decode(None, rgb, b)
                return Segmentation(mask, iou, 0.0, time.perf_counter() - t0, used)
            emb, enc = self._embedding(key, lambda: self.model.embed_rgb(rgb))
            t0 = time.perf_counter()
            mask, iou, used = self._decode(emb, rgb, b)
            return Segmentation(mask, iou, enc, time.perf_counter() - t0, used)
        depth = self.image.array.shape[0]
        if slice is None:
            raise ImageError(
                f"{self.image.path} is a volume of shape {self.image.array.shape}: "
                f"give the slice (0..{depth - 1}) the box is on"
            )
        if not 0 <= slice < depth:
            raise ImageError(f"slice {slice} is outside the volume (0..{depth - 1})")
        if propagate:
            return self._propagate(b, modality, win, slice, z_range)
        # one slice of a volume: intensity rule over the whole volume, as the authors do
        u8 = self._volume_u8(modality, win)[slice]
        if u8.min() == u8.max():
            raise ImageError(f"slice {slice} is constant after the intensity rule: nothing to segment")
        rgb = gray_to_rgb(u8)
        emb, enc = self._embedding(("slice", modality, win, slice), lambda: self.model.embed_rgb(rgb))
        t0 = time.perf_counter()
        mask = np.zeros(self.spatial_shape, bool)
        mask[slice], iou, used = self._decode(emb, rgb, b)
        return Segmentation(mask, iou, enc, time.perf_counter() - t0, used)

    def _decode(self, emb: Embedding | None, rgb: np.ndarray, box: Box) -> tuple[np.ndarray, float, np.ndarray]:
        """(mask, predicted IoU, box as used) as ``MedSAM.segment(rgb, box=...)`` answers: LiteMedSAM
        not ``exact``: the zoom strategy (:func:`engine.zoom.segment_box`, crops encoded here, their
        time in ``decode_s``); else (``--exact``, other models) one decode on the full view.
        ``emb`` None: no full view (:func:`crops_only`, a zoomed model)."""
        if not uses_zoom(self.model):
            assert emb is not None  # crops_only holds for zoomed models only
            pred = self.model.predict(emb, box)
            return pred.masks[0], float(pred.iou[0]), pred.boxes[0]
        mask, info = segment_box(self.model, rgb, box, full_embedding=emb)
        return mask, float(np.mean(info.iou)), validate.normalize_boxes(box, rgb.shape[:2])[0]

    def _propagate(
        self, box: Sequence[float], modality: str, win: WindowLike, slice: int, z_range: tuple[int, int] | None
    ) -> Segmentation:
        stats: dict[str, Any] = {}
        kwargs: dict[str, Any] = {"modality": modality, "window": win, "stats": stats}
        if z_range is not None:
            kwargs["z_range"] = z_range
        mask = np.asarray(segment_volume(self.model, self.image.array, box, slice, **kwargs)).astype(bool)
        if mask.shape != self.spatial_shape:
            raise ImageError(f"3D propagation returned shape {mask.shape}, expected {self.spatial_shape}")
        key = [s for s in stats.get("slices", []) if s.get("direction") == "key"]
        iou = float(key[0]["iou"]) if key and key[0].get("iou") is not None else None
        return Segmentation(mask, iou, None, None, np.asarray(box, float), stats)


ImageSession = ImageSegmenter  # the old name (engine.batch.ImageSession)

__all__ = [
    "ImageSegmenter",
    "ImageSession",
    "Segmentation",
    "check_device",
    "load_model",
    "model_spec",
    "parse_box_text",
    "parse_z_range",
]
