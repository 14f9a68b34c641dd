"""3D propagation options given wrong: an OptionTypeError naming the option before any slice is encoded.

Before: ``cancel=True`` raised AttributeError ('bool' object has no attribute 'is_set') and
``on_slice=3`` a TypeError from inside the run, after the key slice had been encoded.
"""

from __future__ import annotations

import threading

import pytest

from napari_medsam.engine.errors import MedSAMError, OptionTypeError
from napari_medsam.engine.io import read_image
from napari_medsam.engine.volume import propagate

BOX = (162, 84, 206, 115)  # the brain sample's tumour on slice 24 (samples/cases.csv)
KEY = 24


@pytest.fixture(scope="module")
def brain(samples):
    return read_image(samples / "pyradiomics_brain1.nii.gz").array


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("cancel", True, "cancel must be a threading.Event"),
        ("cancel", "stop", "cancel must be a threading.Event"),
        ("cancel", threading.Lock(), "cancel must be a threading.Event"),
        ("on_slice", 3, "on_slice must be callable"),
        ("on_slice", "print", "on_slice must be callable"),
    ],
)
def test_bad_callbacks_are_option_errors_before_any_encode(lite, brain, option, value, words):
    encodes = lite.cache.misses
    with pytest.raises(OptionTypeError, match=words) as info:
        lite.segment_volume(brain, BOX, KEY, modality="mr", **{option: value})
    assert isinstance(info.value, MedSAMError) and isinstance(info.value, TypeError)
    assert lite.cache.misses == encodes, "nothing was encoded"


def test_a_set_event_cancels_before_the_first_slice(lite, brain):
    ev = threading.Event()
    ev.set()
    seen = []
    res = propagate(lite, brain, BOX, KEY, modality="mr", cancel=ev, on_slice=lambda z, m: seen.append(z))
    assert res.cancelled and not res.mask.any() and seen == []
