"""3D segmentation from a 2D box: slice-by-slice propagation with a stop rule.

The authors' recipe (bowang-lab/MedSAM, ``CVPR24_LiteMedSAM_infer.py``):

1. The whole volume goes to 8-bit once (CT window, or the 0.5..99.5th percentile
   of the voxels > 0 over the whole volume), then each slice is repeated to three
   channels and encoded on its own.
2. The key slice is segmented with the user's box. Then the propagation goes up
   (increasing z) and, separately, down (decreasing z) one slice at a time: the
   prompt for slice ``z +- 1`` is the bounding box of the mask on slice ``z``,
   enlarged by a margin fixed at model-input scale (3 px at 256 for LiteMedSAM,
   5 px at 1024 for MedSAM/SAM), converted back to image pixels.

The authors fill the whole z-range they are given and, when a mask comes out
empty, fall back to the key-slice box. A viewer user gives no z-range, so we add
our own **stop rule** (:class:`StopRule`). A direction stops at the first slice where

* the mask is empty (fewer than ``min_pixels`` pixels), or
* its area falls below ``min_area_ratio`` x the area on the previous slice
  (the object has ended and the model is clinging to a fragment), or
* the decoder's predicted IoU falls below ``min_iou``, or
* the mean 8-bit intensity inside the mask has moved away from the mean inside
  the user's (key-slice) mask by more than ``max_intensity_shift`` x that mean
  (and at least ``intensity_shift_floor`` grey levels): past the end of an
  object the model keeps returning plausible masks on the neighbouring tissue,
  with a confident IoU, but that tissue looks different.

The slice that trips a rule is dropped unless ``keep_last``. The defaults were
tuned on the 20 3D cases of the project's test data (see ``docs/accuracy_3d.md``
and ``benchmarks/accuracy_3d.py``); the intensity rule is the one that matters
there. Optional user bounds ``z_range=(first, last)`` cap both directions (the
stop rule still applies inside them). With boxes on two or more slices
(``key_boxes``), slices between the outermost boxes get linearly interpolated boxes
(as in the authors' annotation study) and no stop rule; beyond them the chaining
rule and the stop rule apply, with the outermost boxed slice as intensity reference.

Every slice goes through ``model.embed_rgb`` so the model's embedding cache is
used: a slice is encoded at most once per intensity setting, and a second object
in the same volume costs decoder time only. :func:`propagate` returns a
:class:`PropagationResult` with the per-slice trace and the encoder counters;
:func:`segment_volume` returns only the mask (pass ``stats={}`` to get the rest).
"""

from napari_medsam.engine.validate import check_volume as check_volume  # its old home was here

from .boxes import chained_box, default_margin, interpolate_boxes
from .convert import volume_to_uint8
from .labels import paste_object
from .propagation import DOWN, UP, BoxLike, VolumeOptions, propagate, segment_volume
from .records import PropagationResult, SliceRecord
from .stop_rule import DEFAULT_STOP, StopRule

__all__ = [
    "DEFAULT_STOP",
    "DOWN",
    "UP",
    "BoxLike",
    "PropagationResult",
    "SliceRecord",
    "StopRule",
    "VolumeOptions",
    "chained_box",
    "check_volume",
    "default_margin",
    "interpolate_boxes",
    "paste_object",
    "propagate",
    "segment_volume",
    "volume_to_uint8",
]
