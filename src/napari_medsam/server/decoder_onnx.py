"""The browser's decoder as ONNX: exported once per weights, cached, served to the page.

The page runs it with ONNX Runtime Web (wasm) against the image embedding the server
sent once. Two graphs (:func:`export_web_decoder`, see :mod:`napari_medsam.engine.fast.split_decoder`)::

    image.onnx  embedding (1, 256, 64, 64) float16 -> k0 v0 q0 xk1 xv1 xq1 xc0 xg0 xg1 xkf xvf xs xu (float32)
                once per image, in the browser
    box.onnx    those + box (1, 4) float32 model pixels + rows, cols (int64 token indices)
                -> logits (16 * len(rows) * len(cols),) float32, iou (1, 1)
                every drag move

The box scaling, the token window and the authors' postprocessing (crop to the
unpadded area, bilinear to the image size, logit > 0) are done in JavaScript
(``static/decoder.js``), as :class:`engine.recipes.LiteMedSAMRecipe` and the engine's
fast decoder do them.

:func:`export_decoder` writes the earlier single graph (the authors' prompt encoder +
mask decoder, embedding + box -> 256 x 256 logits): ``benchmarks/web.py`` times it
beside the split one.

Files are named by a digest of the weights; a half-written file is never used
(``engine.atomic.atomic_write``: temp file + ``os.replace``).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from napari_medsam.engine.atomic import atomic_write
from napari_medsam.engine.errors import MedSAMError
from napari_medsam.engine.fast.onnx_decoder import export_split

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


def _digest(module: nn.Module, tag: str = "web-decoder-v2") -> str:
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{tag}|{torch.__version__}".encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _check(model) -> None:
    if model.name not in WEB_MODELS:
        raise WebDecoderError(f"the browser decoder exists for {', '.join(WEB_MODELS)}, not {model.name!r}")


def _export(module: nn.Module, args: tuple, path: Path, inputs, outputs, dynamic=None) -> Path:
    """``torch.onnx.export`` (TorchScript-based) into ``path`` once, atomically."""
    if path.exists():
        return path
    kw = {"input_names": list(inputs), "output_names": list(outputs), "opset_version": 17}
    if dynamic:
        kw["dynamic_axes"] = dynamic

    def write(tmp: Path) -> None:
        try:
            torch.onnx.export(module, args, str(tmp), dynamo=False, **kw)
        except TypeError:  # older torch without the dynamo switch
            torch.onnx.export(module, args, str(tmp), **kw)

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        atomic_write(path, write)  # engine.atomic: sibling temp, fsync, replace; temp removed on failure
    return path


def export_decoder(model, folder: os.PathLike) -> Path:
    """The single-graph decoder (authors' order, full 256 x 256 logits) in ``folder`` (once); returns the file."""
    _check(model)
    module = model.module
    wrapper = _PromptDecoder(module.prompt_encoder, module.mask_decoder, model._dense_pe.cpu()).cpu().eval()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{model.name}-decoder-{_digest(wrapper)}.onnx"
    emb = torch.zeros(1, 256, 64, 64, dtype=torch.float16)
    box = torch.tensor([[10.0, 10.0, 100.0, 100.0]])
    return _export(wrapper, (emb, box), path, ["embedding", "box"], ["logits", "iou"])


@dataclass(frozen=True)
class WebDecoder:
    """The two files of the split browser decoder."""

    image: Path
    box: Path


def export_web_decoder(model, folder: os.PathLike) -> WebDecoder:
    """The per-image and per-box graphs of ``model``'s decoder in ``folder`` (once each): the
    engine's own (:func:`napari_medsam.engine.fast.onnx_decoder.export_split`), named by the
    weights and the graph code, so a changed graph is exported anew."""
    _check(model)
    image, box = export_split(model.module, model._dense_pe, str(folder))
    return WebDecoder(Path(image), Path(box))


def default_folder(output_dir: os.PathLike, cache_dir: os.PathLike | None = None) -> Path:
    """Where the exported decoder lives: ``cache_dir`` or ``OUT/.web``."""
    return Path(cache_dir) if cache_dir else Path(output_dir) / ".web"
