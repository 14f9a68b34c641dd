"""Names and small enums shared by the steps of the box flow (no Qt, no napari)."""

from __future__ import annotations

from enum import Enum, IntEnum

#: the layers the annotator makes (or reuses) next to the image
BOXES = "MedSAM boxes"
LABELS = "MedSAM labels"
PREVIEW = "MedSAM preview"

#: seconds a GUI-thread wait may last before giving up (an accept in flight, a propagation stopping)
SETTLE_TIMEOUT_S = 60.0
#: seconds the interpreter-exit handler waits for a worker's running forward pass
EXIT_JOIN_S = 60.0


class JobKind(str, Enum):
    """What a box is decoded for: the live preview of a drag, or the accepted label."""

    PREVIEW = "preview"
    ACCEPT = "accept"


class EncoderState(str, Enum):
    """What the encoder worker reports to the GUI (with the seconds of the last encode)."""

    ENCODING = "encoding"
    READY = "ready"
    ERROR = "error"


class Priority(IntEnum):
    """Order in which planes are encoded: the plane on screen, then background prefetch."""

    NOW = 0  # the plane on screen, a box waiting for it
    SOON = 1  # neighbours of the plane on screen
    IDLE = 2  # background prefetch (next images, the rest of a volume)
