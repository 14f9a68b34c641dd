"""How the plugin runs a model: the decoder child's options, whether to use it, the Triton guard."""

from __future__ import annotations

import os
import sys

#: the decoder child's options (engine/decoder_process.py): it only decodes previews, with the default
#: decoder (ONNX Runtime, else the fused PyTorch one) on one thread; embeddings come from the plugin's
#: encoder. The model itself is loaded with
#: the engine's default (the fast path) or, with the widget's "authors' exact numerics", ``exact=True``.
PREVIEW_FAST = {"encoder": None, "decoder": "onnx", "auto_region": True, "decoder_threads": 1}
#: environment switch: ``0`` keeps previews in the GUI's process (see engine/decoder_process.py)
DECODER_PROCESS_ENV = "NAPARI_MEDSAM_DECODER_PROCESS"


def use_decoder_process(model) -> bool:
    """Previews decode in a child process unless ``NAPARI_MEDSAM_DECODER_PROCESS=0`` or the model runs
    the authors' exact numerics (then previews use the authors' decoder too, in this process)."""
    from napari_medsam.engine.decoder_process import DecoderProcess

    if getattr(model, "exact", False):
        return False
    return os.environ.get(DECODER_PROCESS_ENV, "1") != "0" and DecoderProcess.supported(model)


def guard_triton() -> None:
    """Keep Triton out of a process that has an OpenGL context and no CUDA.

    torchvision imports ``torch._dynamo``, which imports Triton if installed (CUDA
    builds of torch ship it). Triton's bundled LLVM clashes with Mesa's llvmpipe
    OpenGL driver once napari has drawn, and the import segfaults. CPU inference
    never uses Triton, so without CUDA we make ``import triton`` fail cleanly
    (process-wide: this is why only the plugin, never the engine, calls it).
    """
    import torch

    if "triton" not in sys.modules and not torch.cuda.is_available():
        sys.modules["triton"] = None
