"""``napari-medsam precompute``: a disk embedding cache filled ahead, then used without the encoder."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile

from napari_medsam import cli
from napari_medsam.engine.cache import EmbeddingCache
from napari_medsam.engine.errors import MedSAMError
from napari_medsam.engine.io import read_image
from napari_medsam.engine.precompute import outward, planes, precompute
from napari_medsam.engine.predictor import MedSAM

BUSI = "busi_malignant_1.png"
NUCLEI = "dsb2018_nuclei.png"


@pytest.fixture()
def folder(tmp_path, samples):
    src = tmp_path / "images"
    src.mkdir()
    for name in (BUSI, NUCLEI):
        (src / name).write_bytes((samples / name).read_bytes())
    (src / "notes.txt").write_text("not an image")
    return src


def _model(lite, cache=None, **kw):
    return MedSAM(
        lite.spec, lite.module, lite.device, EmbeddingCache() if cache is None else cache, lite.checkpoint, **kw
    )


def test_outward_order():
    assert outward(5, None) == [0, 1, 2, 3, 4]
    assert outward(5, 3) == [3, 4, 2, 1, 0]
    assert sorted(outward(7, 0)) == list(range(7))
    with pytest.raises(MedSAMError, match="outside"):
        outward(3, 3)


def test_precompute_folder_then_embed_is_a_disk_hit(lite, folder, tmp_path):
    cache_dir = tmp_path / "cache"
    model = _model(lite, exact=True)
    res = precompute(folder, cache_dir, model, progress=False)
    assert (res.images, res.planes, res.encoded, res.cached, res.failed) == (2, 2, 2, 0, [])
    assert len(list(cache_dir.iterdir())) >= 2
    again = precompute(folder, cache_dir, model, progress=False)  # nothing left to encode
    assert (again.encoded, again.cached) == (0, 2)
    fresh = _model(lite, EmbeddingCache(disk_dir=cache_dir), exact=True)
    img = read_image(folder / BUSI).array
    emb, ran = fresh.embed_rgb_status(fresh.prepare(img))
    assert not ran and fresh.cache.disk_hits == 1
    np.testing.assert_array_equal(
        fresh.predict(emb, (60, 120, 300, 330)).masks, lite.predict(lite.embed(img), (60, 120, 300, 330)).masks
    )


def test_precompute_keys_follow_the_speed_mode(lite, lite_default, folder, tmp_path):
    """Embeddings precomputed with --exact are not handed to the default fast path, and the reverse."""
    cache_dir = tmp_path / "cache"
    precompute(folder / BUSI, cache_dir, _model(lite, exact=True), progress=False)
    fast = _model(lite, EmbeddingCache(disk_dir=cache_dir), fast=True, exact=False)
    _, ran = fast.embed_rgb_status(fast.prepare(read_image(folder / BUSI).array))
    assert ran and fast.cache.disk_hits == 0


def test_precompute_volume_slices_from_a_start_outward(lite, samples, tmp_path):
    """A 3-slice real volume (the ultrasound sample stacked with two shifted copies): every slice
    lands in the cache, the start slice first, and a propagation-style embed of each is a disk hit."""
    gray = read_image(samples / BUSI).array
    gray = gray[..., 0] if gray.ndim == 3 else gray
    vol = np.stack([np.roll(gray, 7 * k, axis=1) for k in range(3)])
    path = tmp_path / "vol.tif"
    tifffile.imwrite(path, vol)
    image = read_image(path)
    assert image.kind == "volume"
    model = _model(lite, exact=True)
    assert [z for z, _ in planes(model, image, start=1)] == [1, 2, 0]
    res = precompute(path, tmp_path / "cache", model, start_slice=1, progress=False)
    assert (res.images, res.planes, res.encoded) == (1, 3, 3)
    fresh = _model(lite, EmbeddingCache(disk_dir=tmp_path / "cache"), exact=True)
    for _, rgb in planes(fresh, image):
        assert not fresh.embed_rgb_status(rgb)[1]
    assert fresh.cache.disk_hits == 3


def test_precompute_cli_reports_and_fails_cleanly(lite, folder, tmp_path, capsys, monkeypatch):
    from napari_medsam.engine import segment

    monkeypatch.setattr(segment, "load_model", lambda *a, **k: _model(lite, exact=k.get("exact", False)))
    broken = folder / "broken.png"
    broken.write_bytes(b"not a png")
    rc = cli.main(["precompute", str(folder), "--cache-dir", str(tmp_path / "c"), "--exact", "--no-progress"])
    out = capsys.readouterr()
    assert rc == 1 and "broken.png" in out.err
    assert "2 images, 2 planes: 2 encoded, 0 already cached, 1 failed" in out.out
    assert cli.main(["precompute", str(tmp_path / "missing"), "--cache-dir", str(tmp_path / "c")]) == 2
    assert "does not exist" in capsys.readouterr().err
