"""Labeling sessions under damage: records of the wrong shape, labels and record out of step, SIGKILL mid-save.

Real images (the bundled samples), real files, real child processes killed with
SIGKILL. No model is needed: saving and resuming never run one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from napari_medsam.engine.cache import content_hash
from napari_medsam.engine.session import LabelingSession, SessionError, boxes_from_layer

tifffile = pytest.importorskip("tifffile")

from _data import SAMPLES  # noqa: E402

IMAGES = ("busi_malignant_1.png", "isic_0014270.png", "dsb2018_nuclei.png")


@pytest.fixture
def images(tmp_path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    for name in IMAGES:
        shutil.copy(SAMPLES / name, src / name)
    return src


def rect(r0, c0, r1, c1):
    return np.asarray([[r0, c0], [r0, c1], [r1, c1], [r1, c0]], np.float32)


def _saved(images: Path, out: Path):
    """A session with image 0 saved: two objects, two boxes. Returns (session, labels, record)."""
    s = LabelingSession(images, out)
    shape = s.info(0).shape
    lab = np.zeros(shape, np.uint8)
    lab[20:60, 30:90] = 1
    lab[100:140, 120:200] = 2
    boxes = boxes_from_layer([rect(20, 30, 59, 89), rect(100, 120, 139, 199)], ["rectangle"] * 2, [1, 2])
    rec = s.save(0, lab, {"boxes": boxes, "model": {"name": "litemedsam", "checkpoint": None}})
    return s, lab, rec


def _good_record() -> dict:
    return {"format": "napari-medsam-record", "status": "in progress", "boxes": []}


def _box(**kw):
    b = {
        "order": 0,
        "label": 1,
        "type": "rectangle",
        "slice": None,
        "box": [1.0, 2.0, 3.0, 4.0],
        "vertices": [[2.0, 1.0], [2.0, 3.0], [4.0, 3.0], [4.0, 1.0]],
    }
    b.update(kw)
    return b


def _dumps(obj) -> bytes:
    return json.dumps(obj).encode()


BAD_RECORDS = {
    "a list": _dumps([1, 2, 3]),
    "a string": _dumps("boxes"),
    "null": b"null",
    "a number": b"42",
    "boxes a string": _dumps({**_good_record(), "boxes": "1,2,3,4"}),
    "boxes an object": _dumps({**_good_record(), "boxes": {"a": 1}}),
    "boxes of numbers": _dumps({**_good_record(), "boxes": [1, 2]}),
    "box without vertices": _dumps({**_good_record(), "boxes": [{"label": 1}]}),
    "vertices a string": _dumps({**_good_record(), "boxes": [_box(vertices="0,0")]}),
    "ragged vertices": _dumps({**_good_record(), "boxes": [_box(vertices=[[1, 2], [3]])]}),
    "vertices with text": _dumps({**_good_record(), "boxes": [_box(vertices=[[1, "a"], [3, 4]])]}),
    "label missing": _dumps({**_good_record(), "boxes": [{k: v for k, v in _box().items() if k != "label"}]}),
    "label a string": _dumps({**_good_record(), "boxes": [_box(label="1")]}),
    "label negative": _dumps({**_good_record(), "boxes": [_box(label=-3)]}),
    "label a bool": _dumps({**_good_record(), "boxes": [_box(label=True)]}),
    "slice a float": _dumps({**_good_record(), "boxes": [_box(slice=1.5)]}),
    "box of three": _dumps({**_good_record(), "boxes": [_box(box=[1, 2, 3])]}),
    "format missing": _dumps({"status": "done", "boxes": []}),
    "another format": _dumps({**_good_record(), "format": "something-else"}),
    "unknown status": _dumps({**_good_record(), "status": "finished"}),
    "shape a string": _dumps({**_good_record(), "shape": "512x512"}),
    "shape with zero": _dumps({**_good_record(), "shape": [0, 5]}),
    "intensity a list": _dumps({**_good_record(), "intensity": ["ct"]}),
    "window of one": _dumps({**_good_record(), "intensity": {"modality": "ct", "window": [40]}}),
    "model a string": _dumps({**_good_record(), "model": "litemedsam"}),
    "hash a number": _dumps({**_good_record(), "labels_hash": 12}),
    "truncated": None,  # the first half of the real record
    "empty file": b"",
    "binary garbage": bytes(random.Random(7).getrandbits(8) for _ in range(300)),
    "invalid utf-8": b'{"format": "\xff\xfe"}',
    "NaN vertex": b'{"format": "napari-medsam-record", "boxes": [{"label": 1, "vertices": [[NaN, 1], [2, 3]]}]}',
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_is_set_aside_and_labels_still_load(images, tmp_path, case):
    out = tmp_path / "out"
    s, lab, rec = _saved(images, out)
    path = s.record_path(0)
    bad = BAD_RECORDS[case]
    if bad is None:
        full = path.read_bytes()
        bad = full[: len(full) // 2]
    path.write_bytes(bad)

    s2 = LabelingSession(images, out)  # resume: must not raise
    assert np.array_equal(s2.load_labels(0), lab), "the labels always load"
    assert s2.load_record(0) is None
    data, types, ids = s2.layer_state(0)
    assert data == [] and list(ids) == []
    aside = [p for p in path.parent.iterdir() if p.name.startswith(path.name + ".corrupt-")]
    assert len(aside) == 1 and aside[0].read_bytes() == bad, "the unreadable record is kept, byte for byte"
    assert any(IMAGES[0] in w and aside[0].name in w for w in s2.warnings), s2.warnings
    # saving again writes a fresh record and never touches the set-aside copy
    new = s2.save(0, lab, {"boxes": rec["boxes"]})
    assert json.loads(path.read_text())["labels_hash"] == new["labels_hash"] == content_hash(lab)
    assert aside[0].read_bytes() == bad
    assert s2.status(0) == "in progress"


def test_unreadable_record_is_never_overwritten(images, tmp_path):
    out = tmp_path / "out"
    s, lab, _ = _saved(images, out)
    path = s.record_path(0)
    path.unlink()
    path.mkdir()  # exists, cannot be read as a file
    (path / "keep").write_text("x")
    s2 = LabelingSession(images, out)
    assert np.array_equal(s2.load_labels(0), lab)
    assert s2.load_record(0) is None and any("cannot read the record" in w for w in s2.warnings)
    with pytest.raises(SessionError, match="not overwriting"):
        s2.save(0, lab)
    assert (path / "keep").read_text() == "x"


SESSION_FILES = {
    "a list": b"[]",
    "garbage": b"\x00\x01\x02 not json",
    "truncated": b'{"format": "napari-medsam-session", "statuses": {',
    "other format": b'{"format": "other"}',
    "statuses a list": None,
    "position a string": None,
}


@pytest.mark.parametrize("case", list(SESSION_FILES))
def test_damaged_session_file(images, tmp_path, case):
    out = tmp_path / "out"
    s, lab, _ = _saved(images, out)
    s.mark_done(0)
    state = json.loads(s.session_path.read_text())
    bad = SESSION_FILES[case]
    if case == "statuses a list":
        bad = _dumps({**state, "statuses": ["done"]})
    elif case == "position a string":
        bad = _dumps({**state, "position": "two", "current": 7})
    s.session_path.write_bytes(bad)
    structural = case in ("statuses a list", "position a string")
    if not structural:
        with pytest.raises(SessionError, match="give the input"):
            LabelingSession(None, out)  # the input is unknown: refuse, touch nothing
        assert s.session_path.read_bytes() == bad
    s2 = LabelingSession(images, out)
    assert s2.status(0) == "done", "statuses come back from the records"
    assert np.array_equal(s2.load_labels(0), lab)
    if not structural:
        aside = [p for p in out.iterdir() if p.name.startswith("session.json.corrupt-")]
        assert len(aside) == 1 and aside[0].read_bytes() == bad
        assert s2.warnings


def test_labels_win_over_a_record_out_of_step(images, tmp_path):
    out = tmp_path / "out"
    s, lab, rec = _saved(images, out)
    # labels one version ahead of the record (what a kill between the two writes left before the fix)
    old_record = s.record_path(0).read_bytes()
    lab3 = lab.copy()
    lab3[200:230, 40:80] = 3
    s.save(0, lab3, {"boxes": rec["boxes"] + boxes_from_layer([rect(200, 40, 229, 79)], ["rectangle"], [3])})
    s.record_path(0).write_bytes(old_record)
    s2 = LabelingSession(images, out)
    got = s2.load_labels(0)
    assert np.array_equal(got, lab3), "labels win"
    fixed = s2.load_record(0)
    assert fixed["labels_hash"] == content_hash(lab3)
    assert [o["label"] for o in fixed["objects"]] == [1, 2, 3]
    got_box = [b for b in fixed["boxes"] if b["label"] == 3]
    assert len(got_box) == 1 and got_box[0]["recovered"] and got_box[0]["box"] == [40.0, 200.0, 79.0, 229.0]
    assert any("out of step" in w and "1 box(es) recovered" in w for w in s2.warnings)
    data, _, ids = s2.layer_state(0)
    assert list(ids) == [1, 2, 3] and len(data) == 3
    # the record one version ahead of the labels: the box of the object that is not there is flagged
    lab_only1 = np.where(lab == 1, 1, 0).astype(np.uint8)
    tifffile.imwrite(s2.labels_path(0), lab_only1, compression="zlib")
    s3 = LabelingSession(images, out)
    assert np.array_equal(s3.load_labels(0), lab_only1)
    fixed = s3.load_record(0)
    assert [b["label"] for b in fixed["boxes"] if b.get("unmatched")] == [2, 3]
    assert s3.load_record(0)["labels_hash"] == content_hash(lab_only1), "repaired once, then in step"
    assert [o["label"] for o in fixed["objects"] if o["pixels"]] == [1]


KILL_SCRIPT = textwrap.dedent(
    """
    import os
    import sys
    import numpy as np
    from napari_medsam.engine.session import LabelingSession, boxes_from_layer

    s = LabelingSession(sys.argv[1], sys.argv[2])
    rng = np.random.default_rng(int(sys.argv[3]))
    print("ready", flush=True)
    n = 0
    parent = os.getppid()
    while os.getppid() == parent:  # ends if pytest itself was killed
        n += 1
        i = n % len(s)
        lab = s.load_labels(i)
        lab = np.zeros(s.info(i).shape, np.uint16) if lab is None else lab.astype(np.uint16)
        k = int(lab.max()) + 1
        h, w = lab.shape
        r, c = int(rng.integers(0, h - 40)), int(rng.integers(0, w - 40))
        lab[r:r + 30, c:c + 30] = k
        lab[(rng.random(lab.shape) < 0.05) & (lab == 0)] = k  # noise: the writes take real time
        rec = s.load_record(i) or {}
        boxes = rec.get("boxes", []) + boxes_from_layer(
            [np.array([[r, c], [r, c + 29], [r + 29, c + 29], [r + 29, c]], float)], ["rectangle"], [k])
        for j, b in enumerate(boxes):
            b["order"] = j
        s.save(i, lab, {"boxes": boxes})
        print(i, k, flush=True)
    """
)


def _pair_in_step(out: Path, stem: str) -> None:
    rec = json.loads((out / "records" / f"{stem}.json").read_text())
    lab = tifffile.imread(out / "labels" / f"{stem}.tif")
    assert rec["labels_hash"] == content_hash(lab), f"{stem}: labels and record out of step"
    ids = set(np.unique(lab).tolist()) - {0}
    assert {b["label"] for b in rec["boxes"]} == ids, f"{stem}: every object has its box, every box its object"
    assert [o["label"] for o in rec["objects"]] == sorted(ids)


def test_sigkill_at_random_instants_keeps_every_pair_in_step(images, tmp_path):
    out = tmp_path / "out"
    script = tmp_path / "saver.py"
    script.write_text(KILL_SCRIPT)
    rnd = random.Random(20261202)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    acked: dict[int, int] = {}
    kills = 0
    for round_ in range(40):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(images), str(out), str(round_)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert proc.stdout.readline().strip() == "ready"
            # kill at a random instant: after 1-3 acknowledged saves and a random part of the next one
            for _ in range(rnd.randint(1, 3)):
                line = proc.stdout.readline().split()
                assert len(line) == 2, f"saver died: {proc.poll()}"
                acked[int(line[0])] = int(line[1])
            time.sleep(rnd.uniform(0, 0.08))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        kills += 1
        for line in proc.stdout.read().split("\n"):
            if len(line.split()) == 2:
                acked[int(line.split()[0])] = int(line.split()[1])
        for p in out.rglob("*"):  # every file whole, before any repair
            if p.is_dir() or ".tmp-" in p.name:
                continue
            if p.name.endswith((".json", ".json.pending")):
                json.loads(p.read_text())
            elif p.suffix == ".tif":
                assert tifffile.imread(p).size > 0
        s = LabelingSession(images, out)  # resume settles interrupted saves
        assert not list(out.rglob("*.pending")) and not list(out.rglob(".*.tmp-*"))
        for i, it in enumerate(s.items):
            if s.labels_path(i).exists():
                _pair_in_step(out, it.stem)
                assert s.load_labels(i).max() >= acked.get(i, 0), "an acknowledged save is never lost"
        assert not [w for w in s.warnings if "out of step" in w or "unusable" in w], s.warnings
    assert kills == 40 and len(acked) == len(IMAGES)


# -- what a session is opened on ------------------------------------------------------------
def test_a_single_image_file_is_a_session_of_one(images, tmp_path):
    """Before: an image file as the input was read as a text list of paths (UnicodeDecodeError)."""
    s = LabelingSession(images / IMAGES[1], tmp_path / "out")
    assert [it.name for it in s.items] == [IMAGES[1]]
    assert s.read(0).array.shape[:2] == s.info(0).shape[:2]
    again = LabelingSession(None, tmp_path / "out")  # resumes from session.json
    assert [it.name for it in again.items] == [IMAGES[1]]


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda d: (d / "list.txt", b"\xff\xfe\x00 binary \x89PNG"), "cannot read the list file"),
        (lambda d: (d / "list.csv", b"path\n\x00\n"), "cannot read the list file"),
    ],
)
def test_unreadable_list_files_are_session_errors(tmp_path, make, words):
    path, data = make(tmp_path)
    path.write_bytes(data)
    with pytest.raises(SessionError, match=words):
        LabelingSession(path, tmp_path / "out")


def test_unusable_output_folders_are_session_errors(images, tmp_path):
    """Before: FileExistsError / NotADirectoryError / TypeError from Python, not SessionError."""
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    with pytest.raises(SessionError, match="output folder"):
        LabelingSession(images, a_file)
    with pytest.raises(SessionError, match="output folder"):
        LabelingSession(images, a_file / "sub")
    with pytest.raises(SessionError, match="give an output folder"):
        LabelingSession(images, None)
    with pytest.raises(SessionError, match="give an output folder"):
        LabelingSession(None, None)
    assert a_file.read_text() == "x"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_output_folder_is_a_session_error(images, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(SessionError, match="cannot write"):
            LabelingSession(images, ro)
    finally:
        ro.chmod(0o700)


BAD_SAVES = {
    "record a list": ([1], "record must be a dict"),
    "record a string": ("boxes", "record must be a dict"),
    "boxes a string": ({"boxes": "1,2,3,4"}, "boxes must be a list"),
    "a box a number": ({"boxes": [3]}, "boxes\\[0\\] is int"),
    "a box without vertices": ({"boxes": [{"label": 1}]}, "boxes\\[0\\].vertices"),
    "a box with a text label": ({"boxes": [{"label": "1", "vertices": [[1, 2], [3, 4]]}]}, "boxes\\[0\\].label"),
    "an array as vertices": ({"boxes": [{"label": 1, "vertices": rect(1, 2, 3, 4)}]}, "boxes\\[0\\].vertices"),
    "a value JSON cannot hold": ({"boxes": [], "note": object()}, "cannot be stored as JSON"),
}


@pytest.mark.parametrize("case", list(BAD_SAVES))
def test_a_bad_save_is_a_session_error_and_writes_nothing(images, tmp_path, case):
    """Before: TypeError / ValueError / KeyError from dict() and json.dumps. Nothing reaches the disk:
    whatever is saved can be read back with the schema resume uses."""
    out = tmp_path / "out"
    s, lab, _ = _saved(images, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and ".embeddings" not in p.parts}
    record, words = BAD_SAVES[case]
    lab2 = lab.copy()
    lab2[0:5, 0:5] = 3
    with pytest.raises(SessionError, match=words):
        s.save(0, lab2, record)
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and ".embeddings" not in p.parts}
    assert after == before, "a refused save writes nothing"


def test_a_box_missing_optional_keys_is_saved_and_read_back(images, tmp_path):
    s = LabelingSession(images, tmp_path / "out")
    lab = np.zeros(s.info(0).shape, np.uint8)
    lab[20:60, 30:90] = 1
    rec = s.save(0, lab, {"boxes": [{"label": 1, "vertices": rect(20, 30, 59, 89).tolist()}]})
    assert [o["label"] for o in rec["objects"]] == [1]
    s2 = LabelingSession(images, tmp_path / "out")
    assert s2.load_record(0) is not None and not s2.warnings
    data, _, ids = s2.layer_state(0)
    assert len(data) == 1 and list(ids) == [1]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_as_input_is_refused_not_read(tmp_path):
    """Before: the pipe was read as a list file, blocking until something wrote to it. A helper
    unblocks a reader that waits longer than 10 s, so the old code fails instead of hanging."""
    import threading

    fifo = tmp_path / "list.txt"
    os.mkfifo(fifo)
    returned = threading.Event()

    def unblock():
        if not returned.wait(10):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    helper = threading.Thread(target=unblock, daemon=True)
    helper.start()
    try:
        with pytest.raises(SessionError, match="a pipe, device or socket"):
            LabelingSession(fifo, tmp_path / "out")
    finally:
        returned.set()
        helper.join(15)
