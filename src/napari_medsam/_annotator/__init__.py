"""The plugin's box flow, one module per step of a box's road (GUI thread unless marked):

1. :mod:`.shape_events` - the drag on the boxes layer -> preview / accept calls
2. :mod:`.annotator` - :class:`BoxAnnotator` makes a job (box + the plane's embedding future)
3. :mod:`.encoding` - :class:`EncoderService` (worker) encodes planes, the one on screen first
4. :mod:`.decoding` - :class:`LatestBoxDecoder` (worker) decodes the newest box, never drops an accept
5. :mod:`.annotator` - the result is written into the labels and :mod:`.history`

Beside the road: :mod:`.propagation` (3D, worker), :mod:`.prefetch` (what the encoder does
in the background, and when), :mod:`.saver` (autosave, worker),
:mod:`.layers` (one factory per layer), :mod:`.options`, :mod:`.constants`, :mod:`.threads`.
"""

from importlib import import_module

_HOMES = {
    "BoxAnnotator": "annotator",
    "BOXES": "constants",
    "LABELS": "constants",
    "PREVIEW": "constants",
    "EncoderState": "constants",
    "JobKind": "constants",
    "Priority": "constants",
    "BoxJob": "decoding",
    "BoxResult": "decoding",
    "LatestBoxDecoder": "decoding",
    "preview_region": "decoding",
    "EncoderService": "encoding",
    "Source": "encoding",
    "Edit": "history",
    "History": "history",
    "LabelPatch": "history",
    "PREVIEW_FAST": "options",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    """Names load on first use: the Qt-free steps (encoding, decoding, history) import without napari."""
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_HOMES[name]}", __name__), name)
