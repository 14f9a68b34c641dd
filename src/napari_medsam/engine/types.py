"""Shared type names: box and region aliases, and the :class:`Segmenter` protocol.

:class:`Segmenter` is what 3D propagation, batch runs and labeling sessions need
of a model; :class:`~napari_medsam.engine.predictor.MedSAM` satisfies it, and so
can a test double or a future model family without inheriting from anything.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, Union, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # annotations only: no import cycle at run time
    from .cache import Embedding, EmbeddingCache
    from .recipes import Recipe

#: (x0, y0, x1, y1) in image pixels, x = column, y = row, inclusive bounds.
Box = tuple[float, float, float, float]
#: anything a caller may pass as one box or many: a 4-sequence, an (N, 4) array, ``"x0,y0,x1,y1"``.
BoxLike = Sequence[float] | np.ndarray | str
#: a tuple of slices into an array (one per axis).
Region = tuple[slice, ...]
#: (height, width) in pixels.
Size = tuple[int, int]
#: (y0, y1, x0, x1): a window of a full-size mask (decoder ``region=``).
Window = tuple[int, int, int, int]
PathLike = Union[str, "os.PathLike[str]"]


class PredictionLike(Protocol):
    """What a decode returns: (N, H, W) bool masks, (N,) predicted IoU, (N, 4) boxes as used."""

    masks: np.ndarray
    iou: np.ndarray
    boxes: np.ndarray


@runtime_checkable
class Segmenter(Protocol):
    """A box-prompted 2D model: encode an 8-bit RGB image once, decode many boxes on it.

    Attributes:
        name: registry name; part of the embedding cache key and of saved records.
        recipe: preprocessing recipe (``input_size``, ``model_scale``...).
        checkpoint: the weights file, or None for random weights.
        cache: the embedding cache the model reads and fills.
    """

    name: str
    recipe: Recipe
    checkpoint: str | None
    cache: EmbeddingCache

    def embed(self, image: Any, modality: str = ..., window: Any = ..., use_cache: bool = ...) -> Embedding:
        """Validate, convert (intensity rule) and encode a 2D image."""
        ...

    def embed_rgb(self, rgb: np.ndarray, use_cache: bool = ...) -> Embedding:
        """Encode an already prepared (H, W, 3) uint8 image."""
        ...

    def embed_rgb_status(self, rgb: np.ndarray, use_cache: bool = ...) -> tuple[Embedding, bool]:
        """Like :meth:`embed_rgb`, plus whether the encoder ran (False: cache hit)."""
        ...

    def predict(
        self, embedding: Embedding, boxes: Any, region: Window | None = ..., exact: bool = ...
    ) -> PredictionLike:
        """Masks (``.masks``), predicted IoU (``.iou``) and boxes as used (``.boxes``) for one or more boxes."""
        ...


__all__ = ["Box", "BoxLike", "PathLike", "PredictionLike", "Region", "Segmenter", "Size", "Window"]
