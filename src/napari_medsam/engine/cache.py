"""Embedding cache: an in-memory LRU bounded by bytes, with an optional disk store.

Keys are strings built by :func:`embedding_key` from the model name and a content
hash of the exact 8-bit RGB pixels the encoder sees, so any change of intensity
settings (CT window, percentile rule...) gives a new key.

The disk store is a speed-up, never a dependency; its guarantees (tested in
``tests/test_reliability_cache.py``, listed in ``docs/reliability.md``):

* entries are written to a temporary file and moved in place with ``os.replace``,
  so a reader (in any process) sees a whole entry or none, and a writer killed
  mid-write leaves only a temporary file (removed by the next eviction after an hour);
* each entry carries a checksum of its features; a truncated, corrupt or foreign
  entry (bad zip, bad checksum, wrong shape, dtype or model) is a miss and is removed;
  an entry that merely cannot be read now (permission, I/O error, out of memory) is
  a miss and is kept;
* several processes may share one folder over its size cap: files another process
  removed while this one evicts or reads are skipped;
* a folder that cannot be created or written (read-only, full disk, quota) turns the
  cache into a memory-only one with one ``RuntimeWarning``; entries already on disk
  are still read.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import threading
import time
import warnings
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from napari_medsam.engine.atomic import atomic_write_bytes

Size = tuple[int, int]

log = logging.getLogger(__name__)

#: default memory budget of an :class:`EmbeddingCache` (1 GiB: about 250 LiteMedSAM planes)
DEFAULT_MAX_BYTES = 1 << 30
#: default size cap of the disk store
DEFAULT_DISK_MAX_BYTES = 8 << 30
#: a temporary file older than this belongs to a writer that died; eviction removes it
STALE_TMP_S = 3600.0

_TMP_SUFFIX = ".tmp"


class CorruptEntry(ValueError):
    """A disk entry whose bytes are not a valid entry (removed, then treated as a miss)."""


@dataclass
class Embedding:
    """An encoded image and what postprocessing needs.

    Attributes:
        features: (1, C, 64, 64) encoder output (float32, or float16 when stored compact).
        original_size: (H, W) of the image the masks are returned at.
        resized: (h, w) of the unpadded image at model input scale.
        model: registry name of the model that made it.
        key: cache key.
        meta: free-form extras a caller attaches (not stored on disk).
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
    """Thread- and process-safe LRU of :class:`Embedding` objects.

    Args:
        max_bytes: memory budget; least recently used entries are evicted past it.
        fp16: store features as float16 (half the memory; see docs/accuracy.md for
            the measured mask agreement). Features are returned as stored; the
            predictor casts them back to float32.
        disk_dir: optional folder for a persistent store that survives restarts and
            may be shared by several processes.
        disk_max_bytes: size cap of the disk store (oldest-used files evicted).

    Attributes:
        disk_writable: False once the disk store failed to write (memory only from then on).
        disk_error: the reason, if so.
    """

    def __init__(
        self,
        max_bytes: int = DEFAULT_MAX_BYTES,
        fp16: bool = False,
        disk_dir: os.PathLike | None = None,
        disk_max_bytes: int = DEFAULT_DISK_MAX_BYTES,
    ):
        self.max_bytes = int(max_bytes)
        self.fp16 = fp16
        self.disk_dir = Path(disk_dir) if disk_dir else None
        self.disk_max_bytes = int(disk_max_bytes)
        self.disk_writable = self.disk_dir is not None
        self.disk_error: str | None = None
        self._mem: OrderedDict[str, Embedding] = OrderedDict()
        self._bytes = 0
        self._lock = threading.RLock()
        self.hits = self.misses = self.disk_hits = 0
        if self.disk_dir is not None:
            try:
                self.disk_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                self._disk_failed(exc)

    def __len__(self) -> int:
        with self._lock:
            return len(self._mem)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            if key in self._mem:
                return True
        return self.disk_dir is not None and self._disk_path(key).is_file()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes

    def get(self, key: str) -> Embedding | None:
        with self._lock:
            emb = self._mem.get(key)
            if emb is not None:
                self._mem.move_to_end(key)
                self.hits += 1
                return emb
        emb = self._disk_get(key)
        with self._lock:
            if emb is None:
                self.misses += 1
                return None
            self.disk_hits += 1
        self._remember(emb)
        return emb

    def put(self, emb: Embedding) -> Embedding:
        if self.fp16 and emb.features.dtype == torch.float32:
            emb = Embedding(emb.features.half(), emb.original_size, emb.resized, emb.model, emb.key, emb.meta)
        self._remember(emb)
        if self.disk_dir is not None and self.disk_writable:
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
        assert self.disk_dir is not None
        return self.disk_dir / f"{key}.npz"

    def _disk_failed(self, exc: BaseException) -> None:
        """Writing failed for good: memory only from now on, said once."""
        with self._lock:
            if not self.disk_writable and self.disk_error is not None:
                return
            self.disk_writable = False
            self.disk_error = f"{type(exc).__name__}: {exc}"
        message = (
            f"embedding cache: cannot write to {self.disk_dir} ({exc}); "
            "keeping embeddings in memory only for the rest of this run"
        )
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)

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
        data = buf.getvalue()
        path = self._disk_path(emb.key)
        for attempt in (0, 1):
            try:
                self._write_atomic(path, data)
                break
            except FileNotFoundError as exc:  # the folder was removed under us: make it again, once
                if attempt:
                    self._disk_failed(exc)
                    return
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                except OSError as exc2:
                    self._disk_failed(exc2)
                    return
            except OSError as exc:  # read-only, full disk, quota, I/O error
                self._disk_failed(exc)
                return
        try:
            self._disk_evict()
        except OSError as exc:  # never fail an embed over clean-up
            log.warning("embedding cache: eviction in %s failed: %s", self.disk_dir, exc)

    @staticmethod
    def _write_atomic(path: Path, data: bytes) -> None:
        # engine.atomic's exclusive sibling temp (ending in _TMP_SUFFIX, so eviction tells it from an entry),
        # removed on any failure; no fsync: entries are checksummed and can be recomputed
        atomic_write_bytes(path, data, durable=False, temp_suffix=_TMP_SUFFIX)

    def _disk_get(self, key: str) -> Embedding | None:
        if self.disk_dir is None:
            return None
        path = self._disk_path(key)
        try:
            data = path.read_bytes()  # whole file at once: a later replace or unlink cannot tear it
        except FileNotFoundError:
            return None
        except (OSError, MemoryError) as exc:  # cannot read it now; the entry may be fine
            log.warning("embedding cache: cannot read %s (%s): treated as a miss", path, exc)
            return None
        try:
            emb = _decode_entry(data, key)
        except MemoryError as exc:
            log.warning("embedding cache: out of memory reading %s (%s): treated as a miss", path, exc)
            return None
        except (CorruptEntry, ValueError, KeyError, EOFError, zipfile.BadZipFile, OSError) as exc:
            log.warning("embedding cache: removing corrupt entry %s (%s)", path, exc)
            _remove(path)
            return None
        with contextlib.suppress(OSError):  # gone or read-only: the entry read fine, the order is a hint
            os.utime(path)  # recently used: evicted last
        return emb

    def _disk_evict(self) -> None:
        assert self.disk_dir is not None
        entries, total, now = [], 0, time.time()
        with os.scandir(self.disk_dir) as it:
            for entry in it:
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue  # another process removed it
                if entry.name.endswith(".npz"):
                    entries.append((st.st_mtime, st.st_size, entry.path))
                    total += st.st_size
                elif (
                    entry.name.startswith(".") and entry.name.endswith(_TMP_SUFFIX) and now - st.st_mtime > STALE_TMP_S
                ):
                    _remove(Path(entry.path))  # left by a writer that was killed
        entries.sort()
        for _, size, p in entries:
            if total <= self.disk_max_bytes:
                break
            _remove(Path(p))
            total -= size


def _remove(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.debug("embedding cache: cannot remove %s: %s", path, exc)


def _decode_entry(data: bytes, key: str) -> Embedding:
    """Parse and check one disk entry; any format problem raises :class:`CorruptEntry`."""
    loaded = np.load(io.BytesIO(data), allow_pickle=False)
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise CorruptEntry(f"a {type(loaded).__name__}, not an entry archive")
    with loaded as z:
        missing = {"features", "original", "resized", "model", "checksum"} - set(z.files)
        if missing:
            raise CorruptEntry(f"missing {sorted(missing)}")
        feats = z["features"]
        original, resized, model, checksum = z["original"], z["resized"], z["model"], z["checksum"]
    if feats.ndim != 4 or feats.shape[0] != 1 or feats.dtype not in (np.float16, np.float32):
        raise CorruptEntry(f"features of shape {feats.shape} and dtype {feats.dtype}")
    if (
        original.shape != (2,)
        or resized.shape != (2,)
        or original.dtype.kind not in "iu"
        or resized.dtype.kind not in "iu"
    ):
        raise CorruptEntry("bad image sizes")
    if model.dtype.kind != "U" or checksum.dtype.kind != "U":
        raise CorruptEntry("bad model name or checksum field")
    if str(checksum) != content_hash(feats):
        raise CorruptEntry("checksum mismatch")
    name = str(model)
    if not name:
        raise CorruptEntry("no model name")
    return Embedding(
        torch.from_numpy(feats.copy()),
        (int(original[0]), int(original[1])),
        (int(resized[0]), int(resized[1])),
        name,
        key,
    )
