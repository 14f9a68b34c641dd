"""The prompt encoder + mask decoder of a model as one ONNX graph, for the browser.

The browser runs this file with ONNX Runtime Web (wasm) on every drag move, against
the image embedding the server sent once. Inputs and outputs::

    embedding  (1, 256, 64, 64) float16   the encoder output, as sent over the wire
    box        (1, 4)           float32   x0, y0, x1, y1 in model input pixels
    logits     (1, 1, 256, 256) float32   low-resolution mask logits
    iou        (1, 1)           float32   the decoder's predicted IoU

The box scaling and the authors' postprocessing (crop to the unpadded area,
bilinear to the image size, logit > 0) are done in JavaScript (``static/app.js``),
exactly as :class:`engine.recipes.LiteMedSAMRecipe` does them.

The file is exported once per weights and cached (named by a digest of the
weights); a half-written file is never used (temp file + ``os.replace``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from napari_medsam.engine.atomic import atomic_write
from napari_medsam.engine.errors import MedSAMError

WEB_MODELS = ("litemedsam",)


class WebDecoderError(MedSAMError, RuntimeError):
    """The browser decoder cannot be exported for this model."""


class _Upsample2x(nn.Module):
    """``ConvTranspose2d(kernel_size=2, stride=2)`` as one matrix product and a pixel shuffle.

    Same values; ONNX Runtime Web's wasm ConvTranspose is far slower than its MatMul.
    """

    def __init__(self, conv: nn.ConvTranspose2d):
        super().__init__()
        cin, cout = conv.in_channels, conv.out_channels
        # weight (Cin, Cout, 2, 2) -> (Cout * 4, Cin), rows ordered (co, a, b)
        self.register_buffer("weight", conv.weight.detach().permute(1, 2, 3, 0).reshape(cout * 4, cin).clone())
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros(cout)
        self.register_buffer("bias", bias.repeat_interleave(4)[:, None].clone())
        self.cout = cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        y = self.weight @ x.reshape(c, h * w) + self.bias  # batch of one (the browser's case)
        y = y.reshape(self.cout, 2, 2, h, w).permute(0, 3, 1, 4, 2)
        return y.reshape(1, self.cout, 2 * h, 2 * w)


def _web_decoder(mask_decoder: nn.Module) -> nn.Module:
    """A copy of the mask decoder whose 2x transposed convolutions are matrix products."""
    import copy

    dec = copy.deepcopy(mask_decoder)
    ups = dec.output_upscaling
    for i, layer in enumerate(ups):
        if isinstance(layer, nn.ConvTranspose2d) and layer.kernel_size == (2, 2) and layer.stride == (2, 2):
            ups[i] = _Upsample2x(layer)
    return dec


class _PromptDecoder(nn.Module):
    def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module, dense_pe: torch.Tensor):
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = _web_decoder(mask_decoder)
        self.register_buffer("dense_pe", dense_pe.detach().clone())

    def forward(self, embedding: torch.Tensor, box: torch.Tensor):
        feats = embedding.float()
        sparse, dense = self.prompt_encoder(points=None, boxes=box[:, None, :], masks=None)
        logits, iou = self.mask_decoder(
            image_embeddings=feats,
            image_pe=self.dense_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return logits, iou


def _digest(module: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(f"web-decoder-v2|{torch.__version__}".encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def export_decoder(model, folder: os.PathLike) -> Path:
    """Export ``model``'s prompt encoder + mask decoder to ``folder`` (once); returns the file."""
    if model.name not in WEB_MODELS:
        raise WebDecoderError(f"the browser decoder exists for {', '.join(WEB_MODELS)}, not {model.name!r}")
    module = model.module
    wrapper = _PromptDecoder(module.prompt_encoder, module.mask_decoder, model._dense_pe.cpu()).cpu().eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{model.name}-decoder-{_digest(wrapper)}.onnx"
    if path.exists():
        return path
    emb = torch.zeros(1, 256, 64, 64, dtype=torch.float16)
    box = torch.tensor([[10.0, 10.0, 100.0, 100.0]])
    import warnings

    kw = {"input_names": ["embedding", "box"], "output_names": ["logits", "iou"], "opset_version": 17}

    def write(tmp: Path) -> None:
        try:
            torch.onnx.export(wrapper, (emb, box), str(tmp), dynamo=False, **kw)
        except TypeError:  # older torch without the dynamo switch
            torch.onnx.export(wrapper, (emb, box), str(tmp), **kw)

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        atomic_write(path, write)  # engine.atomic: sibling temp, fsync, replace; temp removed on failure
    return path


def default_folder(output_dir: os.PathLike, cache_dir: os.PathLike | None = None) -> Path:
    """Where the exported decoder lives: ``cache_dir`` or ``OUT/.web``."""
    return Path(cache_dir) if cache_dir else Path(output_dir) / ".web"
