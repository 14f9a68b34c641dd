"""CLI values that start with a minus sign, and bad values: one error line, exit status 2, no traceback.

Real LiteMedSAM and the bundled samples; in-process ``main([...])`` calls (argparse errors
arrive as ``SystemExit(2)``), one real subprocess for the console entry.
"""

from __future__ import annotations

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

from _data import SAMPLES  # noqa: E402

BUSI = SAMPLES / "busi_malignant_1.png"  # 449 wide, 598 high
CT = SAMPLES / "totalseg_ct.nii.gz"


@pytest.fixture
def model(lite, monkeypatch):
    def load(*a, **k):
        return lite

    from napari_medsam.engine.batch import run as batch_run

    for module in (batch, batch_run):
        monkeypatch.setattr(module, "load_model", load, raising=False)
    return lite


def _errline(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines, "an error is printed"
    assert lines[-1].startswith("napari-medsam"), err
    assert ": error: " in lines[-1], err
    return lines[-1]


def _main(args, capsys):
    """(exit status, last error line or '') of one in-process run."""
    try:
        rc = cli.main(args)
    except SystemExit as exc:  # argparse
        rc = exc.code
    err = capsys.readouterr().err
    return rc, (_errline(err) if rc else "")


@pytest.mark.parametrize(
    "argv, joined",
    [
        (["segment", "a.png", "--box", "-5,0,10,10"], ["segment", "a.png", "--box=-5,0,10,10"]),
        (["--box", "-5", "-o", "x"], ["--box=-5", "-o", "x"]),
        (["--window", "-600,1500"], ["--window=-600,1500"]),
        (["--z-range", "-3,4"], ["--z-range=-3,4"]),
        (["--slice", "-1"], ["--slice=-1"]),
        (["--box", "-.5,0,1,1"], ["--box=-.5,0,1,1"]),
        (["--box", "-inf,0,1,1"], ["--box=-inf,0,1,1"]),
        (["--window", "-abc"], ["--window", "-abc"]),
        (["--model", "-5,0"], ["--model", "-5,0"]),
        (["--box", "-o", "x"], ["--box", "-o", "x"]),  # an option after it is not a value
        (["--box=-5,0,1,1"], ["--box=-5,0,1,1"]),
        (["--", "--box", "-5,0,1,1"], ["--", "--box", "-5,0,1,1"]),
        (["--box"], ["--box"]),
    ],
)
def test_negative_values_are_joined_to_their_option(argv, joined):
    assert cli.join_negative_values(argv) == joined


@pytest.mark.parametrize("box", ["-20,133,439,403", "-20.5,133,460,403", "-1,-1,439,403"])
def test_box_starting_left_of_the_image_as_a_separate_argument(model, tmp_path, capsys, box):
    out = tmp_path / "m.tif"
    rc, err = _main(["segment", str(BUSI), "--box", box, "-o", str(out), "--device", "cpu"], capsys)
    assert rc == 0, err
    mask = tifffile.imread(out)
    assert mask.shape == (598, 449) and mask.sum() > 1000


def test_negative_ct_window_level_as_a_separate_argument(model, tmp_path, capsys):
    out = tmp_path / "m.nii.gz"
    rc, err = _main(
        [
            "segment",
            str(CT),
            "--box",
            "100,100,200,200",
            "--slice",
            "15",
            "--window",
            "-600,1500",
            "--modality",
            "ct",
            "-o",
            str(out),
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert rc == 0, err
    assert out.is_file()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--box", "a,b,c,d"], "four numbers"),
        (["--box", "1,2,3"], "3 values"),
        (["--box", "1,2,3,4,5"], "5 values"),
        (["--box", "-1,2,3"], "3 values"),
        (["--box", ""], "empty"),
        (["--box", "   "], "empty"),
        (["--box", "inf,0,10,10"], "infinite"),
        (["--box", "-inf,0,10,10"], "infinite"),
        (["--box", "nan,0,10,10"], "NaN"),
        (["--box", "1e999,0,10,10"], "infinite"),
        (["--box", "1:2:3:4"], "four numbers"),  # "," ";" and blanks separate (engine.validate)
        (["--box", "0x10,0,10,10"], "four numbers"),
        (["--box", "-5,-5,-1,-1"], "box"),
        (["--box", "5000,5000,6000,6000"], "box"),
        (["--box", "8,133,439,403", "--z-range", "5"], "z"),
        (["--box", "8,133,439,403", "--z-range", "a,b"], "z"),
        (["--box", "8,133,439,403", "--z-range", "1,2,3"], "z"),
        (["--box", "8,133,439,403", "--window", "-abc"], "window"),
    ],
)
def test_bad_values_give_one_line_and_status_2(model, tmp_path, capsys, extra, words):
    out = tmp_path / "m.tif"
    rc, err = _main(["segment", str(BUSI), "-o", str(out), "--device", "cpu", *extra], capsys)
    assert rc == 2, err
    assert words.lower() in err.lower(), err
    assert not out.exists()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--box", "8,133,439,403", "--slice", "abc"], "--slice"),
        (["--box"], "--box"),
        (["--box", "8,133,439,403", "--nonsense"], "--nonsense"),
    ],
)
def test_argparse_errors_are_status_2_without_traceback(tmp_path, capsys, extra, words):
    rc, err = _main(["segment", str(BUSI), "-o", str(tmp_path / "m.tif"), *extra], capsys)
    assert rc == 2 and words in err


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--box", "100,100,200,200", "--slice", "-1000"], "slice"),
        (["--box", "100,100,200,200", "--slice", "1000"], "slice"),
        (["--box", "100,100,200,200", "--slice", "15", "--propagate", "--z-range", "-5,-2"], "z"),
        (["--box", "100,100,200,200", "--slice", "15", "--propagate", "--z-range", "900,1000"], "z"),
    ],
)
def test_volume_values_out_of_range(model, tmp_path, capsys, extra, words):
    out = tmp_path / "m.nii.gz"
    rc, err = _main(["segment", str(CT), "--modality", "ct", "-o", str(out), "--device", "cpu", *extra], capsys)
    assert rc == 2, err
    assert words in err.lower()
    assert not out.exists()


def test_console_entry_accepts_negative_box(tmp_path):
    env = dict(os.environ)
    src = str(Path(napari_medsam.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "napari_medsam.cli",
            "segment",
            str(tmp_path / "none.png"),
            "--box",
            "-5,0,10,10",
            "-o",
            str(tmp_path / "m.tif"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert p.returncode == 2
    line = _errline(p.stderr)
    assert "does not exist" in line and "expected one argument" not in p.stderr
    assert np.isfinite(p.returncode)
