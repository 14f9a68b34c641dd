"""napari-medsam: box-prompted MedSAM / LiteMedSAM segmentation for napari and Python.

The engine (``napari_medsam.engine``) needs neither Qt nor napari; the napari plugin
modules (``_widget``, ``_session_widget``, the box flow in ``_annotator``) sit beside it and depend on it.
"""

from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("napari-medsam")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from .engine import Embedding, EmbeddingCache, MedSAM, MedSAMError

__all__ = ["Embedding", "EmbeddingCache", "MedSAM", "MedSAMError", "__version__"]
