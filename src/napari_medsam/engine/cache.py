"""Embedding cache: an in-memory LRU bounded by bytes, with an optional disk store.

Keys are strings built by :func:`embedding_key` from the model name and a content
hash of the exact 8-bit RGB pixels the encoder sees, so any change of intensity
settings (CT window, percentile rule...) gives a new key. Disk entries carry a
checksum; a corrupt or truncated entry is deleted and reported as a miss.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

Size = Tuple[int, int]


@dataclass
class Embedding:
    """An encoded image and what postprocessing needs.

    Attributes:
        features: (1, C, 64, 64) encoder output (float32, or float16 when stored compact).
        original_size: (H, W) of the image the masks are returned at.
        resized: (h, w) of the unpadded image at model input scale.
        model: registry name of the model that made it.
        key: cache key.
    """

    features: torch.Tensor
    original_size: Size
    resized: Size
    model: str
    key: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.features.element_size() * self.features.nelement()


def content_hash(array: np.ndarray) -> str:
    """Fast digest of an array's shape, dtype and bytes (blake2b, ~1 ms per 512 x 512 x 3)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{array.shape}|{array.dtype}".encode())
    h.update(np.ascontiguousarray(array).data)
    return h.hexdigest()


def embedding_key(model: str, rgb: np.ndarray) -> str:
    return f"{model}-{content_hash(rgb)}"


class EmbeddingCache:
    """Thread-safe LRU of :class:`Embedding` objects.

    Args:
        max_bytes: memory budget; least recently used entries are evicted past it.
        fp16: store features as float16 (half the memory; see docs/accuracy.md for
            the measured mask agreement). Features are returned as stored; the
            predictor casts them back to float32.
        disk_dir: optional folder for a persistent store that survives restarts.
        disk_max_bytes: size cap of the disk store (oldest-used files evicted).
    """

    def __init__(self, max_bytes: int = 1 << 30, fp16: bool = False, disk_dir: Optional[os.PathLike] = None, disk_max_bytes: int = 8 << 30):
        self.max_bytes = int(max_bytes)
        self.fp16 = fp16
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self.disk_max_bytes = int(disk_max_bytes)
        self._mem: "OrderedDict[str, Embedding]" = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()
        self.hits = self.misses = self.disk_hits = 0
        if self.disk_dir:
            self.disk_dir.mkdir(parents=True, exist_ok=True)

    def __len__(self) -> int:
        return len(self._mem)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._mem or (self.disk_dir is not None and self._disk_path(key).exists())

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, key: str) -> Optional[Embedding]:
        with self._lock:
            emb = self._mem.get(key)
            if emb is not None:
                self._mem.move_to_end(key)
                self.hits += 1
                return emb
        emb = self._disk_get(key)
        if emb is not None:
            self.disk_hits += 1
            self._remember(emb)
            return emb
        self.misses += 1
        return None

    def put(self, emb: Embedding) -> Embedding:
        if self.fp16 and emb.features.dtype == torch.float32:
            emb = Embedding(emb.features.half(), emb.original_size, emb.resized, emb.model, emb.key, emb.meta)
        self._remember(emb)
        if self.disk_dir is not None:
            self._disk_put(emb)
        return emb

    def clear(self) -> None:
        with self._lock:
            self._mem.clear()
            self._bytes = 0

    def _remember(self, emb: Embedding) -> None:
        with self._lock:
            old = self._mem.pop(emb.key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._mem[emb.key] = emb
            self._bytes += emb.nbytes
            while self._bytes > self.max_bytes and len(self._mem) > 1:
                _, evicted = self._mem.popitem(last=False)
                self._bytes -= evicted.nbytes

    # -- disk store ---------------------------------------------------------
    def _disk_path(self, key: str) -> Path:
        return self.disk_dir / f"{key}.npz"

    def _disk_put(self, emb: Embedding) -> None:
        feats = emb.features.detach().cpu().numpy()
        buf = io.BytesIO()
        np.savez(
            buf,
            features=feats,
            original=np.array(emb.original_size),
            resized=np.array(emb.resized),
            model=np.array(emb.model),
            checksum=np.array(content_hash(feats)),
        )
        path = self._disk_path(emb.key)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            tmp.write_bytes(buf.getvalue())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        self._disk_evict()

    def _disk_get(self, key: str) -> Optional[Embedding]:
        if self.disk_dir is None:
            return None
        path = self._disk_path(key)
        if not path.exists():
            return None
        try:
            with np.load(path) as z:
                feats = z["features"]
                if str(z["checksum"]) != content_hash(feats):
                    raise ValueError("checksum mismatch")
                emb = Embedding(
                    torch.from_numpy(feats.copy()),
                    tuple(int(v) for v in z["original"]),
                    tuple(int(v) for v in z["resized"]),
                    str(z["model"]),
                    key,
                )
            os.utime(path)
            return emb
        except Exception:
            path.unlink(missing_ok=True)  # corrupt entry: drop it, the caller re-encodes
            return None

    def _disk_evict(self) -> None:
        files = sorted(self.disk_dir.glob("*.npz"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        while files and total > self.disk_max_bytes:
            victim = files.pop(0)
            total -= victim.stat().st_size
            victim.unlink(missing_ok=True)
