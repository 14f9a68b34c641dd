"""Tests for the ``napari-medsam`` command line (segment, batch, models, demo).

Real LiteMedSAM weights and the bundled samples. In-process ``main([...])`` calls
share one module-scoped model (``engine.batch.load_model`` hands it out for
``litemedsam``); ``python -m napari_medsam.cli`` runs as a real subprocess for the
exit-status checks (they fail before any model is loaded, so they are quick).
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import napari_medsam
from napari_medsam import cli
from napari_medsam.engine import batch

tifffile = pytest.importorskip("tifffile")

from _data import SAMPLES, read_gray  # noqa: E402

BUSI = SAMPLES / "busi_malignant_1.png"
BUSI_BOX = "8,133,439,403"


def _env():
    env = dict(os.environ)
    src = str(Path(napari_medsam.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run(*args):
    return subprocess.run(
        [sys.executable, "-m", "napari_medsam.cli", *args], capture_output=True, text=True, env=_env(), timeout=600
    )


@pytest.fixture(scope="module")
def shared_model():
    from napari_medsam.engine import MedSAM

    return MedSAM.load("litemedsam", device="cpu", exact=True)


@pytest.fixture(scope="module")
def shared_fast_model():
    from napari_medsam.engine import MedSAM

    return MedSAM.load("litemedsam", device="cpu")  # the default: the fast path


@pytest.fixture
def use_shared_model(shared_model, shared_fast_model, monkeypatch):
    real = batch.load_model

    def load(model="litemedsam", device="auto", checkpoint=None, cache=None, fast=False, exact=False):
        batch.check_device(device)
        if model == "litemedsam" and checkpoint is None:
            return shared_model if exact else shared_fast_model
        return real(model, device, checkpoint, cache, fast, exact)

    from napari_medsam.engine import demo
    from napari_medsam.engine.batch import run as batch_run

    for module in (batch, batch_run, demo):  # every place that looks the loader up by name
        monkeypatch.setattr(module, "load_model", load)
    return shared_model


def _one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert "Traceback" not in err
    assert lines and lines[-1].startswith("napari-medsam: error: "), err
    return lines[-1]


def test_segment_writes_mask(use_shared_model, tmp_path, capsys):
    out = tmp_path / "m.tif"
    assert cli.main(["segment", str(BUSI), "--box", BUSI_BOX, "-o", str(out), "--device", "cpu"]) == 0
    stdout = capsys.readouterr().out
    assert "wrote" in stdout and "encode" in stdout
    mask = tifffile.imread(out)
    assert mask.shape == (598, 449) and mask.dtype == np.uint8
    from napari_medsam.engine.cases import load_cases

    case = next(c for c in load_cases(SAMPLES, dims=2) if c.image.name == BUSI.name)
    from napari_medsam.engine.metrics import dice

    assert dice(mask > 0, case.ground_truth()) > 0.85
    assert not [f for f in tmp_path.iterdir() if f.name != "m.tif"]  # no temp files left


@pytest.mark.parametrize(
    "args, words",
    [
        (["--box", "1,2,3"], "3 values"),
        (["--box", "nan,2,3,4"], "NaN"),
        (["--box", "1,2,30,40", "--model", "nosuch"], "unknown model"),
        (["--box", "1,2,30,40", "--window", "banana"], "unknown CT window"),
        (["--box", "600,700,610,710"], "no area"),
        (["--box", "1,2,30,40", "--device", "cuda:7"], "not available"),
        (["--box", "1,2,30,40", "--device", "tpu"], "unknown device"),
    ],
)
def test_segment_user_errors_exit_2(use_shared_model, tmp_path, capsys, args, words):
    out = tmp_path / "m.tif"
    rc = cli.main(["segment", str(BUSI), "-o", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert words in _one_error_line(err)
    assert not out.exists()


def test_segment_errors_subprocess(tmp_path):
    p = _run("segment", str(tmp_path / "nope.png"), "--box", "1,2,30,40", "-o", str(tmp_path / "m.tif"))
    assert p.returncode == 2
    assert "does not exist" in _one_error_line(p.stderr)


def test_models_lists_litemedsam_verified(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith("litemedsam:"))
    assert "verified" in lines[i + 1] and "not found" not in lines[i + 1]
    path = lines[i + 1].split("checkpoint:")[1].split("[")[0].strip()
    assert Path(path).is_file()
    assert "medsam:" in out and "sam_vit_b:" in out


def test_demo_writes_files(use_shared_model, tmp_path, capsys):
    out_dir = tmp_path / "demo"
    assert cli.main(["demo", "-o", str(out_dir)]) == 0
    out = capsys.readouterr().out
    mask = out_dir / "busi_malignant_1_mask.tif"
    png = out_dir / "busi_malignant_1_overlay.png"
    assert mask.is_file() and png.is_file()
    assert "encode" in out and "decode" in out and "Dice" in out
    dice = float(out.split("Dice vs ground truth")[1].split()[0])
    assert dice > 0.85
    from PIL import Image

    m = tifffile.imread(mask)
    with Image.open(png) as im:
        assert im.size == (449, 598) and im.mode == "RGB"
    assert m.shape == (598, 449) and m.max() == 1


def test_batch_cli_exit_codes(use_shared_model, tmp_path, capsys):
    rows = [
        {
            "image": str(BUSI),
            "box": BUSI_BOX,
            "gt": str(SAMPLES / "busi_malignant_1_mask.png"),
            "gt_select": "component:1",
            "name": "busi",
        },
        {"image": "missing.png", "box": "1,2,30,40", "gt": "", "gt_select": "", "name": "missing"},
    ]
    prompts = tmp_path / "p.csv"
    with open(prompts, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out_dir = tmp_path / "out"
    rc = cli.main(["batch", str(prompts), "--out-dir", str(out_dir), "--no-progress"])
    cap = capsys.readouterr()
    assert rc == 1
    assert "row 2 (missing)" in cap.err and "does not exist" in cap.err and "Traceback" not in cap.err
    assert "1 ok, 1 failed" in cap.out
    assert (out_dir / "busi.tif").is_file() and not (out_dir / "missing.tif").exists()
    with open(out_dir / "summary.csv", newline="") as f:
        summary = {r["name"]: r for r in csv.DictReader(f)}
    assert summary["busi"]["status"] == "ok" and float(summary["busi"]["dice"]) > 0.85
    assert summary["missing"]["status"] == "error"

    # all rows good -> exit 0
    with open(prompts, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerow(rows[0])
    assert cli.main(["batch", str(prompts), "--out-dir", str(tmp_path / "out2"), "--no-progress"]) == 0
    assert np.array_equal(tifffile.imread(out_dir / "busi.tif"), tifffile.imread(tmp_path / "out2" / "busi.tif"))


def test_segment_and_batch_fast_agree_with_default(use_shared_model, shared_fast_model, tmp_path, capsys):
    """The default (fused decoder + ONNX Runtime or fused encoder) gives --exact's mask on a real image;
    --fast is a no-op alias kept for old scripts."""
    from napari_medsam.engine.metrics import dice

    exact, fast = tmp_path / "exact.tif", tmp_path / "fast.tif"
    assert cli.main(["segment", str(BUSI), "--box", BUSI_BOX, "-o", str(exact), "--device", "cpu", "--exact"]) == 0
    assert cli.main(["segment", str(BUSI), "--box", BUSI_BOX, "-o", str(fast), "--device", "cpu", "--fast"]) == 0
    assert shared_fast_model.fast is not None and shared_fast_model.fast.decoder is not None
    assert use_shared_model.exact and use_shared_model.fast is None
    a, b = tifffile.imread(exact) > 0, tifffile.imread(fast) > 0
    assert a.any() and dice(a, b) >= 0.99
    prompts = tmp_path / "p.csv"
    prompts.write_text(f'image,box,name\n{BUSI},"{BUSI_BOX}",busi\n')
    assert cli.main(["batch", str(prompts), "--out-dir", str(tmp_path / "out"), "--no-progress", "--fast"]) == 0
    assert dice(tifffile.imread(tmp_path / "out" / "busi.tif") > 0, a) >= 0.99
    capsys.readouterr()


def test_batch_cli_setup_errors_exit_2(tmp_path, capsys):
    assert cli.main(["batch", str(tmp_path / "nope.csv"), "--out-dir", str(tmp_path / "o")]) == 2
    assert "does not exist" in _one_error_line(capsys.readouterr().err)
    bad = tmp_path / "bad.csv"
    bad.write_text("path\nx.png\n")
    assert cli.main(["batch", str(bad), "--out-dir", str(tmp_path / "o")]) == 2
    assert "lacks the column" in _one_error_line(capsys.readouterr().err)


def test_download_unknown_model_exit_2(capsys):
    assert cli.main(["download", "nosuch"]) == 2
    assert "unknown model" in _one_error_line(capsys.readouterr().err)


def test_segment_picked_channel_of_a_cyx_tiff(use_shared_model, tmp_path, capsys):
    """A two-channel CYX TIFF: --channels 1 segments exactly what the single image gives."""
    gray = read_gray(BUSI)
    stack = tmp_path / "cyx.tif"
    tifffile.imwrite(stack, np.stack([np.fliplr(gray), gray]))
    one, two = tmp_path / "one.tif", tmp_path / "two.tif"
    assert cli.main(["segment", str(BUSI), "--box", BUSI_BOX, "-o", str(one), "--device", "cpu"]) == 0
    assert (
        cli.main(["segment", str(stack), "--channels", "1", "--box", BUSI_BOX, "-o", str(two), "--device", "cpu"]) == 0
    )
    a, b = tifffile.imread(one), tifffile.imread(two)
    assert a.any() and (a == b).all()
    capsys.readouterr()
    assert cli.main(["segment", str(stack), "--channels", "4", "--box", BUSI_BOX, "-o", str(two)]) == 2
    assert "does not exist" in _one_error_line(capsys.readouterr().err)


def test_session_command_reports_damaged_records_and_exports(tmp_path, capsys):
    from napari_medsam.engine.session import LabelingSession

    images = tmp_path / "in"
    images.mkdir()
    for name in ("busi_malignant_1.png", "isic_0014270.png"):
        (images / name).write_bytes((SAMPLES / name).read_bytes())
    out = tmp_path / "out"
    s = LabelingSession(images, out)
    lab = np.zeros(s.info(0).shape, np.uint8)
    lab[10:50, 20:80] = 1
    s.save(0, lab)
    s.save(1, np.zeros(s.info(1).shape, np.uint8))
    s.record_path(1).write_text('["not", "a", "record"]')
    assert cli.main(["session", str(out), "--export"]) == 0
    cap = capsys.readouterr()
    warn = [ln for ln in cap.err.splitlines() if ln.startswith("napari-medsam: warning: ")]
    assert len(warn) == 1 and "isic_0014270.png" in warn[0] and ".corrupt-" in warn[0], cap.err
    assert "0/2 done" in cap.out and "exported 2 images" in cap.out
    assert (out / "export" / "busi_malignant_1.npz").is_file()
    assert cli.main(["session", str(out)]) == 0  # already set aside: nothing more to report
    assert "warning" not in capsys.readouterr().err
    # no session there and no images given: a clear error, exit status 2
    assert cli.main(["session", str(tmp_path / "nothing")]) == 2
    assert "holds no session" in _one_error_line(capsys.readouterr().err)


def test_segment_and_batch_small_box_zoom_and_exact(use_shared_model, shared_fast_model, tmp_path, capsys):
    """Issue 14, same in every front-end: ``segment`` / ``batch`` on a small nucleus give the mask
    ``MedSAM.segment(image, box=...)`` gives (the zoom strategy of engine.zoom on the default model);
    ``--exact`` gives the authors' one full-view decode (``predict``)."""
    from napari_medsam.engine.cases import load_cases
    from napari_medsam.engine.metrics import dice

    image = SAMPLES / "dsb2018_nuclei.png"
    case = next(c for c in load_cases(SAMPLES, dims=2) if c.image.name == image.name)
    box = ",".join(str(int(v)) for v in case.box)
    gray = read_gray(image)
    zoomed, exact = tmp_path / "zoom.tif", tmp_path / "exact.tif"
    assert cli.main(["segment", str(image), "--box", box, "-o", str(zoomed), "--device", "cpu"]) == 0
    assert cli.main(["segment", str(image), "--box", box, "-o", str(exact), "--device", "cpu", "--exact"]) == 0
    got, got_exact = tifffile.imread(zoomed) > 0, tifffile.imread(exact) > 0
    want = shared_fast_model.segment(gray, box=case.box)
    np.testing.assert_array_equal(got, want)
    full = shared_fast_model.predict(shared_fast_model.embed(gray), case.box).masks[0]
    assert not np.array_equal(want, full), "the zoom changed this nucleus's mask"
    np.testing.assert_array_equal(got_exact, use_shared_model.predict(use_shared_model.embed(gray), case.box).masks[0])
    assert dice(got, case.ground_truth()) > 0.7
    prompts = tmp_path / "p.csv"
    prompts.write_text(f'image,box,name\n{image},"{box}",nuc\n')
    assert cli.main(["batch", str(prompts), "--out-dir", str(tmp_path / "out"), "--no-progress"]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "out" / "nuc.tif") > 0, want)
    assert cli.main(["batch", str(prompts), "--out-dir", str(tmp_path / "ex"), "--no-progress", "--exact"]) == 0
    np.testing.assert_array_equal(tifffile.imread(tmp_path / "ex" / "nuc.tif") > 0, got_exact)
    capsys.readouterr()


def test_version_comes_from_the_package_metadata(capsys, monkeypatch):
    from importlib.metadata import PackageNotFoundError, version

    from napari_medsam.cli import parser

    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"napari-medsam {version('napari-medsam')}"

    def not_installed(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(parser, "version", not_installed)  # a source tree that was never installed
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == "napari-medsam 0.0.0+unknown"
