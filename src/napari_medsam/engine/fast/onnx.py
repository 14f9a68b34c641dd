"""The TinyViT encoder run by ONNX Runtime: export once, keep the file, run it in a session.

The export (``torch.onnx.export``, TorchScript-based; it needs the ``onnx`` package) is
named by a digest of the weights and the torch version, so it is made once per weights
and reused by every later process. It lives in a stable folder (see :func:`_onnx_dir`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from napari_medsam.engine.atomic import atomic_write

log = logging.getLogger(__name__)

#: environment variables naming the folder of exported ONNX files (first set one wins)
ONNX_CACHE_ENV = ("NAPARI_MEDSAM_ONNX_CACHE", "MEDSAM_ONNX_CACHE")
OPSET = 17
#: exported files kept per folder (one per set of weights; the least recently used go first)
MAX_EXPORTS = 4


def have_onnxruntime() -> bool:
    """onnxruntime (to run) and onnx (``torch.onnx.export`` needs it) both importable."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    except Exception as exc:  # noqa: BLE001 - a broken native library must not break the import of the engine
        log.warning("onnxruntime/onnx failed to import: %s", exc)
        return False
    return True


def export_onnx(enc: nn.Module, cache_dir: str | None = None) -> str:
    """Export a (fused) TinyViT to ONNX once; the file is named by a digest of the weights."""
    size = int(getattr(enc, "img_size", 256))
    folder = _onnx_dir(cache_dir)
    path = os.path.join(folder, f"tinyvit-{_weights_digest(enc)}.onnx")
    if not os.path.exists(path):  # engine.atomic: sibling temp, fsync, replace; temp removed on failure

        def write(tmp: Path) -> None:
            with torch.no_grad():
                _export(enc, (torch.zeros(1, 3, size, size),), str(tmp), ["image"], ["embedding"])

        atomic_write(path, write)
        _prune(folder, keep=path)
    else:
        try:
            os.utime(path)  # recently used: pruned last
        except OSError as exc:  # a read-only shared folder: still usable
            log.debug("could not touch %s: %s", path, exc)
    return path


def _prune(folder: str, keep: str, limit: int = MAX_EXPORTS) -> None:
    """Remove all but the ``limit`` most recently used exports (random or fine-tuned weights would pile up)."""
    try:
        names = [f for f in os.listdir(folder) if f.startswith("tinyvit-") and f.endswith(".onnx")]
        files = sorted((os.path.join(folder, f) for f in names), key=os.path.getmtime, reverse=True)
        for old in files[limit:]:
            if old != keep:
                os.remove(old)
    except OSError as exc:
        log.warning("could not prune old ONNX exports in %s: %s", folder, exc)


class OrtEncoder:
    """ONNX Runtime session over an exported TinyViT; called like the module."""

    def __init__(self, path: str, threads: int | None = None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = int(threads or 0)  # 0: ONNX Runtime's default, one per physical core
        so.inter_op_num_threads = 1
        # no busy-waiting: on 2 cores shared with the GUI a spinning pool steals the decoder's core
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        self.path = path

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {"image": np.ascontiguousarray(x.detach().cpu().numpy(), np.float32)})[0]
        return torch.from_numpy(out)


def _weights_digest(module: nn.Module) -> str:
    """Short digest of a module's float tensors (names the exported ONNX file)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{torch.__version__}|{module.__class__.__name__}".encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _usable(folder: str) -> bool:
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        log.warning("ONNX cache folder %s is unusable: %s", folder, exc)
        return False
    if not os.access(folder, os.W_OK):
        log.warning("ONNX cache folder %s is not writable", folder)
        return False
    return True


def _onnx_dir(cache_dir: str | None = None) -> str:
    """Where exported ONNX files live, always the same folder for the same settings.

    ``cache_dir``, else ``$NAPARI_MEDSAM_ONNX_CACHE`` / ``$MEDSAM_ONNX_CACHE``, else the
    user cache folder, else (logged) one fixed folder per user under the system temp
    folder, so an export is reused, not redone into a new folder each time.
    Raises OSError when none of them can be written.
    """
    tried = []
    for cand in (cache_dir, *(os.environ.get(v) for v in ONNX_CACHE_ENV)):
        if cand:
            tried.append(cand)
            if _usable(cand):
                return cand
    from platformdirs import user_cache_dir

    for cand in (
        os.path.join(user_cache_dir("napari-medsam"), "onnx"),
        os.path.join(tempfile.gettempdir(), f"napari-medsam-onnx-{_user_tag()}"),
    ):
        tried.append(cand)
        if _usable(cand):
            if len(tried) > 1:
                log.warning("exported ONNX files go to %s (%s unusable)", cand, ", ".join(tried[:-1]))
            return cand
    raise OSError(f"no writable folder for exported ONNX files (tried {', '.join(tried)})")


def _user_tag() -> str:
    getuid = getattr(os, "getuid", None)
    return str(getuid()) if getuid is not None else (os.environ.get("USERNAME") or "user")


def _export(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: str,
    inputs: Sequence[str],
    outputs: Sequence[str],
    dynamic: dict | None = None,
) -> None:
    kw: dict = {"input_names": list(inputs), "output_names": list(outputs), "opset_version": OPSET}
    if dynamic:
        kw["dynamic_axes"] = dynamic
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, args, path, dynamo=False, **kw)
        except TypeError:  # older torch without the dynamo switch
            torch.onnx.export(module, args, path, **kw)
