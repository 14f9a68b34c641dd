"""torch's intra-op threads on the fast CPU path: set once at load, by a measured rule."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from napari_medsam.engine.fast import torch_threads_for

PROBE = textwrap.dedent(
    """
    import json, sys, threading, torch
    torch.set_num_threads(2)
    from napari_medsam import MedSAM
    fast = json.loads(sys.argv[1])
    MedSAM.load("litemedsam", device="cpu", fast=fast)
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start(); t.join()
    print(json.dumps({"main": torch.get_num_threads(), "new_thread": seen[0]}))
    """
)


def _probe(fast) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(fast)], capture_output=True, text=True, timeout=600, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_rule():
    assert [torch_threads_for(n) for n in (1, 2, 4, 6, 8, 32)] == [1, 1, 1, 3, 4, 4]


def test_load_sets_the_rule_once_and_none_leaves_torch_alone():
    want = torch_threads_for()
    assert _probe(True) == {"main": want, "new_thread": want}  # the default path (decoder threads start later)
    assert _probe({"encoder": "onnx", "torch_threads": None}) == {"main": 2, "new_thread": 2}
    assert _probe({"encoder": "onnx", "torch_threads": 3}) == {"main": 3, "new_thread": 3}
