"""What a 3D propagation returns: the mask and its per-slice trace."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from napari_medsam.engine.intensity import Intensity


@dataclass
class SliceRecord:
    """What happened on one slice."""

    z: int
    direction: str  # "key", "up" or "down"
    prompt: str  # "key", "interpolated" or "chained" (or "fallback": key box after an empty mask)
    box: tuple[float, float, float, float]
    area: int
    iou: float
    mean: float  # mean 8-bit intensity inside the mask (0 when empty)
    kept: bool
    reason: str | None = None  # why the direction stopped here


@dataclass
class PropagationResult:
    """A 3D mask and how it was made.

    Attributes:
        mask: (D, H, W) bool.
        slices: per-slice trace in processing order.
        encoded: slice indices whose embedding was computed in this call (cache misses).
        cached: slice indices whose embedding came from the cache.
        stopped: per direction why it ended: ``empty``, ``area``, ``iou``,
            ``z_range`` (user bound), ``end`` (volume edge) or ``cancelled``.
        cancelled: the cancel event was set before the work was done.
        intensity: the rule applied to the whole volume.
        seconds: wall time.
    """

    mask: np.ndarray
    slices: list[SliceRecord] = field(default_factory=list)
    encoded: list[int] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)
    stopped: dict[str, str] = field(default_factory=dict)
    cancelled: bool = False
    intensity: Intensity | None = None
    seconds: float = 0.0

    @property
    def n_encoded(self) -> int:
        return len(self.encoded)

    @property
    def z_extent(self) -> tuple[int, int] | None:
        """(first, last) slice with a non-empty mask, or None."""
        zs = np.flatnonzero(self.mask.reshape(self.mask.shape[0], -1).any(axis=1))
        return (int(zs[0]), int(zs[-1])) if zs.size else None

    def as_stats(self) -> dict:
        return {
            "encoded": list(self.encoded),
            "n_encoded": self.n_encoded,
            "cached": list(self.cached),
            "slices": [asdict(s) for s in self.slices],
            "stopped": dict(self.stopped),
            "cancelled": self.cancelled,
            "z_extent": self.z_extent,
            "intensity": self.intensity.describe() if self.intensity else None,
            "seconds": self.seconds,
        }
