"""Issue 15: a 512 x 512 x 300 CT-like volume opened, prefetched and propagated; what memory it holds.

Runs in a child process (``python benchmarks/memory.py N_PREFETCH``) so its peak RSS is its own.
The volume is synthetic (int16 Hounsfield-like: a body ellipse with noise and a brighter sphere
spanning ~50 slices), 157 MB as int16. "Opened" = the volume-wide 8-bit conversion the plugin and
``segment_volume`` run; "prefetched" = slices encoded current slice outward into the model's
:class:`EmbeddingCache` (fp16 embeddings, memory LRU capped at ``max_bytes``, disk store for all);
then one box on the key slice is propagated with the default stop rule.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (300, 512, 512)
KEY = 150


def synthetic_ct(shape=SHAPE, seed=0):
    d, h, w = shape
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    body = ((yy - h / 2) / (0.42 * h)) ** 2 + ((xx - w / 2) / (0.45 * w)) ** 2 <= 1
    vol = np.empty(shape, np.int16)
    for z in range(d):
        sl = np.where(body, 40, -1000).astype(np.float32)
        r2 = 60**2 - (z - KEY) ** 2 * (60 / 25) ** 2  # sphere-like object, about 50 slices deep
        if r2 > 0:
            sl[(yy - 230) ** 2 + (xx - 290) ** 2 <= r2] = 180
        sl += rng.normal(0, 15, (h, w)).astype(np.float32)
        vol[z] = np.clip(sl, -1024, 3000).astype(np.int16)
    return vol


class RSS:
    """Peak resident memory of this process per phase (psutil sampled every 20 ms)."""

    def __init__(self):
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def now(self):
        return self.proc.memory_info().rss

    def phase(self):
        """Peak since the last call, and reset to the current value."""
        p = max(self.peak, self.now())
        self.peak = self.now()
        return p


def child(n_prefetch: int, max_bytes: int | None) -> dict:
    from napari_medsam import EmbeddingCache, MedSAM
    from napari_medsam.engine.cache import DEFAULT_MAX_BYTES
    from napari_medsam.engine.intensity import gray_to_rgb
    from napari_medsam.engine.precompute import outward
    from napari_medsam.engine.volume import propagate, volume_to_uint8

    rss = RSS()
    out = {"shape": SHAPE}
    model = MedSAM.load("litemedsam", device="cpu")
    model.embed_rgb(np.zeros((64, 64, 3), np.uint8) + np.arange(64, dtype=np.uint8)[None, :, None], use_cache=False)
    out["rss_model_mb"] = rss.phase() / 1e6
    vol = synthetic_ct()
    out["volume_mb"] = vol.nbytes / 1e6
    out["rss_volume_mb"] = rss.phase() / 1e6
    t = time.perf_counter()
    u8, _, _ = volume_to_uint8(vol, "ct", None)
    out["open_s"] = time.perf_counter() - t
    out["u8_mb"] = u8.nbytes / 1e6
    out["peak_open_mb"] = rss.phase() / 1e6
    disk = Path(tempfile.mkdtemp(prefix="medsam-bench-mem-"))
    cache = EmbeddingCache(max_bytes=max_bytes or DEFAULT_MAX_BYTES, fp16=True, disk_dir=disk)
    model.cache = cache
    per = []
    for z in outward(SHAPE[0], KEY)[:n_prefetch]:
        t = time.perf_counter()
        model.embed_rgb_status(gray_to_rgb(u8[z]))
        per.append(time.perf_counter() - t)
    out["prefetched"] = len(per)
    out["prefetch_per_slice_ms"] = [float(np.median(per) * 1000), float(np.percentile(per, 95) * 1000)]
    out["peak_prefetch_mb"] = rss.phase() / 1e6
    t = time.perf_counter()
    res = propagate(model, vol, (220, 160, 360, 300), KEY, modality="ct", volume_u8=u8)
    out["propagate_s"] = time.perf_counter() - t
    out["propagated_slices"] = len(res.slices)
    out["propagate_encoded"] = len(res.encoded)
    out["propagate_cached"] = len(res.cached)
    out["propagate_per_slice_ms"] = out["propagate_s"] * 1000 / max(1, len(res.slices))
    out["mask_slices"] = int(res.mask.any(axis=(1, 2)).sum())
    out["peak_propagate_mb"] = rss.phase() / 1e6
    out["cache_ram_mb"] = cache.nbytes / 1e6
    out["cache_ram_entries"] = len(cache)
    files = list(disk.glob("*.npz"))
    out["cache_disk_mb"] = sum(f.stat().st_size for f in files) / 1e6
    out["cache_disk_entries"] = len(files)
    out["cache_max_mb"] = cache.max_bytes / 1e6
    out["embedding_fp16_mb"] = 256 * 64 * 64 * 2 / 1e6
    out["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["rss_end_mb"] = rss.now() / 1e6
    for f in files:
        f.unlink()
    disk.rmdir()
    return out


def bench_memory(n_prefetch=SHAPE[0], max_bytes=None, timeout=1500):
    """Run :func:`child` in a fresh process; returns its dict."""
    cmd = [sys.executable, str(Path(__file__).resolve()), str(n_prefetch), str(max_bytes or 0)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if p.returncode != 0:
        raise RuntimeError(f"memory benchmark failed: {p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def lines(r: dict) -> list[str]:
    n = r["shape"][0]
    f32 = n * 256 * 64 * 64 * 4 / 1e6
    return [
        "",
        "## 3D memory: a 512 x 512 x 300 CT-like volume (issue 15)",
        "",
        (
            f"Synthetic int16 volume {r['shape'][2]} x {r['shape'][1]} x {n} ({r['volume_mb']:.0f} MB), "
            "run in a fresh process. Opened = the volume-wide CT window to 8 bits; prefetched = "
            f"{r['prefetched']} slices encoded from slice {KEY} outward into the model's embedding cache "
            f"(fp16 embeddings of {r['embedding_fp16_mb']:.1f} MB, memory LRU capped at {r['cache_max_mb']:.0f} MB, "
            "every entry also on disk); then one box on the key slice, propagated with the default stop rule."
        ),
        "",
        "| what | value |",
        "|---|---|",
        f"| resident memory after loading the model | {r['rss_model_mb']:.0f} MB |",
        f"| + the int16 volume | {r['rss_volume_mb']:.0f} MB |",
        f"| peak while opening (8-bit conversion, {r['u8_mb']:.0f} MB result, {r['open_s']:.1f} s) | {r['peak_open_mb']:.0f} MB |",
        f"| peak while prefetching {r['prefetched']} slices | {r['peak_prefetch_mb']:.0f} MB |",
        (
            f"| prefetch per slice, median / p95 | {r['prefetch_per_slice_ms'][0]:.0f} / "
            f"{r['prefetch_per_slice_ms'][1]:.0f} ms |"
        ),
        (
            f"| propagation: {r['propagated_slices']} slices ({r['mask_slices']} in the mask), "
            f"{r['propagate_encoded']} encoded, {r['propagate_cached']} from the cache | "
            f"{r['propagate_s']:.1f} s ({r['propagate_per_slice_ms']:.0f} ms per slice) |"
        ),
        f"| peak while propagating | {r['peak_propagate_mb']:.0f} MB |",
        f"| embeddings held in RAM (cache) | {r['cache_ram_entries']} entries, {r['cache_ram_mb']:.0f} MB |",
        f"| embeddings on disk | {r['cache_disk_entries']} entries, {r['cache_disk_mb']:.0f} MB |",
        f"| peak RSS of the process (getrusage) | {r['ru_maxrss_mb']:.0f} MB |",
        "",
        (
            f"{n} float32 embeddings would be {f32:.0f} MB; fp16 halves that, and the memory LRU keeps at most "
            f"`max_bytes` of them (the rest is read back from disk on demand)."
        ),
    ]


if __name__ == "__main__":
    print(json.dumps(child(int(sys.argv[1]), int(sys.argv[2]) or None)))
