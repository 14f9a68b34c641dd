"""Zoomed box segmentation: re-encode a square crop around a small box (issue #14).

LiteMedSAM sees every image at 256 pixels on its long side, so a 20-pixel nucleus in
a 1000-pixel slide reaches the model as 5 pixels. :func:`segment_box` encodes a square
crop of ``context`` times the box's long side instead (at least ``min_crop`` pixels),
decodes the box there and pastes the mask back. Crop sides come from a fixed ladder
(``min_crop * sqrt(2) ** i``) and crop origins from a grid of a quarter of the side, so
neighbouring boxes land on the same crop and share one encode through the model's
:class:`~napari_medsam.engine.cache.EmbeddingCache` (the key is a hash of the crop's
pixels). Every threshold in :data:`DEFAULT` was chosen by leave-one-dataset-out
cross-validation (``benchmarks/better_masks.py``, ``docs/accuracy.md``).

``MedSAM.segment`` uses this path unless the model is exact (the authors' pipeline).
Qt-free; the plugin and the browser server call :func:`segment_box` on accept.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .cache import Embedding
from .errors import ImageError
from .intensity import gray_to_rgb
from .validate import normalize_boxes

Window = tuple[int, int, int, int]  # y0, y1, x0, x1 (half-open), image pixels
BoxArg = Sequence[float] | np.ndarray  # (x0, y0, x1, y1)


@dataclass(frozen=True)
class ZoomSettings:
    """Parameters of the zoom strategy (defaults: the cross-validated choice, docs/accuracy.md).

    Attributes:
        contexts: one crop per value: side = value x the box's long side, snapped up the
            ladder; equal crops are encoded once.
        min_crop: smallest crop side in image pixels (the ladder starts here).
        stride: crop origins lie on a grid of ``side // stride`` pixels.
        with_full: the full-view mask votes too (not on large images).
        lenient: a tie of the pixel-wise vote counts as object (else a strict majority).
        min_zoom: zoom only when the first crop is at least this many times smaller than
            the image's long side (else the full view alone is answered).
        full_iou: the full view alone is answered when its predicted IoU is at least this
            (a confident full view of a clear object, e.g. a fundus disc); ``None``: never.
        fill_holes: fill enclosed holes of the final mask.
        large_side: images with a longer side than this are never encoded whole: every
            box goes through the crops only (slides, mosaics).
        share: a crop already encoded for this image is used instead of the snapped one
            when it holds the box with a margin of ``share_margin`` x its side and its side is
            within ``share_ratio`` of the wanted one (neighbours reuse one encode; these two
            were set on the bundled nuclei sample, not cross-validated).
    """

    contexts: tuple[float, ...] = (1.5, 2.0, 3.0)
    min_crop: int = 64
    stride: int = 4
    with_full: bool = True
    lenient: bool = True
    min_zoom: float = 1.5
    full_iou: float | None = 0.9
    fill_holes: bool = True
    large_side: int = 4096
    share: bool = True
    share_ratio: float = 1.5
    share_margin: float = 0.0625

    @property
    def context(self) -> float:
        return self.contexts[0]


DEFAULT = ZoomSettings()


@dataclass
class ZoomInfo:
    """What :func:`segment_box` did for one box.

    ``path``: ``full`` (the full view alone), ``zoom`` (crops and the full view voted) or
    ``crop-only`` (a large image: crops alone). ``window``: where the mask can be non-zero
    (y0, y1, x0, x1). ``encodes``: encoder passes this box caused (crop cache misses).
    """

    path: str
    window: Window
    zoom: float = 1.0
    crops: list[Window] = field(default_factory=list)
    iou: list[float] = field(default_factory=list)
    encodes: int = 0

    @property
    def encoded(self) -> bool:
        return self.encodes > 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def crop_side(box_side: float, settings: ZoomSettings = DEFAULT, context: float | None = None) -> int:
    """Crop side for a box of long side ``box_side``: the first ladder rung >= context x side."""
    want = max((settings.context if context is None else context) * box_side, settings.min_crop)
    i = max(0, math.ceil(2 * math.log2(want / settings.min_crop) - 1e-9))
    return round(settings.min_crop * math.sqrt(2) ** i)


def _snap_axis(lo: float, hi: float, side: int, n: int, stride_div: int = 4) -> tuple[int, int]:
    """[start, stop) of a crop of ``side`` pixels around [lo, hi] on an axis of ``n``."""
    if side >= n:
        return 0, n
    stride = max(1, side // stride_div)
    centre = (lo + hi + 1) / 2.0
    start = round((centre - side / 2.0) / stride) * stride
    # the grid may push the box out by up to stride/2: keep the box inside
    if start > lo:
        start = math.floor(lo / stride) * stride
    if start + side < hi + 1:
        start = math.ceil((hi + 1 - side) / stride) * stride
    start = min(max(0, start), n - side)
    return start, start + side


def crop_window(
    box: BoxArg, shape: tuple[int, int], settings: ZoomSettings = DEFAULT, context: float | None = None
) -> Window:
    """The snapped square crop (y0, y1, x0, x1) for ``box`` = (x0, y0, x1, y1) on an (H, W) image."""
    x0, y0, x1, y1 = (float(v) for v in box)
    side = crop_side(max(x1 - x0 + 1, y1 - y0 + 1), settings, context)
    h, w = int(shape[0]), int(shape[1])
    cy0, cy1 = _snap_axis(y0, y1, side, h, settings.stride)
    cx0, cx1 = _snap_axis(x0, x1, side, w, settings.stride)
    return cy0, cy1, cx0, cx1


def zoom_factor(window: Window, shape: tuple[int, int]) -> float:
    """How many times sharper the crop is than the full view at the model input."""
    return max(shape[0], shape[1]) / max(window[1] - window[0], window[3] - window[2])


def read_crop(image: Any, window: Window) -> np.ndarray:
    """The (h, w, 3) uint8 pixels of ``window`` from an (H, W, 3) or (H, W) uint8 array-like.

    Only the window is read: numpy memmaps, dask and zarr arrays are sliced, never loaded whole.
    """
    y0, y1, x0, x1 = window
    crop = np.asarray(image[y0:y1, x0:x1])
    if crop.dtype != np.uint8:
        raise ImageError(f"the zoom path reads prepared 8-bit images, got {crop.dtype} (use model.prepare)")
    if crop.ndim == 2:
        return gray_to_rgb(crop)
    return np.ascontiguousarray(crop[:, :, :3])


def encode_window(model: Any, image: Any, window: Window) -> tuple[Embedding, bool]:
    """Embedding of the crop ``window`` of ``image`` (through the model's cache); (emb, encoded)."""
    crop = read_crop(image, window)
    if crop.shape[0] < 2 or crop.shape[1] < 2 or crop.min() == crop.max():
        raise ImageError(f"the crop {window} around the box is constant or too small: nothing to segment")
    emb, encoded = model.embed_rgb_status(crop)
    return emb, bool(encoded)


def decode_window(model: Any, emb: Embedding, window: Window, box: BoxArg) -> tuple[np.ndarray, float]:
    """Mask inside ``window`` (shape of the crop) and predicted IoU for an image-space box."""
    y0, _, x0, _ = window
    x_0, y_0, x_1, y_1 = (float(v) for v in box)
    pred = model.predict(emb, (x_0 - x0, y_0 - y0, x_1 - x0, y_1 - y0))
    return pred.masks[0], float(pred.iou[0])


def touches_crop_edge(mask: np.ndarray, window: Window, shape: tuple[int, int]) -> bool:
    """The crop mask reaches a crop edge that is not also an edge of the image."""
    y0, y1, x0, x1 = window
    edges = []
    if y0 > 0:
        edges.append(mask[0, :])
    if y1 < shape[0]:
        edges.append(mask[-1, :])
    if x0 > 0:
        edges.append(mask[:, 0])
    if x1 < shape[1]:
        edges.append(mask[:, -1])
    return any(bool(e.any()) for e in edges)


def paste(mask: np.ndarray, window: Window, shape: tuple[int, int]) -> np.ndarray:
    """A crop mask placed into an all-False (H, W) mask."""
    out = np.zeros(shape, bool)
    y0, y1, x0, x1 = window
    out[y0:y1, x0:x1] = mask
    return out


def fill_holes(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    return np.asarray(ndimage.binary_fill_holes(mask))


def _image_shape(image: Any) -> tuple[int, int]:
    shape = tuple(int(v) for v in image.shape)
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (3, 4)):
        raise ImageError(f"segment_box wants a prepared (H, W, 3) or (H, W) uint8 image, got shape {shape}")
    return shape[0], shape[1]


def holds(window: Window, box: BoxArg, shape: tuple[int, int], margin: float) -> bool:
    """``window`` holds ``box`` with ``margin`` x its side free on every side inside the image."""
    y0, y1, x0, x1 = window
    bx0, by0, bx1, by1 = (float(v) for v in box)
    m = margin * max(y1 - y0, x1 - x0)
    return (
        (bx0 - x0 >= m or x0 == 0)
        and (x1 - 1 - bx1 >= m or x1 == shape[1])
        and (by0 - y0 >= m or y0 == 0)
        and (y1 - 1 - by1 >= m or y1 == shape[0])
    )


def _shared(want: Window, box: BoxArg, shape: tuple[int, int], known: Sequence[Window], s: ZoomSettings) -> Window:
    """``want`` if it is known, else the known crop closest in size that may stand in for it, else ``want``."""
    if want in known:
        return want
    side = max(want[1] - want[0], want[3] - want[2])
    best, best_r = want, math.inf
    for w in known:
        r = abs(math.log(max(w[1] - w[0], w[3] - w[2]) / side))
        if r <= math.log(s.share_ratio) + 1e-9 and r < best_r and holds(w, box, shape, s.share_margin):
            best, best_r = w, r
    return best


def context_windows(
    box: BoxArg, shape: tuple[int, int], settings: ZoomSettings = DEFAULT, known: Sequence[Window] = ()
) -> list[Window]:
    """One crop per context of ``settings.contexts`` (equal ones repeated: each votes).

    Each is the snapped :func:`crop_window`, or with ``settings.share`` one of the ``known``
    (already encoded) crops that holds the box at about the same scale.
    """
    out = []
    for ctx in settings.contexts:
        w = crop_window(box, shape, settings, ctx)
        out.append(_shared(w, box, shape, known, settings) if settings.share and known else w)
    return out


def crop_windows(
    box: BoxArg, shape: tuple[int, int], settings: ZoomSettings = DEFAULT, known: Sequence[Window] = ()
) -> list[Window]:
    """The distinct crops :func:`segment_box` encodes for ``box`` (of :func:`context_windows`)."""
    return list(dict.fromkeys(context_windows(box, shape, settings, known)))


_MAX_KNOWN = 4096


_KNOWN_LOCK = threading.Lock()  # accepts may come from several threads (server requests, workers)


def known_windows(model: Any, image: Any, full_embedding: Embedding | None = None) -> list[Window]:
    """The crops encoded so far for ``image`` through ``model`` (most recent last).

    Keyed by the full-view embedding's cache key when there is one (a hash of the image's
    pixels: the same image passed as a new array object still shares), else by the image
    object itself. Only which crop is chosen depends on this; the crop's embedding always
    comes from the cache keyed by the crop's pixels.
    """
    shape = tuple(int(v) for v in image.shape)
    key: Any = (full_embedding.key, shape) if full_embedding is not None and full_embedding.key else (id(image), shape)
    owner = None if isinstance(key[0], str) else image
    with _KNOWN_LOCK:
        reg = getattr(model, "_zoom_windows", None)
        if not isinstance(reg, dict):
            reg = {}
            try:
                model._zoom_windows = reg
            except AttributeError:
                return []
        hit = reg.get(key)
        if hit is None or (owner is not None and hit[0] is not owner):  # a new object that reuses a freed id
            if len(reg) >= 8:
                reg.pop(next(iter(reg)))
            hit = reg[key] = (owner, [])
        out: list[Window] = hit[1]
        return out


def segment_box(
    model: Any,
    image: Any,
    box: BoxArg,
    full_embedding: Embedding | None = None,
    settings: ZoomSettings = DEFAULT,
    full_size: bool = True,
) -> tuple[np.ndarray, ZoomInfo]:
    """Mask for one box with the zoom strategy, and what was done.

    The box is decoded in the full view (unless the image is large); when that answer is
    confident (predicted IoU >= ``settings.full_iou``) or the crops would zoom less than
    ``settings.min_zoom``, it is the answer. Else the box is decoded in each crop of
    :func:`crop_windows` too and the masks vote pixel by pixel (a tie counts as object with
    ``settings.lenient``) and enclosed holes are filled.

    Args:
        model: a loaded :class:`~napari_medsam.engine.predictor.MedSAM`.
        image: the prepared (H, W, 3) uint8 image (``model.prepare``), or an (H, W) uint8
            plane; any array-like that slices (numpy memmap, dask, zarr): only crops are read.
        box: (x0, y0, x1, y1) inclusive pixel bounds, x = column.
        full_embedding: the full-view embedding when one exists already (the interactive
            case); else it is encoded when needed (through the cache). Images with a side
            over ``settings.large_side`` never get one.
        full_size: return an (H, W) mask; ``False``: only the part inside ``info.window``
            (what a 10,000-pixel slide wants).
    """
    shape = _image_shape(image)
    whole: Window = (0, shape[0], 0, shape[1])
    b = normalize_boxes(box, shape)[0]
    z = zoom_factor(crop_window(b, shape, settings), shape)  # the snapped crop decides, not the history
    large = max(shape) > settings.large_side
    masks: list[np.ndarray] = []
    info = ZoomInfo("crop-only" if large else "zoom", whole, z)
    use_full = not large and (settings.with_full or z < settings.min_zoom)
    if use_full:
        emb = full_embedding
        if emb is None:
            emb, encoded = model.embed_rgb_status(read_crop(image, whole))
            info.encodes += int(encoded)
        m, iou = decode_window(model, emb, whole, b)
        if z < settings.min_zoom or (settings.full_iou is not None and iou >= settings.full_iou):
            info.path, info.iou = "full", [iou]
            return _finish(m, whole, info, shape, settings, full_size)
        masks.append(m)
        info.iou.append(iou)
    known = known_windows(model, image, emb if use_full else None) if settings.share else []
    per_ctx = context_windows(b, shape, settings, known)
    wins = list(dict.fromkeys(per_ctx))
    region = wins[0] if large else whole
    for w in wins:
        region = (min(region[0], w[0]), max(region[1], w[1]), min(region[2], w[2]), max(region[3], w[3]))
    local: dict[Window, np.ndarray] = {}
    for w in wins:
        emb_c, encoded = encode_window(model, image, w)
        m, iou = decode_window(model, emb_c, w, b)
        info.encodes += int(encoded)
        info.iou.append(iou)
        if settings.share and w not in known:
            known.append(w)
            del known[:-_MAX_KNOWN]
        local[w] = np.zeros((region[1] - region[0], region[3] - region[2]), bool)
        local[w][w[0] - region[0] : w[1] - region[0], w[2] - region[2] : w[3] - region[2]] = m
    if use_full:  # the full-view mask, cut to the region (outside it no crop votes)
        masks[0] = masks[0][region[0] : region[1], region[2] : region[3]]
    masks += [local[w] for w in per_ctx]  # one vote per context: a crop wanted twice votes twice
    votes = np.sum(masks, axis=0) * 2
    fused = votes >= len(masks) if settings.lenient else votes > len(masks)
    info.crops = wins
    return _finish(fused, region, info, shape, settings, full_size)


def _finish(
    mask: np.ndarray, window: Window, info: ZoomInfo, shape: tuple[int, int], settings: ZoomSettings, full_size: bool
) -> tuple[np.ndarray, ZoomInfo]:
    if settings.fill_holes:
        mask = fill_holes(mask)
    if full_size and mask.shape != shape:
        mask = paste(mask, window, shape)
    if not full_size and mask.shape == shape and window == (0, shape[0], 0, shape[1]):
        ys, xs = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        if len(ys):  # the full-view path: cut to the mask's extent
            window = (int(ys[0]), int(ys[-1]) + 1, int(xs[0]), int(xs[-1]) + 1)
            mask = mask[window[0] : window[1], window[2] : window[3]]
    info.window = window
    return mask, info


def segment_boxes(
    model: Any, image: Any, boxes: Any, full_embedding: Embedding | None = None, settings: ZoomSettings = DEFAULT
) -> np.ndarray:
    """(N, H, W) bool masks for (x0, y0, x1, y1) or (N, 4) boxes, each by :func:`segment_box`.

    The full view is encoded at most once (and not at all for large images); crops shared by
    neighbouring boxes are encoded once through the model's cache.
    """
    shape = _image_shape(image)
    arr = normalize_boxes(boxes, shape)
    large = max(shape) > settings.large_side
    if full_embedding is None and not large:
        full_embedding = model.embed_rgb(read_crop(image, (0, shape[0], 0, shape[1])))
    out = np.zeros((len(arr), *shape), bool)
    for i, b in enumerate(arr):
        out[i] = segment_box(model, image, b, full_embedding, settings)[0]
    return out
