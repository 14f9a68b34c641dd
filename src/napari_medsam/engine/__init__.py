"""The Qt-free engine: models, recipes, embedding cache, propagation, IO, batch."""

from .cache import Embedding, EmbeddingCache
from .errors import BoxError, CheckpointError, ImageError, MedSAMError, ReadError
from .intensity import CT_PRESETS
from .models.registry import REGISTRY, get_spec
from .predictor import MedSAM, Prediction, pick_device

__all__ = [
    "CT_PRESETS",
    "REGISTRY",
    "BoxError",
    "CheckpointError",
    "Embedding",
    "EmbeddingCache",
    "ImageError",
    "MedSAM",
    "MedSAMError",
    "Prediction",
    "ReadError",
    "get_spec",
    "pick_device",
]
