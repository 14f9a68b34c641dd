"""engine.atomic: the one temp + fsync + replace writer (the old copies in io, cache, fast and checkpoints
disagreed on fsync and on cleaning their temp file up after a failure)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from napari_medsam.engine import atomic
from napari_medsam.engine.atomic import atomic_write, atomic_write_bytes, atomic_write_text, is_temp_name


def _names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_writes_bytes_and_text_creating_parents(tmp_path):
    p = tmp_path / "a" / "b" / "record.json"
    assert atomic_write_text(p, '{"é": 1}') == p
    assert p.read_text(encoding="utf-8") == '{"é": 1}'
    atomic_write_bytes(p, b"\x00\x01")
    assert p.read_bytes() == b"\x00\x01"
    assert _names(p.parent) == ["record.json"]


@pytest.mark.parametrize("exc", [RuntimeError("disk full midway"), KeyboardInterrupt(), OSError(28, "No space left")])
def test_failed_writer_keeps_target_and_removes_temp(tmp_path, exc):
    target = tmp_path / "seg.tif"
    target.write_bytes(b"ORIGINAL")

    def writer(tmp: Path) -> None:
        tmp.write_bytes(b"half a file")
        raise exc

    with pytest.raises(type(exc)):
        atomic_write(target, writer)
    assert target.read_bytes() == b"ORIGINAL"
    assert _names(tmp_path) == ["seg.tif"]


def test_failed_replace_keeps_target_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "x.npz"
    target.write_bytes(b"OLD")

    def failing_replace(src, dst):
        raise OSError("replace failed")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="replace failed"):
        atomic_write_bytes(target, b"NEW")
    assert target.read_bytes() == b"OLD"
    assert _names(tmp_path) == ["x.npz"]


def test_contents_and_folder_are_fsynced(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    atomic_write_bytes(tmp_path / "f.bin", b"data")
    assert len(calls) == (2 if hasattr(os, "O_DIRECTORY") else 1)  # the file, then the folder


@pytest.mark.parametrize(
    "name, suffix",
    [("seg.nii.gz", ".nii.gz"), ("img.ome.tif", ".ome.tif"), ("a.tif", ".tif"), ("noext", ""), (".hidden", "")],
)
def test_temp_file_is_a_sibling_keeping_the_suffix(tmp_path, name, suffix):
    seen = []
    atomic_write(tmp_path / name, lambda tmp: (seen.append(tmp), tmp.write_bytes(b"x")))
    tmp = seen[0]
    assert tmp.parent == tmp_path
    assert tmp.name.startswith(".") and tmp.name.endswith(suffix)
    assert is_temp_name(tmp.name)
    assert not is_temp_name(name)


def test_concurrent_writers_never_mix(tmp_path):
    target = tmp_path / "shared.bin"
    payloads = [bytes([i]) * 200_000 for i in range(8)]
    errors = []

    def write(data: bytes) -> None:
        try:
            for _ in range(5):
                atomic_write_bytes(target, data)
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert target.read_bytes() in payloads
    assert _names(tmp_path) == ["shared.bin"]


_KILL_SCRIPT = """
import os, sys
from napari_medsam.engine.atomic import atomic_write_bytes
target = sys.argv[1]
i = 0
parent = os.getppid()
print("ready", flush=True)
while os.getppid() == parent:  # ends if pytest itself was killed (an orphan wrote 3 MB in a loop)
    i += 1
    atomic_write_bytes(target, bytes([i % 251]) * 3_000_000)
"""


def test_sigkill_at_random_instants_leaves_a_whole_file(tmp_path):
    """Kill a writer at 10 random instants: the target is always one complete version."""
    import random

    target = tmp_path / "big.bin"
    rng = random.Random(12)
    for _ in range(10):
        proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, str(target)], stdout=subprocess.PIPE)
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if target.exists():
            data = target.read_bytes()
            assert len(data) == 3_000_000 and data == data[:1] * len(data), "torn file after SIGKILL"
        stray = [n for n in _names(tmp_path) if n != "big.bin"]
        assert all(is_temp_name(n) for n in stray)  # at most a recognisable temp file
        for n in stray:
            (tmp_path / n).unlink()


def test_not_durable_skips_fsync_but_stays_atomic(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: calls.append(fd))
    target = tmp_path / "entry.npz"
    atomic_write_bytes(target, b"cache entry", durable=False)
    assert target.read_bytes() == b"cache entry" and not calls
    with pytest.raises(RuntimeError):
        atomic_write(target, lambda tmp: (tmp.write_bytes(b"x"), (_ for _ in ()).throw(RuntimeError("boom"))), False)
    assert target.read_bytes() == b"cache entry" and _names(tmp_path) == ["entry.npz"]


# -- the other writers now go through atomic_write ---------------------------------------------
def test_checkpoint_download_is_atomic_and_verified(tmp_path):
    """models.checkpoints.download streams into atomic_write's temp file (a local file:// address)."""
    import torch

    from napari_medsam.engine.errors import CheckpointError
    from napari_medsam.engine.models.checkpoints import CheckpointSource, download

    good = tmp_path / "src" / "w.pth"
    good.parent.mkdir()
    torch.save({"w": torch.zeros(3)}, good)
    out_dir = tmp_path / "cache"
    target = out_dir / "w.pth"
    src = CheckpointSource("w.pth", size=good.stat().st_size, url=good.as_uri())
    assert download(src, target) == target
    assert target.read_bytes() == good.read_bytes() and _names(out_dir) == ["w.pth"]
    bad = tmp_path / "src" / "junk.pth"
    bad.write_bytes(os.urandom(5000))
    target.write_bytes(b"previous weights")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        download(CheckpointSource("w.pth", url=bad.as_uri()), target)
    assert target.read_bytes() == b"previous weights"  # a failed download never replaces the file
    assert _names(out_dir) == ["w.pth"]  # and leaves no temp behind
