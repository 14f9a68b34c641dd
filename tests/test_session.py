"""Labeling sessions (engine): listing, round trip, resume, atomic writes under SIGKILL, export.

Real images from the shared test data, copied into a temporary session folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from napari_medsam import __version__
from napari_medsam.engine import session as session_mod
from napari_medsam.engine.cache import Embedding
from napari_medsam.engine.errors import ImageError
from napari_medsam.engine.export import export_session
from napari_medsam.engine.intensity import Intensity, resolve_modality, to_uint8
from napari_medsam.engine.io import read_image
from napari_medsam.engine.session import (
    DONE,
    IN_PROGRESS,
    NOT_STARTED,
    LabelingSession,
    SessionError,
    boxes_from_layer,
    layer_from_boxes,
)

CT_PNG = "ct2d_sammed2d_demo/images/amos_0004_75.png"  # RGB PNG (CT already windowed)
XRAY_PNG = "xray_chest_lungs_imlab/images/1.png"  # gray uint8
DSB_PNG = "microscopy_dsb2018_stardist/images/dsb2018_img2d.png"  # gray uint16
CT_NII = "ct3d_deeplesion_medsam2/CT_Lesion_000001_02_01_008-023_img.nii.gz"  # (16, 512, 512) uint8
MR_NII = "mri3d_pyradiomics_tumour/brain1_img.nii.gz"  # (25, 256, 256) int16


def rect(z, r0, c0, r1, c1):
    """Rectangle vertices as napari's Shapes layer stores them (float32)."""
    v = [[r0, c0], [r0, c1], [r1, c1], [r1, c0]]
    if z is not None:
        v = [[z, *p] for p in v]
    return np.asarray(v, np.float32)


@pytest.fixture
def folder(shared_data, tmp_path):
    """A session input folder of real images: 2D PNGs, a NIfTI volume, a 2D NIfTI slice with spacing."""
    import nibabel as nib

    src = tmp_path / "images"
    (src / "ct").mkdir(parents=True)
    shutil.copy(shared_data / CT_PNG, src / "ct" / "amos_0004_75.png")
    shutil.copy(shared_data / XRAY_PNG, src / "xray_1.png")
    shutil.copy(shared_data / DSB_PNG, src / "nuclei.png")
    shutil.copy(shared_data / CT_NII, src / "ct" / "lesion.nii.gz")
    mr = nib.load(str(shared_data / MR_NII))
    nib.save(mr.slicer[:, :, 12:13], str(src / "mr_slice.nii.gz"))  # a real 2D slice keeping its spacing
    (src / "notes.txt").write_text("not an image")
    (src / ".hidden.png").write_bytes(b"")
    return src


def test_listing_status_navigation(folder, tmp_path):
    s = LabelingSession(folder, tmp_path / "out")
    assert [it.name for it in s.items] == [
        "ct/amos_0004_75.png",
        "ct/lesion.nii.gz",
        "mr_slice.nii.gz",
        "nuclei.png",
        "xray_1.png",
    ]
    assert [it.labels_name for it in s.items][:3] == [
        "labels/ct/amos_0004_75.tif",
        "labels/ct/lesion.nii.gz",
        "labels/mr_slice.nii.gz",
    ]
    assert s.counts()[NOT_STARTED] == 5 and s.progress_text() == "0/5 done"
    assert s.next() == 1 and s.next() == 2 and s.previous() == 1
    assert s.jump(4) == 4 and s.next() == 4, "next stays on the last image"
    with pytest.raises(SessionError):
        s.jump(5)
    s.mark_done(0)
    s.skip(1)
    assert s.progress_text() == "1/5 done, 1 skipped"
    assert s.next(pending_only=True) == 4 or s.position == 4
    s.jump(0)
    assert s.next(pending_only=True) == 2, "done and skipped images are passed over"
    with pytest.raises(SessionError):
        s.set_status(0, "finished")

    # an output folder inside the input folder is not listed as input
    inner = LabelingSession(folder, folder / "labels-out")
    inner.save(0, np.zeros(inner.info(0).shape, np.uint8))
    again = LabelingSession(folder, folder / "labels-out")
    assert len(again) == 5

    # a list file: paths relative to it, comments skipped
    lst = tmp_path / "todo.txt"
    lst.write_text("# my cases\nimages/xray_1.png\n\nimages/ct/lesion.nii.gz\n")
    s2 = LabelingSession(lst, tmp_path / "out2")
    assert [it.name for it in s2.items] == ["images/xray_1.png", "images/ct/lesion.nii.gz"], "list order is kept"
    with pytest.raises(SessionError):
        LabelingSession(None, tmp_path / "nothing-here")


def test_round_trip_and_resume(folder, tmp_path, monkeypatch):
    out = tmp_path / "out"
    ckpt = tmp_path / "weights.pth"
    ckpt.write_bytes(os.urandom(1 << 16))
    calls = []
    real_digest = session_mod.checkpoint_sha256.__globals__["_SHA_CACHE"]
    real_digest.clear()
    from napari_medsam.engine.models import checkpoints

    orig = checkpoints.digest_of
    monkeypatch.setattr(checkpoints, "digest_of", lambda p, a="sha256": calls.append(p) or orig(p, a))

    s = LabelingSession(folder, out)
    i2d, ivol, islice = 0, 1, 2
    img = s.read(i2d)
    assert img.kind == "rgb"
    lab2d = np.zeros(img.array.shape[:2], np.uint32)
    lab2d[237:295, 153:222] = 1
    lab2d[203:230, 289:316] = 2
    boxes2d = boxes_from_layer(
        [rect(None, 237, 153, 294, 221), rect(None, 203.25, 289, 229.5, 315)], ["rectangle"] * 2, [1, 2]
    )
    model = {"name": "litemedsam", "checkpoint": str(ckpt)}
    rec = s.save(i2d, lab2d, {"boxes": boxes2d, "model": model, "intensity": {"modality": "auto", "window": None}})
    assert rec["model"]["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert rec["napari_medsam_version"] == __version__
    assert [o["label"] for o in rec["objects"]] == [1, 2]
    assert rec["objects"][1]["prompts"] == [
        {"order": 1, "type": "rectangle", "slice": None, "box": [289.0, 203.25, 315.0, 229.5]}
    ]
    assert rec["objects"][0]["pixels"] == 58 * 69 and rec["objects"][0]["propagation"] is None
    s.save(i2d, lab2d, {"boxes": boxes2d, "model": model})
    assert len(calls) == 1, "the checkpoint digest is computed once per file"

    vol = s.read(ivol)
    labvol = np.zeros(vol.array.shape, np.uint16)
    labvol[4:9, 200:260, 180:250] = 3  # propagated object
    labvol[7, 100:120, 100:130] = 4  # a single-slice object
    boxes3d = boxes_from_layer(
        [rect(6, 200, 180, 259, 249), rect(7, 100, 100, 119, 129), rect(2, 10, 10, 40, 40)],
        ["rectangle"] * 3,
        [3, 4, 0],
    )
    s.save(
        ivol,
        labvol,
        {
            "boxes": boxes3d,
            "model": model,
            "intensity": {"modality": "ct", "window": "40,400", "choice": "CT level/width"},
        },
    )
    sl = s.read(islice)
    assert sl.kind == "2d" and sl.spacing is not None
    labsl = np.zeros(sl.array.shape, np.uint8)
    labsl[100:140, 90:150] = 7
    s.save(islice, labsl, {"boxes": boxes_from_layer([rect(None, 100, 90, 139, 149)], ["rectangle"], [7])})
    s.mark_done(i2d)
    s.jump(ivol)
    recs = {i: s.load_record(i) for i in range(len(s))}

    # reopen from the output folder alone: everything back
    r = LabelingSession.open(out)
    assert r.input == s.input and r.position == ivol
    assert [it.status for it in r.items] == [DONE, IN_PROGRESS, IN_PROGRESS, NOT_STARTED, NOT_STARTED]
    for i, lab in ((i2d, lab2d), (ivol, labvol), (islice, labsl)):
        got = r.load_labels(i)
        assert got.shape == lab.shape
        np.testing.assert_array_equal(got, lab)
    assert r.load_labels(3) is None and r.load_record(3) is None
    assert {i: r.load_record(i) for i in range(len(r))} == recs
    assert recs[i2d]["status"] == DONE, "the record carries the status too"
    obj3 = next(o for o in recs[ivol]["objects"] if o["label"] == 3)
    assert obj3["propagation"] == {"first_slice": 4, "last_slice": 8, "from_slices": [6]}
    obj4 = next(o for o in recs[ivol]["objects"] if o["label"] == 4)
    assert obj4["propagation"] is None and obj4["prompts"][0]["slice"] == 7
    assert recs[ivol]["intensity"] == {"modality": "ct", "window": [40.0, 400.0], "choice": "CT level/width"}
    assert recs[islice]["model"] == {"name": None, "checkpoint": None, "checkpoint_sha256": None}

    # boxes come back bit for bit (float32 vertices, order, types, label ids incl. an unaccepted box)
    data, types, ids = r.layer_state(ivol)
    assert types == ["rectangle"] * 3 and ids.tolist() == [3, 4, 0]
    for a, b in zip(
        data, [rect(6, 200, 180, 259, 249), rect(7, 100, 100, 119, 129), rect(2, 10, 10, 40, 40)], strict=False
    ):
        np.testing.assert_array_equal(a.astype(np.float32), b)
    assert layer_from_boxes(boxes2d)[2].tolist() == [1, 2]

    # NIfTI in, NIfTI out, with the source affine; 2D NIfTI too
    import nibabel as nib

    for i in (ivol, islice):
        assert r.labels_path(i).name.endswith(".nii.gz")
        np.testing.assert_allclose(nib.load(str(r.labels_path(i))).affine, r.read(i).affine)
    assert r.labels_path(i2d).suffix == ".tif"

    # created is kept, modified moves on
    time.sleep(0.01)
    rec2 = r.save(i2d, lab2d, {"boxes": boxes2d})
    assert rec2["created"] == recs[i2d]["created"] and rec2["modified"] > recs[i2d]["modified"]
    assert rec2["status"] == DONE
    assert rec2["model"] == recs[i2d]["model"], "no model given: the image's previous record's stays"

    with pytest.raises(ImageError):
        r.save(i2d, np.zeros((3, 3), np.uint8))
    with pytest.raises(ImageError):
        r.save(i2d, -np.ones(lab2d.shape, np.int32))


def test_embedding_cache_is_on_disk_and_capped(folder, tmp_path):
    import torch

    s = LabelingSession(folder, tmp_path / "out", cache_max_bytes=3 * (1 << 20))
    cache = s.embedding_cache()
    assert cache is s.embedding_cache() and cache.disk_dir == tmp_path / "out" / ".embeddings"
    for k in range(6):
        cache.put(Embedding(torch.full((1, 256, 32, 32), float(k)), (64, 64), (64, 64), "litemedsam", f"k{k}"))
        time.sleep(0.02)
    files = list(cache.disk_dir.glob("*.npz"))
    assert sum(p.stat().st_size for p in files) <= 3 * (1 << 20) and len(files) < 6
    fresh = LabelingSession.open(tmp_path / "out").embedding_cache()
    assert float(fresh.get("k5").features[0, 0, 0, 0]) == 5.0 and fresh.disk_hits == 1
    assert len(LabelingSession.open(tmp_path / "out")) == 5, ".embeddings is never taken for input"


def test_export_npz_and_csv(folder, tmp_path):
    s = LabelingSession(folder, tmp_path / "out")
    names = [it.name for it in s.items]
    i2d, ivol, islice, inuc, ixray = (
        names.index(n)
        for n in ("ct/amos_0004_75.png", "ct/lesion.nii.gz", "mr_slice.nii.gz", "nuclei.png", "xray_1.png")
    )
    img = s.read(i2d).array
    lab = np.zeros(img.shape[:2], np.uint8)
    lab[10:20, 10:30] = 1
    lab[50:60, 50:55] = 2
    s.save(i2d, lab)
    s.mark_done(i2d)
    vol = s.read(ivol)
    labvol = np.zeros(vol.array.shape, np.uint16)
    labvol[3:6, 100:110, 100:120] = 300  # id > 255 -> uint16 gts
    s.save(ivol, labvol, {"intensity": {"modality": "ct", "window": [40, 400]}})
    sl = s.read(islice)
    labsl = np.zeros(sl.array.shape, np.uint8)
    labsl[0:10, 0:10] = 5
    s.save(islice, labsl)
    nuc = s.read(inuc)
    s.save(inuc, np.zeros(nuc.array.shape, np.uint8), {"intensity": {"modality": "fluorescence"}})
    s.save(ixray, np.ones(s.read(ixray).array.shape, np.uint8))
    s.skip(ixray)

    res = export_session(s, tmp_path / "export")
    assert not res.errors
    assert sorted(p.relative_to(tmp_path / "export").as_posix() for p in res.files) == [
        "ct/amos_0004_75.npz",
        "ct/lesion.npz",
        "mr_slice.npz",
        "nuclei.npz",
    ], "skipped images are left out"

    z = np.load(tmp_path / "export" / "ct" / "amos_0004_75.npz")
    assert set(z.files) == {"imgs", "gts", "spacing"}
    assert z["imgs"].dtype == np.uint8 and z["imgs"].shape == img.shape
    np.testing.assert_array_equal(z["imgs"], img)  # 8-bit RGB goes in unchanged
    assert z["gts"].dtype == np.uint8
    np.testing.assert_array_equal(z["gts"], lab)
    np.testing.assert_array_equal(z["spacing"], [1.0, 1.0])

    z = np.load(tmp_path / "export" / "ct" / "lesion.npz")
    assert z["imgs"].shape == vol.array.shape and z["imgs"].dtype == np.uint8, "3D: (D, H, W)"
    np.testing.assert_array_equal(z["imgs"], to_uint8(vol.array, Intensity("ct", (40.0, 400.0))))
    assert z["gts"].dtype == np.uint16
    np.testing.assert_array_equal(z["gts"], labvol)
    np.testing.assert_allclose(z["spacing"], vol.spacing[::-1])  # SimpleITK order (x, y, z), as MedSAM stores it

    z = np.load(tmp_path / "export" / "nuclei.npz")
    u8 = to_uint8(nuc.array, resolve_modality(nuc.array, "fluorescence"))
    assert z["imgs"].shape == nuc.array.shape + (3,)
    np.testing.assert_array_equal(z["imgs"], np.repeat(u8[:, :, None], 3, axis=-1))

    with open(res.summary_path, newline="") as f:
        rows = list(csv.DictReader(f))
    by = {}
    for row in rows:
        by.setdefault(row["image"], []).append(row)
    a = by["ct/amos_0004_75.png"]
    assert [(r["label"], r["pixels"], r["size"], r["unit"], r["n_objects"]) for r in a] == [
        ("1", "200", "200", "px", "2"),
        ("2", "50", "50", "px", "2"),
    ]
    (v,) = by["ct/lesion.nii.gz"]
    assert v["unit"] == "mm3" and v["label"] == "300" and v["pixels"] == str(3 * 10 * 20)
    assert float(v["size"]) == pytest.approx(600 * float(np.prod(vol.spacing)), rel=1e-5)
    (m,) = by["mr_slice.nii.gz"]
    assert m["unit"] == "mm2" and float(m["size"]) == pytest.approx(100 * sl.spacing[0] * sl.spacing[1], rel=1e-5)
    (n,) = by["nuclei.png"]
    assert n["n_objects"] == "0" and n["label"] == ""
    assert "xray_1.png" not in by
    assert export_session(s).out_dir == tmp_path / "out" / "export"


KILL_SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    from napari_medsam.engine.session import LabelingSession, boxes_from_layer

    s = LabelingSession(sys.argv[1], sys.argv[2])
    state = {}
    for i in range(len(s)):
        lab = s.load_labels(i)
        state[i] = lab.astype(np.uint16) if lab is not None else np.zeros(s.info(i).shape, np.uint16)
    n = max(int(a.max()) for a in state.values())
    print("ready", flush=True)
    rng = np.random.default_rng(n)
    while True:
        n += 1
        i = n % len(s)
        lab = state[i]
        z = n % lab.shape[0] if lab.ndim == 3 else None
        r, c = rng.integers(0, lab.shape[-2] - 40), rng.integers(0, lab.shape[-1] - 40)
        plane = lab[z] if z is not None else lab
        plane[r:r + 37, c:c + 29] = n  # the newly accepted object
        plane[rng.random(plane.shape) < 0.02] = n  # some noise: writes take real time
        verts = [[r, c], [r, c + 28], [r + 36, c + 28], [r + 36, c]]
        if z is not None:
            verts = [[z] + v for v in verts]
        boxes = boxes_from_layer([np.array(verts, np.float32)], ["rectangle"], [n])
        s.save(i, lab, {"boxes": boxes, "model": {"name": "litemedsam", "checkpoint": None}})
        print(i, n, flush=True)  # acknowledged: save() returned
    """
)


def test_kill_during_saves_never_loses_an_accepted_label(shared_data, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(shared_data / CT_NII, src / "lesion.nii.gz")  # 16 x 512 x 512 labels
    shutil.copy(shared_data / CT_PNG, src / "slice.png")
    out = tmp_path / "out"
    script = tmp_path / "saver.py"
    script.write_text(KILL_SCRIPT)
    rnd = random.Random(1234)
    last_ack = {}  # image index -> last acknowledged label id
    kills = 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for round_ in range(5):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(src), str(out)], stdout=subprocess.PIPE, text=True, env=env
        )
        try:
            assert proc.stdout.readline().strip() == "ready"
            acks, t_end = 0, time.monotonic() + rnd.uniform(0.3, 2.0)
            # kill at a random moment: after a random time, then a random fraction into the next save
            while time.monotonic() < t_end or acks == 0:
                line = proc.stdout.readline().split()
                assert len(line) == 2, f"saver died: {proc.poll()}"
                last_ack[int(line[0])] = int(line[1])
                acks += 1
            time.sleep(rnd.uniform(0, 0.15))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        for line in proc.stdout.read().split("\n"):  # acks printed before the kill landed
            if len(line.split()) == 2:
                last_ack[int(line.split()[0])] = int(line.split()[1])
        kills += 1

        # every file in the output folder is complete and loadable (temp files aside)
        for p in out.rglob("*"):
            if p.is_dir() or ".tmp" in p.name:
                continue
            if p.name.endswith((".json", ".json.pending")):  # .pending: a save's next record (see store.py)
                json.loads(p.read_text())
            elif p.name.endswith((".tif", ".nii.gz")):
                assert read_image(p).array.size > 0
            else:
                raise AssertionError(f"unexpected file {p}")
        s = LabelingSession.open(out)
        assert not [p for p in out.rglob("*") if ".tmp" in p.name], "reopening removes a killed writer's temp files"
        for i, n in last_ack.items():
            lab = s.load_labels(i)
            assert (lab == n).any(), f"round {round_}: acknowledged label {n} of image {i} lost"
            rec = s.load_record(i)
            assert n in [o["label"] for o in rec["objects"]]
            assert rec["objects"][-1]["label"] >= n
    assert kills == 5 and sum(last_ack.values()) > 0


def test_box_kinds_survive_save_and_resume(tmp_path):
    """Which boxes a 3D propagation made (the viewer's steering) is saved and read back; old
    records without kinds read as key boxes; a record with an unknown kind is refused before any write."""
    from napari_medsam.engine.session import SessionError, box_kinds_of

    folder = tmp_path / "in"
    folder.mkdir()
    vol = (np.arange(6 * 40 * 50) % 251).reshape(6, 40, 50).astype(np.uint8)
    import tifffile

    tifffile.imwrite(folder / "vol.tif", vol)
    s = LabelingSession(folder, tmp_path / "out")
    lab = np.zeros(vol.shape, np.uint8)
    lab[1:5, 10:20, 10:30] = 1
    verts = [rect(z, 10, 10, 19, 29) for z in (2, 1, 3, 4)]
    kinds = ["key", "propagated", "propagated", "propagated"]
    s.save(0, lab, {"boxes": boxes_from_layer(verts, ["rectangle"] * 4, [1] * 4, kinds)})
    r = LabelingSession.open(tmp_path / "out")
    saved = r.load_record(0)["boxes"]
    assert box_kinds_of(saved) == kinds
    assert box_kinds_of(boxes_from_layer(verts, ["rectangle"] * 4, [1] * 4)) == ["key"] * 4  # no kinds saved
    before = sorted(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file())
    bad = boxes_from_layer(verts[:1], ["rectangle"], [1], ["guessed"])
    with pytest.raises(SessionError, match="kind"):
        s.save(0, lab, {"boxes": bad})
    assert sorted(p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()) == before
