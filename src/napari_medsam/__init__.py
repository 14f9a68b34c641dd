"""napari-medsam: box-prompted MedSAM / LiteMedSAM segmentation for napari and Python.

The engine (``napari_medsam.engine``) needs neither Qt nor napari; the napari plugin
modules (``_widget``, ``_live``, ...) sit beside it and depend on it.
"""

try:
    from importlib.metadata import version as _version

    __version__ = _version("napari-medsam")
except Exception:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from .engine import MedSAM, Embedding, EmbeddingCache, MedSAMError  # noqa: E402

__all__ = ["MedSAM", "Embedding", "EmbeddingCache", "MedSAMError", "__version__"]
