"""The disk embedding cache never fails an embed: shared folders, unwritable folders, bad entries.

Real-shaped LiteMedSAM embeddings ((1, 256, 64, 64) float32, 4 MB) and, where a model is
needed, the real model; several real processes share one folder over its size cap.
"""

from __future__ import annotations

import errno
import io
import multiprocessing as mp
import os
import threading
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_medsam.engine import cache as cache_mod
from napari_medsam.engine.cache import Embedding, EmbeddingCache

SHAPE = (1, 256, 64, 64)
ONE = int(np.prod(SHAPE)) * 4  # bytes of one float32 embedding


def _emb(i: int, dtype=torch.float32) -> Embedding:
    g = torch.Generator().manual_seed(i)
    feats = torch.randn(SHAPE, generator=g).to(dtype)
    return Embedding(feats, (512, 480), (256, 240), "litemedsam", f"litemedsam-{i:032x}")


def _hammer(folder: str, seed: int, rounds: int, out) -> None:
    """One process: put and get random keys of a small pool on a cache capped near 2 entries."""
    rng = np.random.default_rng(seed)
    cache = EmbeddingCache(max_bytes=ONE, disk_dir=folder, disk_max_bytes=int(2.5 * ONE))
    errors, bad = [], 0
    for _ in range(rounds):
        i = int(rng.integers(0, 6))
        try:
            if rng.random() < 0.6:
                cache.put(_emb(i))
            else:
                cache.clear()  # force the disk path
                got = cache.get(f"litemedsam-{i:032x}")
                if got is not None and not torch.equal(got.features, _emb(i).features):
                    bad += 1  # a half-written or foreign entry served as a hit
        except Exception as exc:  # noqa: BLE001 - the test counts every failure
            errors.append(f"{type(exc).__name__}: {exc}")
    out.put((seed, errors[:5], len(errors), bad))


def test_processes_sharing_one_folder_over_its_cap_never_fail(tmp_path):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_hammer, args=(str(tmp_path), seed, 120, out)) for seed in range(3)]
    for p in procs:
        p.start()
    results = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(60)
    for seed, first, n_errors, bad in results:
        assert n_errors == 0, f"process {seed}: {n_errors} failures, e.g. {first}"
        assert bad == 0, f"process {seed} read {bad} entries that were not what was written"
    total = sum(f.stat().st_size for f in tmp_path.glob("*.npz"))
    assert total <= 2.5 * ONE + ONE, "the cap holds once the writers stop"
    assert not list(tmp_path.glob("*.tmp")), "no temporary files are left behind"


def test_eviction_skips_files_another_process_just_deleted(tmp_path, monkeypatch):
    cache = EmbeddingCache(disk_dir=tmp_path, disk_max_bytes=int(1.5 * ONE))
    for i in range(3):
        cache.put(_emb(i))
    real_stat = Path.stat
    doomed = set()

    def racing_stat(self, *a, **k):  # another process deletes each file right before we stat it
        if self.suffix == ".npz" and self.name not in doomed:
            doomed.add(self.name)
            os.unlink(self)
        return real_stat(self, *a, **k)

    monkeypatch.setattr(Path, "stat", racing_stat)
    for i in range(3, 6):
        cache.put(_emb(i))  # must not raise FileNotFoundError
    monkeypatch.undo()
    assert cache.get(_emb(5).key) is not None


def test_eviction_when_entries_vanish_between_listing_and_unlink(tmp_path, monkeypatch):
    cache = EmbeddingCache(disk_dir=tmp_path, disk_max_bytes=int(1.5 * ONE))
    for i in range(3):
        cache.put(_emb(i))
    real_unlink = os.unlink

    def gone(path, *a, **k):
        if str(path).endswith(".npz"):
            real_unlink(path)  # someone else got there first
        return real_unlink(path, *a, **k)

    monkeypatch.setattr(os, "unlink", gone)
    cache.put(_emb(7))
    cache.put(_emb(8))


def _disk_failure(monkeypatch, err: int, where: str = "replace"):
    real_replace, real_open = os.replace, open

    def failing_replace(src, dst, *a, **k):
        raise OSError(err, os.strerror(err), str(dst))

    if where == "replace":
        monkeypatch.setattr(os, "replace", failing_replace)
    else:
        real_write = Path.write_bytes

        def failing_write(self, data):
            if self.name.endswith(".tmp"):
                with real_open(self, "wb") as f:
                    f.write(data[: len(data) // 3])  # part of it landed, then the disk filled
                raise OSError(err, os.strerror(err), str(self))
            return real_write(self, data)

        monkeypatch.setattr(Path, "write_bytes", failing_write)
    return real_replace


@pytest.mark.parametrize(
    "err, where",
    [
        (errno.ENOSPC, "replace"),
        (errno.ENOSPC, "write"),
        (errno.EROFS, "replace"),
        (errno.EACCES, "write"),
        (errno.EDQUOT, "write"),
        (errno.EIO, "write"),
    ],
)
def test_unwritable_folder_falls_back_to_memory_with_one_warning(tmp_path, monkeypatch, err, where):
    cache = EmbeddingCache(disk_dir=tmp_path)
    _disk_failure(monkeypatch, err, where)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i in range(5):
            out = cache.put(_emb(i))
            assert cache.get(out.key) is out, "the entry is still served from memory"
    monkeypatch.undo()
    ours = [w for w in caught if "embedding cache" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert str(tmp_path) in str(ours[0].message) and os.strerror(err) in str(ours[0].message)
    assert not list(tmp_path.iterdir()), "nothing half-written is left in the folder"
    assert cache.disk_writable is False


def test_folder_that_cannot_be_created_is_memory_only(tmp_path, lite, samples):
    from napari_medsam import MedSAM
    from napari_medsam.engine.io import read_image

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.warns(RuntimeWarning, match="embedding cache") as caught:
        cache = EmbeddingCache(disk_dir=blocker / "cache")
        model = MedSAM(lite.spec, lite.module, lite.device, cache)
        img = read_image(samples / "busi_malignant_1.png").array
        a = model.embed(img)
        b = model.embed(img)
    assert a is b and cache.hits == 1
    assert len([w for w in caught if "embedding cache" in str(w.message)]) == 1


def test_read_only_folder_still_serves_what_it_holds(tmp_path, monkeypatch):
    writer = EmbeddingCache(disk_dir=tmp_path)
    writer.put(_emb(1))
    reader = EmbeddingCache(disk_dir=tmp_path)
    _disk_failure(monkeypatch, errno.EROFS)

    def no_utime(*a, **k):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "utime", no_utime)
    with pytest.warns(RuntimeWarning, match="embedding cache"):
        reader.put(_emb(2))
    got = reader.get(_emb(1).key)
    assert got is not None and torch.equal(got.features, _emb(1).features) and reader.disk_hits == 1


def test_folder_deleted_while_running_is_recreated(tmp_path):
    import shutil

    folder = tmp_path / "emb"
    cache = EmbeddingCache(disk_dir=folder)
    cache.put(_emb(1))
    shutil.rmtree(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.put(_emb(2))
    assert (folder / f"{_emb(2).key}.npz").is_file()


# -- bad entries ----------------------------------------------------------------------------
def _entry(tmp_path) -> tuple:
    cache = EmbeddingCache(disk_dir=tmp_path)
    emb = cache.put(_emb(3))
    return cache, emb, tmp_path / f"{emb.key}.npz"


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _good_arrays(emb):
    feats = emb.features.numpy()
    return {
        "features": feats,
        "original": np.array(emb.original_size),
        "resized": np.array(emb.resized),
        "model": np.array(emb.model),
        "checksum": np.array(cache_mod.content_hash(feats)),
    }


CORRUPTIONS = {
    "truncated": lambda data, emb: data[: len(data) // 2],
    "first_kb_only": lambda data, emb: data[:1000],
    "empty": lambda data, emb: b"",
    "random_bytes": lambda data, emb: os.urandom(5000),
    "flipped_payload_byte": lambda data, emb: data[:2000] + bytes([data[2000] ^ 0xFF]) + data[2001:],
    "zeroed_tail": lambda data, emb: data[:-200] + b"\0" * 200,
    "wrong_checksum": lambda data, emb: _npz(**{**_good_arrays(emb), "checksum": np.array("0" * 32)}),
    "no_checksum": lambda data, emb: _npz(**{k: v for k, v in _good_arrays(emb).items() if k != "checksum"}),
    "features_of_other_entry": lambda data, emb: _npz(**{**_good_arrays(emb), "features": _emb(4).features.numpy()}),
    "wrong_shape": lambda data, emb: _npz(
        **{
            **_good_arrays(emb),
            "features": np.zeros((3, 3), np.float32),
            "checksum": np.array(cache_mod.content_hash(np.zeros((3, 3), np.float32))),
        }
    ),
    "object_array": lambda data, emb: _npz(**{**_good_arrays(emb), "model": np.array([{"a": 1}], dtype=object)}),
    "no_model_name": lambda data, emb: _npz(**{**_good_arrays(emb), "model": np.array("")}),
    "bad_sizes": lambda data, emb: _npz(**{**_good_arrays(emb), "original": np.array([1, 2, 3])}),
    "plain_npy": lambda data, emb: _npy(emb.features.numpy()),
    "zip_of_text": lambda data, emb: _zip_text(),
}


def _npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def _zip_text() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("features.npy", "hello")
    return buf.getvalue()


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_entry_is_a_miss_and_removed(tmp_path, kind):
    _, emb, path = _entry(tmp_path)
    path.write_bytes(CORRUPTIONS[kind](path.read_bytes(), emb))
    fresh = EmbeddingCache(disk_dir=tmp_path)
    assert fresh.get(emb.key) is None, f"{kind} served as a hit"
    assert fresh.misses == 1 and fresh.disk_hits == 0
    assert not path.exists(), f"a {kind} entry is removed"
    again = fresh.put(_emb(3))
    assert torch.equal(EmbeddingCache(disk_dir=tmp_path).get(again.key).features, again.features)


@pytest.mark.parametrize(
    "exc",
    [
        PermissionError(errno.EACCES, "Permission denied"),
        MemoryError(),
        OSError(errno.EIO, "Input/output error"),
        InterruptedError(errno.EINTR, "x"),
    ],
)
def test_entry_that_cannot_be_read_is_a_miss_but_kept(tmp_path, monkeypatch, exc):
    _, emb, path = _entry(tmp_path)
    before = path.read_bytes()

    def failing(self, *a, **k):
        raise exc

    monkeypatch.setattr(Path, "read_bytes", failing)
    monkeypatch.setattr(np, "load", lambda *a, **k: (_ for _ in ()).throw(exc))
    fresh = EmbeddingCache(disk_dir=tmp_path)
    assert fresh.get(emb.key) is None
    monkeypatch.undo()
    assert path.read_bytes() == before, f"{type(exc).__name__} must not delete a good entry"
    assert torch.equal(EmbeddingCache(disk_dir=tmp_path).get(emb.key).features, emb.features)


def test_entry_vanishing_between_exists_and_read_is_a_plain_miss(tmp_path, monkeypatch):
    _, emb, path = _entry(tmp_path)
    real = Path.read_bytes

    def vanish(self):
        if self == path:
            os.unlink(path)
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", vanish)
    fresh = EmbeddingCache(disk_dir=tmp_path)
    assert fresh.get(emb.key) is None and fresh.misses == 1


def test_fp16_entries_round_trip_and_stale_tmp_files_are_cleaned(tmp_path):
    cache = EmbeddingCache(disk_dir=tmp_path, fp16=True, disk_max_bytes=10 * ONE)
    stale = tmp_path / ".litemedsam-dead.npz.999999.1.tmp"
    stale.write_bytes(b"x" * 100)
    old = time.time() - 7200
    os.utime(stale, (old, old))
    fresh_tmp = tmp_path / ".litemedsam-live.npz.999998.1.tmp"
    fresh_tmp.write_bytes(b"x" * 100)  # another process is writing it right now
    emb = cache.put(_emb(1))
    assert emb.features.dtype == torch.float16
    got = EmbeddingCache(disk_dir=tmp_path).get(emb.key)
    assert got.features.dtype == torch.float16 and torch.equal(got.features, emb.features)
    assert not stale.exists(), "temporary files of a killed writer are removed after an hour"
    assert fresh_tmp.exists(), "a writer's live temporary file is left alone"


def test_readers_never_see_a_half_written_entry(tmp_path):
    """Threads in one process: one rewrites an entry, others read it; every hit is whole."""
    key_emb = _emb(11)
    writer_cache = EmbeddingCache(disk_dir=tmp_path, max_bytes=1)
    stop = threading.Event()
    seen, bad = [0], [0]

    def write():
        while not stop.is_set():
            writer_cache.put(key_emb)

    def read():
        c = EmbeddingCache(disk_dir=tmp_path, max_bytes=1)
        while not stop.is_set():
            c.clear()
            got = c.get(key_emb.key)
            if got is not None:
                seen[0] += 1
                bad[0] += not torch.equal(got.features, key_emb.features)

    threads = [threading.Thread(target=write)] + [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(3)
    stop.set()
    for t in threads:
        t.join()
    assert seen[0] > 0 and bad[0] == 0


def test_len_and_nbytes_take_the_lock(tmp_path):
    cache = EmbeddingCache(max_bytes=3 * ONE)
    for i in range(3):
        cache.put(_emb(i))
    acquired = []

    class Spy:
        def __init__(self, lock):
            self.lock = lock

        def __enter__(self):
            acquired.append(1)
            return self.lock.__enter__()

        def __exit__(self, *a):
            return self.lock.__exit__(*a)

    cache._lock = Spy(cache._lock)
    assert len(cache) == 3 and acquired == [1]
    assert cache.nbytes == 3 * ONE and acquired == [1, 1]
