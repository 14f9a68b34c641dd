"""Intensity rules: raw pixels -> 8-bit, exactly as the MedSAM authors prepare data.

| modality  | rule |
|-----------|------|
| ``ct``    | clip to the window [L - W/2, L + W/2], min-max to [0, 255] |
| ``mr``    | clip to the 0.5..99.5th percentile of pixels > 0, min-max to [0, 255], zeros stay 0 |
| ``rgb``   | uint8 unchanged, anything else min-max to [0, 255]; alpha dropped |
| ``auto``  | see :func:`resolve_modality` |

The rules act on the whole array they are given: pass a whole volume to get
volume-wide percentiles (as the authors do), a slice for a 2D image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ImageError
from .validate import check_image, check_planes, check_volume

#: CT window presets (level, width) from the authors' 3D Slicer module.
CT_PRESETS = {
    "soft_tissue": (40.0, 400.0),
    "abdomen": (40.0, 400.0),
    "lung": (-600.0, 1500.0),
    "brain": (40.0, 80.0),
    "mediastinum": (50.0, 350.0),
}
DEFAULT_CT_WINDOW = CT_PRESETS["soft_tissue"]
MODALITIES = ("auto", "ct", "mr", "rgb")
# single-channel kinds that follow the MR percentile rule
_PERCENTILE_KINDS = {"mr", "ultrasound", "us", "xray", "x-ray", "fluorescence", "microscopy", "gray", "grey"}
_RGB_KINDS = {"rgb", "endoscopy", "dermoscopy", "fundus", "histology", "he"}

WindowLike = None | str | Sequence[float]


@dataclass(frozen=True)
class Intensity:
    """A resolved intensity rule; hashable, so it can be part of a cache key.

    Attributes:
        rule: ``"ct"``, ``"percentile"``, ``"rgb"`` or ``"uint8"`` (pass-through).
        window: (level, width) for ``"ct"``.
    """

    rule: str
    window: tuple[float, float] | None = None

    def describe(self) -> str:
        if self.rule == "ct" and self.window is not None:
            return f"ct window level {self.window[0]:g} width {self.window[1]:g}"
        return self.rule


def parse_window(window: WindowLike) -> tuple[float, float] | None:
    """A preset name, ``"level,width"`` or a (level, width) pair -> floats."""
    if window is None:
        return None
    if isinstance(window, str):
        key = window.strip().lower().replace(" ", "_").replace("-", "_")
        if key in CT_PRESETS:
            return CT_PRESETS[key]
        try:
            window = [float(v) for v in window.split(",")]
        except ValueError:
            raise ImageError(
                f"unknown CT window {window!r}: use one of {sorted(CT_PRESETS)} or 'level,width'"
            ) from None
    vals = tuple(float(v) for v in window)
    if len(vals) != 2 or not all(np.isfinite(vals)):
        raise ImageError(f"a CT window is (level, width), got {window!r}")
    if vals[1] <= 0:
        raise ImageError(f"CT window width must be positive, got {vals[1]:g}")
    return vals


def window_from_limits(low: float, high: float) -> tuple[float, float]:
    """Display contrast limits [low, high] -> (level, width)."""
    if not high > low:
        raise ImageError(f"contrast limits must rise, got [{low}, {high}]")
    return ((low + high) / 2.0, high - low)


def _is_8bit_range(image: np.ndarray) -> bool:
    if image.dtype == np.uint8:
        return True
    if np.issubdtype(image.dtype, np.integer) and image.size:
        return int(image.min()) >= 0 and int(image.max()) <= 255
    return False


def resolve_modality(
    image: np.ndarray, modality: str = "auto", window: WindowLike = None, rgb: bool = False
) -> Intensity:
    """Choose the intensity rule for ``image``.

    ``auto``: an explicit ``window`` means CT; integer data already in 0..255 (PNG,
    JPEG, 8-bit TIFF, CT stored windowed) goes in unchanged, as in the authors' 2D
    pipeline; other RGB data is min-maxed; other single-channel data with values
    below -500 is taken as CT in Hounsfield units (soft-tissue window 40/400);
    everything else follows the MR percentile rule.
    """
    mod = (modality or "auto").lower()
    win = parse_window(window)
    if mod == "ct" or (mod == "auto" and win is not None):
        return Intensity("ct", win or DEFAULT_CT_WINDOW)
    if win is not None:
        raise ImageError(f"a CT window was given but modality is {modality!r}")
    if mod in _RGB_KINDS:
        if not rgb:
            raise ImageError(f"modality {modality!r} needs an RGB image (H, W, 3), got shape {image.shape}")
        return Intensity("rgb")
    if mod in _PERCENTILE_KINDS:
        return Intensity("uint8") if image.dtype == np.uint8 else Intensity("percentile")
    if mod in ("uint8", "raw", "none"):
        return Intensity("uint8")
    if mod != "auto":
        raise ImageError(f"unknown modality {modality!r}: use one of {MODALITIES} (or mr/ultrasound/xray/endoscopy...)")
    if _is_8bit_range(image):
        return Intensity("uint8")
    if rgb:
        return Intensity("rgb")
    if float(np.min(image)) < -500:
        return Intensity("ct", DEFAULT_CT_WINDOW)
    return Intensity("percentile")


def _minmax_255(x: np.ndarray) -> np.ndarray:
    """Min-max ``x`` (float64) to [0, 255] for any finite range, however wide or narrow.

    A range wider than float64 can hold (e.g. -1.7e308..1.7e308: ``hi - lo`` is
    inf) is scaled into [-1, 1] first; a range narrower than 1e-8 (or made of
    denormals) is divided by its own width, not by a floor that would flatten it.
    A constant ``x`` gives zeros. Ordinary ranges take the exact arithmetic they
    always did, so masks do not change.
    """
    lo, hi = float(x.min()), float(x.max())
    span = hi - lo
    if not span > 0:
        return np.zeros(x.shape, dtype=np.float64)
    if math.isfinite(span):
        return (x - lo) / span * 255.0
    scale = max(abs(lo), abs(hi))  # finite: the values are
    xs, los, his = x / scale, lo / scale, hi / scale
    return np.clip((xs - los) / (his - los) * 255.0, 0.0, 255.0)


def _as_float64(image: np.ndarray) -> np.ndarray:
    if np.issubdtype(image.dtype, np.floating) and image.dtype.itemsize > 8 and image.size:
        big = float(np.max(np.abs(image)))  # long double: may hold values float64 cannot
        if not math.isfinite(big):
            raise ImageError(
                f"image of dtype {image.dtype} has values beyond the float64 range (|x| up to about 1.8e308): "
                "rescale it first"
            )
    return image.astype(np.float64, copy=False)


def to_uint8(image: np.ndarray, intensity: Intensity) -> np.ndarray:
    """Apply ``intensity`` to the whole of ``image``; returns uint8 of the same shape."""
    if intensity.rule == "uint8":
        if image.dtype == np.uint8:
            return image
        if not _is_8bit_range(image):
            raise ImageError(
                f"image of dtype {image.dtype} with values {image.min()}..{image.max()} is not 8-bit: "
                "choose modality 'ct', 'mr' or 'rgb'"
            )
        return image.astype(np.uint8)
    data = _as_float64(image)
    if intensity.rule == "ct":
        level, width = intensity.window or DEFAULT_CT_WINDOW
        out = _minmax_255(np.clip(data, level - width / 2.0, level + width / 2.0))
    elif intensity.rule == "percentile":
        positive = data[data > 0]
        if positive.size == 0:
            raise ImageError("image has no pixel above 0: the percentile rule (MR, ultrasound, X-ray) cannot scale it")
        lo, hi = np.percentile(positive, 0.5), np.percentile(positive, 99.5)
        out = _minmax_255(np.clip(data, lo, hi))
        out[data == 0] = 0
    elif intensity.rule == "rgb":
        out = _minmax_255(data)
    else:
        raise ImageError(f"unknown intensity rule {intensity.rule!r}")
    return out.astype(np.uint8)


def parse_channels(spec: str | Sequence[int] | None, n_channels: int) -> tuple[int, ...] | None:
    """``"0,2"``, ``"1"``, ``[0, 2]`` or ``None``/``""`` -> checked channel indices (None: no composition).

    At most three channels (they become R, G, B); negative indices count from the end.
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    if isinstance(spec, str):
        try:
            spec = [int(v) for v in spec.replace(" ", "").split(",") if v != ""]
        except ValueError:
            raise ImageError(f"channels must be indices like '0' or '0,2', got {spec!r}") from None
    picked = []
    for c in spec:
        c = int(c)
        if not -n_channels <= c < n_channels:
            raise ImageError(
                f"channel {c} does not exist: the channel axis has {n_channels} channels (0..{n_channels - 1})"
            )
        picked.append(c % n_channels)
    if not 1 <= len(picked) <= 3:
        raise ImageError(f"pick one to three channels (they become red, green, blue), got {len(picked)}")
    if len(set(picked)) != len(picked):
        raise ImageError(f"channel listed twice in {list(spec)}")
    return tuple(picked)


def compose_channels(
    data: np.ndarray, channels: str | Sequence[int], axis: int = 0, modality: str = "auto", window: WindowLike = None
) -> np.ndarray:
    """Multichannel image -> 8-bit RGB for the model: each picked channel scaled on its own.

    Each channel of ``data`` along ``axis`` listed in ``channels`` gets its own
    intensity rule (``modality`` and ``window`` as in :func:`resolve_modality`; ``auto``
    means 8-bit data unchanged, anything else the percentile rule over the whole
    channel).
    One channel is repeated into gray; two or three fill red, green (, blue), the
    missing blue staying 0, like an ordinary two-colour fluorescence overlay.

    Returns:
        uint8 array of ``data``'s shape without ``axis`` plus a last axis of 3.
    """
    data = np.asarray(data)
    if data.ndim < 3:
        raise ImageError(f"a multichannel image needs a channel axis and 2 spatial axes, got shape {data.shape}")
    axis = axis % data.ndim
    if axis >= data.ndim - 2:
        raise ImageError(
            f"the channel axis must come before the 2 displayed axes, got axis {axis} of shape {data.shape}"
        )
    picked = parse_channels(channels, data.shape[axis])
    if picked is None:
        raise ImageError("no channels picked")
    planes = []
    for c in picked:
        ch = np.take(data, c, axis=axis)
        rule = resolve_modality(ch, modality, window)
        if rule.rule == "rgb":
            raise ImageError("a channel of a multichannel image is not RGB")
        planes.append(to_uint8(ch, rule))
    if len(planes) == 1:
        planes = planes * 3
    while len(planes) < 3:
        planes.append(np.zeros_like(planes[0]))
    return np.stack(planes, axis=-1)


# -- the one image -> model uint8 path ------------------------------------------------
def gray_to_rgb(u8: np.ndarray) -> np.ndarray:
    """(..., H, W) gray -> (..., H, W, 3), contiguous: the plane repeated, as the authors feed gray images."""
    return np.ascontiguousarray(np.repeat(np.asarray(u8)[..., None], 3, axis=-1))


@dataclass(frozen=True)
class ModelInput:
    """The 8-bit pixels the model sees and how they were made.

    Attributes:
        pixels: uint8; an image ``(H, W, 3)``; a volume ``(D, H, W)`` or ``(D, H, W, 3)``;
            planes ``(..., H, W)`` or ``(..., H, W, 3)`` (gray planes are repeated per plane
            with :func:`gray_to_rgb` when encoded).
        intensity: the rule applied (to the whole array at once).
        rgb: the pixels carry 3 colour channels.
    """

    pixels: np.ndarray
    intensity: Intensity
    rgb: bool


#: ``image``: one 2D image (gray or RGB, alpha dropped), returned as (H, W, 3).
#: ``2d`` / ``rgb``: the :class:`~napari_medsam.engine.io.ImageData` kinds, same as ``image``.
#: ``volume``: (D, H, W) or (D, H, W, 3). ``planes``: any stack whose layout the caller knows.
INPUT_KINDS = ("image", "2d", "rgb", "volume", "planes")


def convert(
    array: np.ndarray,
    kind: str = "image",
    modality: str = "auto",
    window: WindowLike = None,
    *,
    rgb: bool = False,
    channels: str | Sequence[int] | None = None,
    channel_axis: int = 0,
) -> ModelInput:
    """Validate ``array`` and apply the intensity rule once, over all of it (see :data:`INPUT_KINDS`).

    ``rgb`` (planes only) says the last axis holds colours; ``channels`` (planes only)
    picks channels along ``channel_axis`` and composes them into RGB
    (:func:`compose_channels`). Raises :class:`ImageError` for unusable input, including
    an image or volume that the rule turns constant.
    """
    if kind not in INPUT_KINDS:
        raise ImageError(f"unknown input kind {kind!r}: use one of {INPUT_KINDS}")
    if kind == "planes":
        if channels is not None:
            u8 = compose_channels(array, channels, axis=channel_axis, modality=modality, window=window)
            return ModelInput(u8, Intensity("composed"), True)
        data = check_planes(array, rgb)
        data = data[..., :3] if rgb else data
        intensity = resolve_modality(data, modality, window, rgb=rgb)
        return ModelInput(to_uint8(data, intensity), intensity, rgb)
    what = "volume" if kind == "volume" else "image"
    arr, is_rgb = check_volume(array) if kind == "volume" else check_image(array)
    intensity = resolve_modality(arr, modality or "auto", window, rgb=is_rgb)
    u8 = to_uint8(arr, intensity)
    if u8.min() == u8.max():
        raise ImageError(
            f"{what} is constant after the {intensity.describe()} intensity rule: check the window or modality"
        )
    if kind != "volume" and not is_rgb:
        return ModelInput(gray_to_rgb(u8), intensity, True)
    return ModelInput(np.ascontiguousarray(u8), intensity, is_rgb)


def model_input(
    array: np.ndarray, kind: str = "image", modality: str = "auto", window: WindowLike = None
) -> np.ndarray:
    """The uint8 pixels the model sees: an image (H, W, 3), a volume (D, H, W[, 3]); see :func:`convert`."""
    return convert(array, kind, modality, window).pixels
