"""``napari-medsam serve``: the labeling session of a folder, served to any browser.

The server encodes (one queue, one embedding cache for every browser); the browser
decodes every drag move itself with ONNX Runtime Web against the embedding it was
sent once; release accepts the box, decoded on the server with the engine's default
path and saved into the engine's :class:`LabelingSession`. Qt-free: it imports
``napari_medsam.engine`` only. See docs/web.md.
"""

from .serve import ServerThread, build, serve

__all__ = ["ServerThread", "build", "serve"]
