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

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from .errors import ImageError

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

WindowLike = Union[None, str, Sequence[float]]


@dataclass(frozen=True)
class Intensity:
    """A resolved intensity rule; hashable, so it can be part of a cache key.

    Attributes:
        rule: ``"ct"``, ``"percentile"``, ``"rgb"`` or ``"uint8"`` (pass-through).
        window: (level, width) for ``"ct"``.
    """

    rule: str
    window: Optional[Tuple[float, float]] = None

    def describe(self) -> str:
        if self.rule == "ct":
            return f"ct window level {self.window[0]:g} width {self.window[1]:g}"
        return self.rule


def parse_window(window: WindowLike) -> Optional[Tuple[float, float]]:
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


def window_from_limits(low: float, high: float) -> Tuple[float, float]:
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


def resolve_modality(image: np.ndarray, modality: str = "auto", window: WindowLike = None, rgb: bool = False) -> Intensity:
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
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / max(hi - lo, 1e-8) * 255.0


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
    data = image.astype(np.float64, copy=False)
    if intensity.rule == "ct":
        level, width = intensity.window
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


def parse_channels(spec: Union[None, str, Sequence[int]], n_channels: int) -> Optional[Tuple[int, ...]]:
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
            raise ImageError(f"channel {c} does not exist: the channel axis has {n_channels} channels (0..{n_channels - 1})")
        picked.append(c % n_channels)
    if not 1 <= len(picked) <= 3:
        raise ImageError(f"pick one to three channels (they become red, green, blue), got {len(picked)}")
    if len(set(picked)) != len(picked):
        raise ImageError(f"channel listed twice in {list(spec)}")
    return tuple(picked)


def compose_channels(
    data: np.ndarray, channels: Sequence[int], axis: int = 0, modality: str = "auto", window: WindowLike = None
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
        raise ImageError(f"the channel axis must come before the 2 displayed axes, got axis {axis} of shape {data.shape}")
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
