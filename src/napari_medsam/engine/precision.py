"""Reduced precision (autocast): measured, and off by default on every device.

On a GPU the encoder's matrix products are what a half-precision type speeds up; the
question is whether the masks stay the authors'. ``python benchmarks/precision.py``
measures it on the 2D dev cases (37 boxes, two images per dataset, masks against
``exact=True``), with the CPU's autocast standing in for the arithmetic of the type
(the type's rounding is the same; a GPU's kernels accumulate in float32 as these do):

* ``bfloat16`` (8 mantissa bits): the embedding is 4-5 % off (relative L2); masks at mean
  Dice 0.990, min 0.955. Under the bar of "Fast by default" (mean >= 0.999, min >= 0.99).
* ``float16`` (10 mantissa bits): encoder alone mean 0.9988, min 0.9914; encoder and
  decoder 0.9987, 0.9914: the min holds, the mean is just under the bar.

So the default stays float32 on CUDA and MPS too (on a GPU LiteMedSAM's float32 encoder
is milliseconds: little to win for a visible change of masks); ``fast={"autocast":
"float16"}`` opts in. Not measured: speed on a GPU and anything on Apple MPS (no such
machine here), MedSAM ViT-B / SAM under autocast (their real weights cannot be had here).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

#: autocast names accepted by ``accelerate(autocast=...)``
DTYPES: dict[str, torch.dtype] = {"float16": torch.float16, "bfloat16": torch.bfloat16}

#: mask agreement with ``exact=True`` (mean Dice, min Dice, boxes) per type, encoder under autocast
#: (benchmarks/precision.py, CPU autocast)
MEASURED: dict[str, tuple[float, float, int]] = {"bfloat16": (0.9896, 0.9553, 37), "float16": (0.9988, 0.9914, 37)}
#: the agreement the default path must keep ("Fast by default"): mean and min Dice against exact=True
BAR = (0.999, 0.99)


def autocast_dtype(device: torch.device | str, model_name: str = "litemedsam") -> torch.dtype | None:
    """The autocast type the default (non-exact) path uses for ``model_name`` on ``device``.

    The first type of :data:`MEASURED` (narrowest first) whose agreement meets :data:`BAR`, on
    CUDA for LiteMedSAM; None (float32) everywhere else and when none does (today: always).
    """
    if torch.device(device).type != "cuda" or model_name != "litemedsam":
        return None
    for name in ("bfloat16", "float16"):
        mean, low, _ = MEASURED[name]
        if mean >= BAR[0] and low >= BAR[1]:
            return DTYPES[name]
    return None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"`` (cache-key suffixes, messages)."""
    return str(dtype).rsplit(".", 1)[-1]


def resolve(autocast: Any, device: torch.device | str, model_name: str) -> torch.dtype | None:
    """``accelerate``'s ``autocast`` argument -> a dtype or None.

    ``"auto"``: :func:`autocast_dtype`; ``None`` / ``False``: float32; a name of :data:`DTYPES`
    or a torch dtype: that type (the CPU runs it too, slowly: tests and measurements).
    """
    if autocast in (None, False):
        return None
    if autocast == "auto":
        return autocast_dtype(device, model_name)
    if isinstance(autocast, torch.dtype) and autocast in DTYPES.values():
        return autocast
    if isinstance(autocast, str) and autocast in DTYPES:
        return DTYPES[autocast]
    raise ValueError(f"autocast must be 'auto', None or one of {sorted(DTYPES)}, got {autocast!r}")


@contextlib.contextmanager
def autocast(device: torch.device | str, dtype: torch.dtype | None) -> Iterator[None]:
    """``torch.autocast`` on ``device``'s type with ``dtype``; nothing when ``dtype`` is None."""
    if dtype is None:
        yield
        return
    with torch.autocast(torch.device(device).type, dtype=dtype):
        yield


class AutocastEncoder:
    """An image encoder run under autocast, returning float32 features (what the cache stores)."""

    def __init__(self, encoder: Any, device: torch.device | str, dtype: torch.dtype):
        self.encoder, self.device, self.dtype = encoder, torch.device(device), dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.dtype):
            return self.encoder(x).float()
