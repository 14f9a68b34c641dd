"""The MedSAM facade: load a model, embed an image once, answer many boxes."""

from __future__ import annotations

import inspect
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .cache import Embedding, EmbeddingCache, embedding_key
from .errors import ModelError, OptionTypeError
from .intensity import WindowLike, model_input
from .models.registry import ModelSpec, get_spec, load_weights
from .precision import autocast
from .validate import normalize_boxes

BoxLike = Sequence[float] | np.ndarray


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """``auto`` (or None) -> cuda if available, else mps, else cpu; a named device is checked.

    Raises :class:`ModelError` for a device torch does not know or this machine lacks,
    :class:`OptionTypeError` for a value that is not a device name.
    """
    if isinstance(device, torch.device):
        d = device
    else:
        if device is not None and not isinstance(device, str):
            raise OptionTypeError(f"device must be a name such as 'cpu', 'cuda:0' or 'auto', got {device!r}")
        dev = (device or "auto").strip().lower()
        if dev == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda")
            return torch.device("mps") if _mps_available() else torch.device("cpu")
        try:
            d = torch.device(dev)
        except RuntimeError:
            raise ModelError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {str(d)!r} asked for but CUDA is not available here: use cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        raise ModelError(
            f"device {str(d)!r} is not available: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    if d.type == "mps" and not _mps_available():
        raise ModelError(f"device {str(d)!r} asked for but MPS is not available here: use cpu")
    return d


def check_fast(fast: Any) -> None:
    """``MedSAM.load(fast=...)`` checked before anything is built: encoder and decoder names, option names.

    Raises :class:`ModelError` (an unknown encoder or decoder) or :class:`OptionTypeError`.
    """
    if fast is None or fast is True or fast is False:
        return
    from .fast import DECODERS, ENCODERS, accelerate, fast_options, resolve_torch_threads

    try:
        opts = fast_options(fast)
    except TypeError as exc:
        raise OptionTypeError(str(exc)) from None
    known = [k for k in inspect.signature(accelerate).parameters if k != "model"]
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise OptionTypeError(f"fast={fast!r}: unknown option(s) {', '.join(unknown)}; known: {', '.join(known)}")
    for what, names in (("encoder", ENCODERS), ("decoder", DECODERS)):
        value = opts.get(what) or "eager"
        if value not in names:
            raise ModelError(f"fast={fast!r}: {what} must be one of {names}, got {value!r}")
    from .precision import resolve

    try:
        resolve(opts.get("autocast"), "cpu", "litemedsam")
        resolve_torch_threads(opts.get("torch_threads"))
    except ValueError as exc:
        raise ModelError(f"fast={fast!r}: {exc}") from None


def resolve_speed(exact: bool = False, fast: Any = None) -> tuple[Any, bool]:
    """``MedSAM.load``'s ``exact`` / ``fast`` -> (``fast`` value for the constructor, exact flag)."""
    if exact:
        if fast:
            raise ModelError(f"exact=True runs the authors' pipeline; it cannot take fast={fast!r}")
        return None, True
    if fast is False:
        return None, True  # the old opt-out: the authors' numerics
    return (True if fast is None else fast), False


@dataclass
class Prediction:
    """Masks for a batch of boxes.

    Attributes:
        masks: (N, H, W) bool, or (N, y1-y0, x1-x0) when a region was asked for.
        iou: (N,) the decoder's predicted IoU per mask.
        boxes: (N, 4) the boxes as used (ordered, clipped), in image pixels.
    """

    masks: np.ndarray
    iou: np.ndarray
    boxes: np.ndarray


class MedSAM:
    """Box-prompted segmentation with MedSAM-family models.

    Use :meth:`load` to build one. Typical use::

        model = MedSAM.load("litemedsam")
        emb = model.embed(image)                      # encoder, cached
        mask = model.segment(emb, box=(x0, y0, x1, y1))
    """

    def __init__(
        self,
        spec: ModelSpec,
        module: torch.nn.Module,
        device: torch.device,
        cache: EmbeddingCache | None = None,
        checkpoint: str | None = None,
        fast: Any = None,
        exact: bool | None = None,
    ):
        self.spec = spec
        self.name = spec.name
        self.recipe = spec.recipe()
        self.module: Any = module.to(device).eval()
        self.device = device
        self.cache = cache if cache is not None else EmbeddingCache()
        self.checkpoint = checkpoint
        self.last_encode_s = 0.0
        self.last_decode_s = 0.0
        self._lock = threading.Lock()  # one forward pass at a time per model
        prompt_encoder: Any = self.module.prompt_encoder
        with torch.inference_mode():
            self._dense_pe = prompt_encoder.get_dense_pe()
        self.fast: Any = None  # fast paths (engine/fast/) attached by accelerate(); None = the authors' numerics
        #: True: the authors' pipeline end to end (encoder, decoder, no later mask refinement);
        #: read by whatever would refine a mask after the decoder. Default: exact when no fast paths are asked.
        self.exact: bool = (not fast) if exact is None else bool(exact)
        if fast and not self.exact:
            from .fast import accelerate, fast_options

            accelerate(self, **fast_options(fast))

    @classmethod
    def load(
        cls,
        name: str = "litemedsam",
        device: str = "auto",
        checkpoint: str | None = None,
        *,
        weights: str = "pretrained",
        allow_download: bool = False,
        cache: EmbeddingCache | None = None,
        exact: bool = False,
        fast: Any = None,
    ) -> MedSAM:
        """Build a registered model and load its weights.

        Args:
            name: registry name (``litemedsam``, ``medsam``, ``sam_vit_b``, ``sam_vit_l``, ``sam_vit_h``).
            device: ``auto``, ``cpu``, ``cuda``, ``mps``.
            checkpoint: explicit weights file (else env var, packaged file, user cache).
            weights: ``pretrained`` or ``random`` (architecture only; for tests where
                no weights can be had).
            allow_download: fetch missing weights from their known address (never by default).
            cache: share an :class:`EmbeddingCache` between models or sessions.
            exact: the authors' pipeline end to end: their encoder and decoder numerics and
                no later mask refinement (``model.exact`` is True). Default False: the fastest
                path that keeps the masks (LiteMedSAM on the CPU: ONNX Runtime encoder where it
                loads, else the fused PyTorch TinyViT; fused decoder; fp16 embeddings. MedSAM /
                SAM: the ViT's fused attention kernel. Agreement with ``exact=True``:
                ``tests/test_fast.py``, ``docs/benchmarks_speed.md``).
            fast: kept for compatibility and fine tuning: ``None`` / ``True``: the default
                above; ``False``: the same as ``exact=True`` (its old meaning, the authors'
                numerics); an encoder name (``fused``, ``onnx``...) or a dict of
                :func:`engine.fast.accelerate` arguments: those fast paths.

        Raises:
            ModelError: ``exact=True`` together with fast paths (``fast`` truthy).
        """
        spec = get_spec(name)
        if weights not in ("pretrained", "random"):
            raise ModelError(f"weights must be 'pretrained' or 'random', got {weights!r}")
        dev = pick_device(device)  # options first: a typo must not cost building the model
        opts, exact = resolve_speed(exact, fast)
        check_fast(opts)
        # find the weights before building: a missing file must not cost a 90 M-parameter ViT first
        path = spec.locate_checkpoint(checkpoint, allow_download) if weights == "pretrained" else None
        module = spec.build()
        if path is not None:
            load_weights(module, path, spec.name)
        return cls(spec, module, dev, cache, str(path) if path else None, fast=opts, exact=exact)

    # -- encoding ---------------------------------------------------------
    def prepare(self, image: Any, modality: str = "auto", window: WindowLike = None) -> np.ndarray:
        """Validate and convert a 2D image to the (H, W, 3) uint8 the recipe expects.

        The engine's one image -> uint8 path, :func:`engine.intensity.model_input`.
        """
        return model_input(image, "image", modality, window)

    def embed(self, image: Any, modality: str = "auto", window: WindowLike = None, use_cache: bool = True) -> Embedding:
        """Encode a 2D image (cached by model + exact 8-bit pixels).

        Args:
            image: (H, W) or (H, W, 3|4) array of any integer or float dtype.
            modality: ``auto``, ``ct``, ``mr``, ``rgb`` (or ultrasound, xray, endoscopy...).
            window: CT (level, width), a preset name or ``"level,width"``.
        """
        return self.embed_rgb(self.prepare(image, modality, window), use_cache)

    def embed_rgb(self, rgb: np.ndarray, use_cache: bool = True) -> Embedding:
        """Encode an already prepared (H, W, 3) uint8 image."""
        return self.embed_rgb_status(rgb, use_cache)[0]

    def embed_rgb_status(self, rgb: np.ndarray, use_cache: bool = True) -> tuple[Embedding, bool]:
        """Like :meth:`embed_rgb`, and say whether the encoder ran (False: a cache hit)."""
        key = embedding_key(self.name, rgb)
        if self.fast is not None:
            key += self.fast.key_suffix  # fast encoders never share cache entries with the exact one
        if use_cache:
            hit = self.cache.get(key)
            if hit is not None:
                return hit, False
        x, resized = self.recipe.preprocess(rgb)
        t0 = time.perf_counter()
        with self._lock, torch.inference_mode():
            fast_enc = self.fast.encoder if self.fast is not None else None
            feats = (self.module.image_encoder if fast_enc is None else fast_enc)(x.to(self.device))
            if self.fast is not None and self.fast.fp16_embeddings:
                feats = feats.half()  # this model's embeddings only; a shared cache keeps its own setting
        self.last_encode_s = time.perf_counter() - t0
        emb = Embedding(feats, tuple(rgb.shape[:2]), resized, self.name, key)
        return (self.cache.put(emb) if use_cache else emb), True

    # -- decoding ---------------------------------------------------------
    def predict(
        self, embedding: Embedding, boxes: BoxLike, region: tuple[int, int, int, int] | None = None, exact: bool = False
    ) -> Prediction:
        """Masks and predicted IoU for one or more boxes on an embedded image.

        Args:
            embedding: from :meth:`embed`.
            boxes: (x0, y0, x1, y1) or (N, 4), x = column, y = row, in image pixels.
            region: optional (y0, y1, x0, x1): compute the full-size mask only there
                (same values, less upsampling; the live preview uses it).
            exact: use the authors' decoder path even when fast paths are attached
                (the plugin previews with the fast decoder and accepts with this).
        """
        if embedding.model != self.name:
            raise ModelError(f"embedding was made by {embedding.model!r}, not {self.name!r}")
        boxes = normalize_boxes(boxes, embedding.original_size)
        box_t = self.recipe.scale_boxes(boxes, embedding.original_size, embedding.resized).to(self.device)
        t0 = time.perf_counter()
        with self._lock, torch.inference_mode():
            if not exact and self.fast is not None and self.fast.decoder is not None:
                masks, iou = self.fast.decode(self, embedding, box_t, region)
            else:
                feats = embedding.features.to(self.device, torch.float32)
                dtype = None if exact or self.fast is None else self.fast.autocast
                with autocast(self.device, dtype):
                    sparse, dense = self.module.prompt_encoder(points=None, boxes=box_t[:, None, :], masks=None)
                    logits, iou = self.module.mask_decoder(
                        image_embeddings=feats,
                        image_pe=self._dense_pe,
                        sparse_prompt_embeddings=sparse,
                        dense_prompt_embeddings=dense,
                        multimask_output=False,
                    )
                logits = logits.float()
                masks = self.recipe.postprocess(logits, embedding.resized, embedding.original_size, region)
        self.last_decode_s = time.perf_counter() - t0
        return Prediction(masks.cpu().numpy(), iou[:, 0].float().cpu().numpy(), boxes)

    def warm(self, embedding: Embedding) -> None:
        """Make the fused decoder's per-image state of ``embedding`` now (memoised by its cache key),
        so the first box on it costs one decode: a session's next image, prefetched while the user
        works, answers its first box after Next without it (no-op on the authors' decoder)."""
        dec = self.fast.decoder if self.fast is not None else None
        if dec is not None and embedding.key and embedding.model == self.name:
            with torch.inference_mode():
                dec.image_state(embedding.features, embedding.key)

    def segment(
        self, image_or_embedding: Any, box: BoxLike | None = None, boxes: BoxLike | None = None, **embed_kwargs: Any
    ) -> np.ndarray:
        """Bool mask (H, W) for ``box``, or (N, H, W) for ``boxes``.

        ``image_or_embedding`` is an :class:`Embedding` or a 2D image (then embedded
        with ``embed_kwargs``: modality, window). Given an image, LiteMedSAM (unless
        ``exact``) answers each box with the zoom strategy of :mod:`engine.zoom` (crops
        re-encoded around the box, voted with the full view; docs/accuracy.md); given an
        embedding, or with ``exact``, the box is decoded on that one view.
        """
        if (box is None) == (boxes is None):
            raise OptionTypeError("give exactly one of box= or boxes=")
        if not isinstance(image_or_embedding, Embedding) and not self.exact and self.name == "litemedsam":
            from .zoom import segment_boxes

            rgb = self.prepare(image_or_embedding, **embed_kwargs)
            masks = segment_boxes(self, rgb, box if box is not None else boxes)
            return masks[0] if box is not None else masks
        emb = image_or_embedding
        if not isinstance(emb, Embedding):
            emb = self.embed(emb, **embed_kwargs)
        chosen = box if box is not None else boxes
        assert chosen is not None
        pred = self.predict(emb, chosen)
        return pred.masks[0] if box is not None else pred.masks

    def segment_volume(self, volume: Any, box: Any, slice: int, **kwargs: Any) -> np.ndarray:
        """3D mask (D, H, W) from one box on one slice; see :func:`engine.volume.propagate`."""
        from .volume import segment_volume

        return segment_volume(self, volume, box, slice, **kwargs)
