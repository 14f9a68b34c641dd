"""One factory per MedSAM layer (used by the annotator and the session widget) and the boxes layer's state."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from napari.layers import Labels, Shapes

from .constants import BOXES, LABELS, PREVIEW

#: the boxes' ``kind`` feature: drawn by the user (a key slice) or shown by a propagation
KEY, PROPAGATED = "key", "propagated"
KEY_COLOR, PROPAGATED_COLOR = (1.0, 1.0, 0.0, 1.0), (0.0, 0.85, 1.0, 1.0)  # yellow, cyan (RGBA)
KEY_WIDTH, PROPAGATED_WIDTH = 2, 1


def labels_shape(viewer, image, channels=None) -> tuple[tuple[int, ...], int]:
    """(shape of the labels for ``image``, image axes before the labels' first axis); ValueError if unusable.

    ``channels``: ``image``'s first axis holds channels, which the labels drop. A
    ``LABELS`` layer of another shape holding annotations is refused (nothing changes).
    """
    if image.rgb and image.data.shape[-1] not in (3, 4):
        raise ValueError(f"RGB layer {image.name!r} has {image.data.shape[-1]} channels")
    if channels is not None and (image.rgb or image.ndim < 3):
        raise ValueError(
            f"channels need a multichannel layer (channel axis first), {image.name!r} has shape {image.data.shape}"
        )
    lead0 = 0 if channels is None else 1
    spatial = tuple(image.data.shape[:-1] if image.rgb else image.data.shape[lead0:])
    if LABELS in viewer.layers:
        old = viewer.layers[LABELS]
        if old.data.shape != spatial and old.data.any():
            raise ValueError(
                f"{LABELS!r} holds annotations of shape {old.data.shape}, not {spatial}: "
                "save or rename that layer first (nothing was changed)"
            )
    return spatial, lead0


def reuse_layer(viewer, name: str, make):
    """The viewer's layer ``name``, or ``make()`` added to the viewer."""
    if name in viewer.layers:
        return viewer.layers[name]
    return viewer.add_layer(make())


def make_boxes_layer(
    ndim: int,
    data: Sequence = (),
    shape_types: Sequence[str] = (),
    label_ids: Sequence[int] = (),
    kinds: Sequence[str] | None = None,
    **kwargs,
) -> Shapes:
    """The yellow rectangle layer; column ``label`` holds each box's label id (0: not accepted yet),
    column ``kind`` whether the user drew it (``key``, the default) or a propagation did
    (``propagated``, see :mod:`.steer_boxes`)."""
    layer = Shapes(
        ndim=ndim,
        name=BOXES,
        edge_color="yellow",
        face_color="transparent",
        edge_width=2,
        features={"label": np.zeros(0, np.int64), "kind": np.zeros(0, object)},
        **kwargs,
    )
    if len(data):
        layer.add(list(data), shape_type=list(shape_types))
    set_box_labels(layer, label_ids, kinds=kinds)
    return layer


def make_labels_layer(data: np.ndarray, **kwargs) -> Labels:
    """The annotation layer (uint32 ids)."""
    return Labels(np.asarray(data, np.uint32), name=LABELS, **kwargs)


def make_preview_layer(plane: tuple[int, int], **kwargs) -> Labels:
    """The translucent mask that follows the box during a drag (one plane)."""
    return Labels(np.zeros(plane, np.uint8), name=PREVIEW, opacity=0.6, **kwargs)


def box_kinds(layer: Shapes) -> np.ndarray:
    """Each box's ``kind`` (``key`` where the layer has no such column, e.g. a session's layer)."""
    feats = layer.features
    if "kind" in feats and len(feats) == len(layer.data):
        return np.array([KEY if k != PROPAGATED else PROPAGATED for k in feats["kind"]], object)
    return np.full(len(layer.data), KEY, object)


def boxes_state(layer: Shapes):
    """(vertex arrays, shape types, label ids, kinds): a copy of a boxes layer's state (undo snapshots)."""
    data = [np.array(d) for d in layer.data]
    return data, list(layer.shape_type), layer.features["label"].to_numpy().copy(), box_kinds(layer)


def set_boxes_state(layer: Shapes, state) -> None:
    """Put a :func:`boxes_state` back."""
    data, types, labels = state[:3]
    layer.selected_data = set()
    layer.data = []
    if data:
        layer.add(data, shape_type=types)
    set_box_labels(layer, labels, kinds=state[3] if len(state) > 3 else None)


def set_box_labels(layer: Shapes, labels, idx: int | None = None, label_id: int = 0, kinds=None) -> None:
    """Replace the boxes' label column (optionally setting row ``idx``), keeping their kinds (or setting
    ``kinds``); new boxes default to 0 = new object, drawn by the user. Propagated boxes get their style."""
    labels = np.array(labels, np.int64)
    if idx is not None:
        labels[idx] = label_id
    kinds = box_kinds(layer) if kinds is None else np.asarray(kinds, object)
    layer.features = {"label": labels, "kind": kinds}
    layer.feature_defaults = {"label": 0, "kind": KEY}
    style_boxes(layer)


def style_boxes(layer: Shapes) -> None:
    """Key boxes yellow, propagated boxes thin and cyan (napari draws no dashed edges)."""
    kinds = box_kinds(layer)
    if not len(kinds):
        return
    propagated = kinds == PROPAGATED
    colors = np.where(propagated[:, None], np.array(PROPAGATED_COLOR)[None], np.array(KEY_COLOR)[None])
    if not np.array_equal(np.asarray(layer.edge_color), colors):
        layer.edge_color = colors
    widths = [PROPAGATED_WIDTH if p else KEY_WIDTH for p in propagated]
    if list(layer.edge_width) != widths:
        layer.edge_width = widths
