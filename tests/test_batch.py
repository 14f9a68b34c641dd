"""Tests for napari_medsam.engine.batch: prompts parsing, batch runs, metrics, Dask.

Real LiteMedSAM weights and real images (bundled samples always; ../shared/data
when present). The model is loaded once per module; rows on the same image share
one encoder pass, so the whole module costs a handful of encodes.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from napari_medsam.engine.batch import (
    SUMMARY_FIELDS,
    BatchError,
    read_prompts,
    run_batch,
)
from napari_medsam.engine.batch.prompts import _parse_bool, _parse_row
from napari_medsam.engine.errors import MedSAMError, PromptError

tifffile = pytest.importorskip("tifffile")

from _data import SAMPLES, require_shared  # noqa: E402


def _write_csv(path: Path, rows, fields=None) -> Path:
    fields = fields or ["image", "box", "modality", "window", "slice", "propagate", "gt", "gt_select", "name"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


def _read_summary(path: Path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _leftovers(folder: Path):
    return [p.name for p in folder.iterdir() if p.name.startswith(".") or "tmp" in p.name]


@pytest.fixture(scope="module")
def model():
    from napari_medsam.engine import MedSAM

    return MedSAM.load("litemedsam", device="cpu")


# Four good rows on two images: used by the single-process run and the Dask run.
GOOD_ROWS = [
    {
        "image": str(SAMPLES / "busi_malignant_1.png"),
        "box": "8,133,439,403",
        "modality": "ultrasound",
        "gt": str(SAMPLES / "busi_malignant_1_mask.png"),
        "gt_select": "component:1",
        "name": "busi",
    },
    {
        "image": str(SAMPLES / "dsb2018_nuclei.png"),
        "box": "155,129,179,153",
        "gt": str(SAMPLES / "dsb2018_nuclei_labels.png"),
        "gt_select": "value:19",
        "name": "nuc19",
    },
    {
        "image": str(SAMPLES / "dsb2018_nuclei.png"),
        "box": "344,218,362,239",
        "gt": str(SAMPLES / "dsb2018_nuclei_labels.png"),
        "gt_select": "value:30",
        "name": "nuc30",
    },
    {"image": str(SAMPLES / "dsb2018_nuclei.png"), "box": "182,394,209,422"},  # no gt, default name
]


@pytest.fixture(scope="module")
def sample_run(model, tmp_path_factory):
    """One batch over the bundled samples: good rows, bad rows, relative paths (two encodes)."""
    d = tmp_path_factory.mktemp("batch")
    shutil.copy(SAMPLES / "busi_malignant_1.png", d / "busi_copy.png")  # relative path; same pixels
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rows = GOOD_ROWS + [
        {"image": "busi_copy.png", "box": "8,133,439,403", "name": "relative"},
        {"image": "does_not_exist.png", "box": "1,2,30,40", "name": "missing"},
        {"image": "broken.png", "box": "1,2,30,40", "name": "broken"},
        {"image": str(SAMPLES / "busi_malignant_1.png"), "box": "nan,1,2,3", "name": "nanbox"},
        {"image": str(SAMPLES / "busi_malignant_1.png"), "box": "1,2,3", "name": "shortbox"},
        {"image": str(SAMPLES / "busi_malignant_1.png"), "box": "500,500,520,520", "name": "outside"},
        {"image": str(SAMPLES / "busi_malignant_1.png"), "box": "8,133,439,403", "slice": "3", "name": "slice2d"},
        {
            "image": str(SAMPLES / "pyradiomics_brain1.nii.gz"),
            "box": "162,84,206,115",
            "modality": "mr",
            "slice": "99",
            "propagate": "true",
            "name": "badslice3d",
        },
        {
            "image": str(SAMPLES / "pyradiomics_brain1.nii.gz"),
            "box": "162,84,206,115",
            "modality": "mr",
            "name": "noslice3d",
        },
    ]
    prompts = _write_csv(d / "prompts.csv", rows)
    messages = []
    res = run_batch(prompts, d / "out", model=model, cache_dir=d / "emb-cache", progress=False, log=messages.append)
    return res, d, messages


def test_read_prompts_defaults_and_errors(tmp_path):
    p = _write_csv(
        tmp_path / "p.csv",
        [
            {"image": "a/img.png", "box": "1,2,3,4"},
            {"image": "vol.nii.gz", "box": "1, 2, 30, 40", "slice": "5", "propagate": "yes", "name": "my case#1"},
            {"image": "b.png", "box": "1,2,3,4", "propagate": "maybe"},
            {"image": "", "box": "1,2,3,4"},
            {"image": "c.png", "box": "1,2,3,4", "name": "my case#1"},
        ],
    )
    rows = read_prompts(p)
    assert [r.row for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0].name == "img_1" and rows[0].image == tmp_path / "a" / "img.png" and rows[0].error is None
    assert rows[1].name == "my_case_1" and rows[1].slice == 5 and rows[1].propagate and rows[1].box == (1, 2, 30, 40)
    assert "propagate" in rows[2].error
    assert "image is empty" in rows[3].error
    assert "already used by row 2" in rows[4].error


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"propagate": "maybe"}, "propagate must be true or false, got 'maybe'"),
        ({"slice": "five"}, "slice must be an integer, got 'five'"),
    ],
)
def test_bad_row_values_are_recorded_on_the_row(row, match):
    rec = {"image": "a.png", "box": "1,2,3,4", **row}
    assert match in _parse_row(1, rec, Path("."), {}).error


def test_bad_row_value_is_a_prompt_error_and_still_a_value_error():
    with pytest.raises(PromptError, match="propagate must be true or false") as info:
        _parse_bool("maybe", "propagate")
    err = info.value
    assert isinstance(err, BatchError) and isinstance(err, MedSAMError) and isinstance(err, ValueError)


def test_row_status_is_an_enum_and_the_summary_keeps_its_words(tmp_path):
    from napari_medsam.engine.batch import RowResult, RowStatus, write_summary

    ok, bad = RowResult(1, "a", "a.png", "auto"), RowResult(2, "b", "b.png", "auto")
    bad.status = RowStatus.ERROR
    assert ok.status is RowStatus.OK and ok.ok and not bad.ok and bad.status == "error"
    rows = _read_summary(write_summary(tmp_path / "summary.csv", [ok, bad]))
    assert [r["status"] for r in rows] == ["ok", "error"], "summary.csv keeps the words, not the enum's name"


def test_read_prompts_rejects_bad_files(tmp_path):
    with pytest.raises(MedSAMError, match="does not exist"):
        read_prompts(tmp_path / "nope.csv")
    bad = tmp_path / "bad.csv"
    bad.write_text("path,roi\na.png,1\n")
    with pytest.raises(BatchError, match="lacks the column"):
        read_prompts(bad)


def test_run_batch_rejects_bad_setup(tmp_path):
    p = _write_csv(tmp_path / "p.csv", [{"image": "a.png", "box": "1,2,3,4"}])
    with pytest.raises(BatchError, match="unknown model"):
        run_batch(p, tmp_path / "o", model="nosuchmodel", progress=False)
    with pytest.raises(BatchError, match="either workers or scheduler"):
        run_batch(p, tmp_path / "o", workers=2, scheduler="tcp://127.0.0.1:1", progress=False)


def test_missing_dask_is_a_clear_error(tmp_path, monkeypatch):
    p = _write_csv(tmp_path / "p.csv", [{"image": str(SAMPLES / "busi_malignant_1.png"), "box": "8,133,439,403"}])
    monkeypatch.setitem(sys.modules, "dask.distributed", None)  # import fails as if not installed
    with pytest.raises(BatchError, match=r"napari-medsam\[dask\]"):
        run_batch(p, tmp_path / "o", workers=2, device="cpu", progress=False)


def test_good_rows_written(sample_run):
    res, d, _ = sample_run
    out = d / "out"
    by = res.by_name()
    for name in ("busi", "nuc19", "nuc30", "dsb2018_nuclei_4", "relative"):
        assert by[name].ok, (name, by[name].error)
        assert (out / f"{name}.tif").is_file()
    busi = tifffile.imread(out / "busi.tif")
    assert busi.shape == (598, 449) and busi.dtype == np.uint8 and set(np.unique(busi)) == {0, 1}
    assert np.array_equal(busi, tifffile.imread(out / "relative.tif"))  # relative path resolved, same pixels
    nuc = tifffile.imread(out / "nuc19.tif")
    assert nuc.shape == (512, 512)
    assert not _leftovers(out)


def test_bad_rows_reported_and_skipped(sample_run):
    res, d, messages = sample_run
    by = res.by_name()
    bad = {
        "missing": "does not exist",
        "broken": "cannot read",
        "nanbox": "NaN",
        "shortbox": "3 values",
        "outside": "no area",
        "slice2d": "2D image",
        "badslice3d": "outside the volume",
        "noslice3d": "give the slice",
    }
    for name, words in bad.items():
        assert by[name].status == "error", name
        assert words in by[name].error, (name, by[name].error)
        assert not (d / "out" / f"{name}.tif").exists()
        assert any(f"({name})" in m and words in m for m in messages), name
    assert res.n_failed == len(bad) and res.exit_code == 1


def test_summary_csv(sample_run):
    res, d, _ = sample_run
    rows = _read_summary(res.summary_path)
    assert res.summary_path == d / "out" / "summary.csv"
    assert list(rows[0].keys()) == SUMMARY_FIELDS
    assert [r["name"] for r in rows] == [r.name for r in res.rows]  # prompts-file order
    assert [r["name"] for r in rows][:4] == ["busi", "nuc19", "nuc30", "dsb2018_nuclei_4"]
    s = {r["name"]: r for r in rows}
    # Dice / NSD where gt is given, and reasonable values on these easy cases
    assert float(s["busi"]["dice"]) > 0.85 and 0 <= float(s["busi"]["nsd"]) <= 1
    assert float(s["nuc19"]["dice"]) > 0.85 and float(s["nuc30"]["dice"]) > 0.75
    assert s["dsb2018_nuclei_4"]["dice"] == "" and s["missing"]["dice"] == ""
    assert 0 < float(s["busi"]["iou"]) <= 1.5
    # each image encoded once: later rows of the same image reuse the embedding
    assert float(s["nuc19"]["encode_s"]) > 0
    assert float(s["nuc30"]["encode_s"]) == 0 and float(s["dsb2018_nuclei_4"]["encode_s"]) == 0
    assert s["missing"]["status"] == "error" and s["missing"]["error"]
    per = res.by_modality()
    assert per["ultrasound"]["n"] == 1 and per["auto"]["n"] == 2 and "mr" not in per


def _pick_cases(data: Path):
    """Five 2D cases on two images (CT, X-ray: two encodes), each box >= 4 px at 256."""
    from napari_medsam.engine.cases import load_cases

    wanted_images = ("amos_0004_75.png", "1.png")
    cases = [c for c in load_cases(data, dims=2) if c.image.name in wanted_images]
    return cases


@pytest.fixture(scope="module")
def shared_prompts(tmp_path_factory):
    data = require_shared()
    tool = data.parent / "tools" / "cases_to_prompts.py"
    if not tool.is_file():
        pytest.skip(f"{tool} not found")
    d = tmp_path_factory.mktemp("shared")
    full = d / "all.csv"
    subprocess.run([sys.executable, str(tool), str(data), str(full), "--dims", "2"], check=True, capture_output=True)
    cases = {c.name: c for c in _pick_cases(data)}
    with open(full, newline="") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if r["name"] in cases]
        fields = reader.fieldnames
    assert len(rows) == len(cases) >= 4
    return data, _write_csv(d / "prompts.csv", rows, fields), cases


def test_shared_data_matches_authors_reference(shared_prompts, tmp_path):
    """``--exact`` (the authors' pipeline) reproduces their masks; the default adds the zoom strategy
    for small boxes (issue 14), which is meant to differ from them."""
    from napari_medsam.engine import MedSAM
    from napari_medsam.engine.metrics import dice

    data, prompts, cases = shared_prompts
    exact = MedSAM.load("litemedsam", device="cpu", exact=True)
    res = run_batch(prompts, tmp_path / "out", model=exact, progress=False, log=None)
    assert res.exit_code == 0, [(r.name, r.error) for r in res.failed]
    checked = 0
    for name, case in cases.items():
        ref_file = data / "reference" / f"2D_{name}.npz"
        if not ref_file.is_file():
            continue
        ref = np.load(ref_file)["segs"] > 0
        mask = tifffile.imread(tmp_path / "out" / f"{name}.tif")
        assert mask.shape == ref.shape and mask.dtype == np.uint8
        if case.short_side_at(256, mask.shape) >= 4:
            d = dice(mask > 0, ref)
            assert d >= 0.98, (name, d)
            checked += 1
    assert checked >= 4


@pytest.mark.slow
def test_dask_workers_match_single_process(sample_run, tmp_path):
    pytest.importorskip("dask.distributed")
    res1, d, _ = sample_run
    prompts = _write_csv(tmp_path / "prompts.csv", GOOD_ROWS)
    # The on-disk embedding cache the single-process run filled: the workers share it (as
    # in production) and only decode, which keeps this test short. Encoding inside a
    # worker (1 thread) gave identical masks when this was written without the cache.
    cache = d / "emb-cache"
    # two full views plus the zoomed crops of the small nucleus boxes
    cached = len(list(cache.glob("*.npz")))
    assert cached > 2
    res2 = run_batch(
        prompts,
        tmp_path / "out",
        model="litemedsam",
        device="cpu",
        workers=2,
        cache_dir=cache,
        progress=False,
        log=None,
    )
    assert res2.exit_code == 0, [(r.name, r.error) for r in res2.failed]
    assert [r.name for r in res2.rows] == ["busi", "nuc19", "nuc30", "dsb2018_nuclei_4"]
    single = res1.by_name()
    for r in res2.rows:
        a = tifffile.imread(d / "out" / f"{r.name}.tif")
        b = tifffile.imread(tmp_path / "out" / f"{r.name}.tif")
        assert np.array_equal(a, b), r.name
        assert r.iou == pytest.approx(single[r.name].iou, abs=1e-4)
        if single[r.name].dice is not None:
            assert r.dice == pytest.approx(single[r.name].dice, abs=1e-9)
    assert len(list(cache.glob("*.npz"))) == cached  # the workers encoded nothing new: every view was shared
    assert not _leftovers(tmp_path / "out")


# ---------------------------------------------------------------------------
# reliability: outputs checked up front, unexpected row errors logged, worker models shared safely
# ---------------------------------------------------------------------------
def _unwritable_dirs(tmp_path: Path):
    """Output folders that exist or can be named but cannot take files (for root too)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cases = {"a file": blocker, "under a file": blocker / "out", "/proc": Path("/proc/self/fdinfo")}
    summary_dir = tmp_path / "summary-is-dir"
    (summary_dir / "summary.csv").mkdir(parents=True)
    cases["summary.csv a folder"] = summary_dir
    if os.geteuid() != 0:  # permissions do not stop root
        ro = tmp_path / "read-only"
        ro.mkdir()
        ro.chmod(0o500)
        cases["read-only"] = ro
    return cases


@pytest.mark.parametrize("case", ["a file", "under a file", "/proc", "summary.csv a folder", "read-only"])
def test_unwritable_output_fails_before_any_row(model, tmp_path, case):
    cases = _unwritable_dirs(tmp_path)
    if case not in cases:
        pytest.skip("permissions do not stop root")
    prompts = _write_csv(tmp_path / "p.csv", GOOD_ROWS[:2])
    lines = []
    t0 = time.perf_counter()
    with pytest.raises(BatchError, match="output") as err:
        run_batch(prompts, cases[case], model=model, progress=False, log=lines.append)
    assert str(cases[case]) in str(err.value)
    assert lines == [], "no row ran"
    assert time.perf_counter() - t0 < 5, "failed up front, not after encoding the rows"


def test_unexpected_row_errors_are_logged_with_traceback(model, tmp_path, caplog):
    out = tmp_path / "out"
    (out / "busi.tif").mkdir(parents=True)  # the row's mask cannot be written: an OSError, not a MedSAMError
    prompts = _write_csv(tmp_path / "p.csv", GOOD_ROWS[:2])
    with caplog.at_level(logging.WARNING, logger="napari_medsam.engine.batch"):
        res = run_batch(prompts, out, model=model, progress=False, log=None)
    assert [r.name for r in res.failed] == ["busi"] and "IsADirectoryError" in res.failed[0].error
    logged = [r for r in caplog.records if "busi" in r.getMessage()]
    assert logged and logged[0].exc_info is not None, "the traceback of an unexpected error is logged"
    assert res.by_name()["nuc19"].ok
    # expected data errors (MedSAMError) stay one line, without a traceback
    caplog.clear()
    bad = _write_csv(tmp_path / "bad.csv", [{**GOOD_ROWS[0], "gt_select": "bogus", "name": "flat"}])
    with caplog.at_level(logging.WARNING, logger="napari_medsam.engine.batch"):
        res = run_batch(bad, tmp_path / "out2", model=model, progress=False, log=None)
    assert res.n_failed == 1 and not [r for r in caplog.records if r.exc_info]


def test_worker_model_is_loaded_once_under_threads(monkeypatch):
    from napari_medsam.engine.batch import run as batch_run

    real, calls = batch_run.load_model, []

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(batch_run, "load_model", counting)
    monkeypatch.setattr(batch_run, "_WORKER_MODELS", {})
    monkeypatch.setattr(batch_run, "_WORKER_CACHES", {})
    barrier = threading.Barrier(4)
    got = []

    def task():
        barrier.wait()
        got.append(batch_run._worker_model("litemedsam", "cpu", None, None))

    threads = [threading.Thread(target=task) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1, f"{len(calls)} models loaded for one key"
    assert len({id(m) for m in got}) == 1 and len({id(m.cache) for m in got}) == 1
