"""Options of the public API given wrong: a MedSAMError naming the option, before any model is built.

docs/api.md promises that every error the engine raises on purpose derives from
``MedSAMError``; torch's RuntimeError for an unknown device, and the fast paths'
ValueError / TypeError for a misspelt ``fast=`` did not.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from napari_medsam.engine import MedSAM, pick_device
from napari_medsam.engine.errors import MedSAMError, ModelError, OptionTypeError
from napari_medsam.engine.models.registry import REGISTRY


@pytest.fixture
def no_build(monkeypatch):
    """LiteMedSAM whose architecture must not be built: a bad option has to fail before that."""
    built = []

    def counting_build():
        built.append(1)
        raise AssertionError("the model was built before its options were checked")

    monkeypatch.setitem(REGISTRY, "litemedsam", dataclasses.replace(REGISTRY["litemedsam"], build=counting_build))
    yield built
    assert built == []


BAD_DEVICES = {
    "tpu": (ModelError, "unknown device 'tpu'"),
    "cuda:99": (ModelError, "not available"),
    "gpu": (ModelError, "unknown device 'gpu'"),
    "cpu:x": (ModelError, "unknown device"),
    3: (OptionTypeError, "device must be"),
    2.5: (OptionTypeError, "device must be"),
}


@pytest.mark.parametrize("device", list(BAD_DEVICES), ids=repr)
def test_bad_device_is_a_model_error_before_building(no_build, device):
    """Before: torch's RuntimeError ('Expected one of cpu, cuda, ...'), after the model was built."""
    if device == "cuda:99" and torch.cuda.device_count() > 99:
        pytest.skip("a machine with 100 GPUs")
    kind, words = BAD_DEVICES[device]
    with pytest.raises(kind, match=words) as info:
        MedSAM.load("litemedsam", device=device)
    assert isinstance(info.value, MedSAMError)


@pytest.mark.parametrize(
    ("device", "expected"), [("auto", None), (None, None), ("", None), ("cpu", "cpu"), (" CPU ", "cpu")]
)
def test_good_devices(device, expected):
    got = pick_device(device)
    assert isinstance(got, torch.device)
    assert expected is None or got.type == expected
    assert pick_device(torch.device("cpu")) == torch.device("cpu")


BAD_FAST = {
    "an unknown encoder": ("onnxx", ModelError, "encoder must be one of"),
    "an unknown decoder": ({"decoder": "nope"}, ModelError, "decoder must be one of"),
    "an unknown encoder in a dict": ({"encoder": "nope"}, ModelError, "encoder must be one of"),
    "an unknown option": ({"bogus": 1}, OptionTypeError, "bogus"),
    "a number": (3, OptionTypeError, "fast must be"),
    "a list": (["onnx"], OptionTypeError, "fast must be"),
    "an unknown autocast type": ({"autocast": "float8"}, ModelError, "autocast must be .*float8"),
    "a thread count of 0": ({"torch_threads": 0}, ModelError, "torch_threads must be"),
    "a thread count as text": ({"torch_threads": "two"}, ModelError, "torch_threads must be"),
}


@pytest.mark.parametrize("case", list(BAD_FAST))
def test_bad_fast_option_is_a_medsam_error_before_building(no_build, case):
    """Before: ValueError / TypeError from engine.fast, raised after the model was built and loaded."""
    fast, kind, words = BAD_FAST[case]
    with pytest.raises(kind, match=words) as info:
        MedSAM.load("litemedsam", device="cpu", fast=fast)
    assert isinstance(info.value, MedSAMError)


def test_segment_without_exactly_one_of_box_and_boxes(lite):
    """Before: a plain TypeError."""
    img = np.tile(np.arange(64, dtype=np.uint8), (64, 1))
    for kw in ({}, {"box": (1, 2, 30, 40), "boxes": [(1, 2, 30, 40)]}):
        with pytest.raises(OptionTypeError, match="exactly one of box= or boxes=") as info:
            lite.segment(img, **kw)
        assert isinstance(info.value, TypeError)
