"""How the plugin loads and runs a model: the speed options, the decoder child, the Triton guard."""

from __future__ import annotations

import os
import sys

#: previews decode with the fused decoder on one thread (engine/fast.py); the
#: encoder and accepted labels keep the authors' exact numerics.
PREVIEW_FAST = {"encoder": None, "decoder": "fused", "auto_region": True, "decoder_threads": 1}
#: ViT models (MedSAM, SAM): the encoder's attention as one fused kernel (engine/fast.py
#: ``sdpa_vit``; embeddings equal to float rounding), ~2.3x faster per slice on a CPU.
VIT_FAST = {"encoder": "sdpa", "decoder": None}
#: environment switch: ``0`` keeps previews in the GUI's process (see engine/decoder_process.py)
DECODER_PROCESS_ENV = "NAPARI_MEDSAM_DECODER_PROCESS"


def lite_options(fast_encoder: bool = False) -> dict:
    """LiteMedSAM's ``fast`` options in the plugin: :data:`PREVIEW_FAST`, plus with ``fast_encoder``
    the measured fastest encoder that keeps the masks (ONNX Runtime if installed, else the fused
    PyTorch TinyViT; engine/fast.py ``fast_options``)."""
    if not fast_encoder:
        return dict(PREVIEW_FAST)
    from napari_medsam.engine.fast import fast_options

    return {**PREVIEW_FAST, "encoder": fast_options(True)["encoder"]}


def use_decoder_process(model) -> bool:
    """Previews decode in a child process unless ``NAPARI_MEDSAM_DECODER_PROCESS=0``."""
    from napari_medsam.engine.decoder_process import DecoderProcess

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
