"""When a 3D propagation direction stops: :class:`StopRule` and :data:`DEFAULT_STOP` (see the package docstring)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StopRule:
    """When a propagation direction stops (see the module docstring).

    Attributes:
        min_pixels: a mask with fewer pixels counts as empty.
        min_area_ratio: stop when area < this x the previous slice's area (0 disables).
        min_iou: stop when the decoder's predicted IoU < this (0 disables).
        max_intensity_shift: stop when the mean 8-bit intensity inside the mask differs
            from the reference slice's by more than this fraction of the reference mean
            (None disables).
        intensity_shift_floor: ... and by more than this many grey levels (so dark
            objects, whose relative shifts are noisy, are not cut short).
        keep_last: keep the slice that tripped the area / IoU / intensity rule.
        stop_on_empty: ``False`` reproduces the authors: an empty mask does not stop,
            the next slice is prompted with the key box instead.
    """

    min_pixels: int = 1
    min_area_ratio: float = 0.2
    min_iou: float = 0.5
    max_intensity_shift: float | None = 0.35
    intensity_shift_floor: float = 30.0
    keep_last: bool = False
    stop_on_empty: bool = True

    @classmethod
    def never(cls) -> StopRule:
        """The authors' behaviour: no stop rule, empty masks fall back to the key box."""
        return cls(min_area_ratio=0.0, min_iou=0.0, max_intensity_shift=None, keep_last=True, stop_on_empty=False)

    def check(
        self, area: int, prev_area: int, iou: float, mean: float | None = None, ref_mean: float | None = None
    ) -> str | None:
        """Why this slice stops its direction (``empty``, ``area``, ``iou``, ``intensity``), or None.

        ``mean`` / ``ref_mean``: mean 8-bit intensity inside this slice's mask and
        inside the reference (key) slice's mask.
        """
        if area < max(int(self.min_pixels), 1):
            return "empty" if self.stop_on_empty else None
        if self.min_area_ratio > 0 and prev_area > 0 and area < self.min_area_ratio * prev_area:
            return "area"
        if self.min_iou > 0 and iou < self.min_iou:
            return "iou"
        if (
            self.max_intensity_shift is not None
            and mean is not None
            and ref_mean is not None
            and abs(mean - ref_mean) > max(self.max_intensity_shift * ref_mean, self.intensity_shift_floor)
        ):
            return "intensity"
        return None


DEFAULT_STOP = StopRule()
