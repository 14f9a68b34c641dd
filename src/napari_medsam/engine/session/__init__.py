"""Labeling sessions: a folder of images annotated one after the other, saved as labels plus records.

The public import path ``napari_medsam.engine.session``: inputs and statuses
(:mod:`.inputs`), records (:mod:`.records`), the session itself (:mod:`.session`)
and the training-data export (:mod:`.export`).
"""

from napari_medsam.engine.errors import SessionError

from .export import EXPORT_DIR, ExportResult, export_session, iter_saved
from .inputs import (
    CACHE_DIR,
    DONE,
    IMAGE_SUFFIXES,
    IN_PROGRESS,
    LABELS_DIR,
    NOT_STARTED,
    RECORDS_DIR,
    SESSION_FILE,
    SKIPPED,
    STATUSES,
    SessionItem,
    Status,
    as_status,
    list_images,
    read_list_file,
)
from .records import (
    FORMAT_VERSION,
    RECORD_FORMAT,
    SESSION_FORMAT,
    box_from_vertices,
    box_kinds_of,
    boxes_from_layer,
    build_objects,
    checkpoint_sha256,
    compact_labels,
    label_stats,
    layer_from_boxes,
    now_iso,
    package_version,
)
from .session import DEFAULT_CACHE_BYTES, ImageInfo, LabelingSession

__all__ = [
    "CACHE_DIR",
    "DEFAULT_CACHE_BYTES",
    "DONE",
    "EXPORT_DIR",
    "FORMAT_VERSION",
    "IMAGE_SUFFIXES",
    "IN_PROGRESS",
    "LABELS_DIR",
    "NOT_STARTED",
    "RECORDS_DIR",
    "RECORD_FORMAT",
    "SESSION_FILE",
    "SESSION_FORMAT",
    "SKIPPED",
    "STATUSES",
    "ExportResult",
    "ImageInfo",
    "LabelingSession",
    "SessionError",
    "SessionItem",
    "Status",
    "as_status",
    "box_from_vertices",
    "box_kinds_of",
    "boxes_from_layer",
    "build_objects",
    "checkpoint_sha256",
    "compact_labels",
    "export_session",
    "iter_saved",
    "label_stats",
    "layer_from_boxes",
    "list_images",
    "now_iso",
    "package_version",
    "read_list_file",
]
