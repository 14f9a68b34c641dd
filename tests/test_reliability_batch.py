"""Prompts files of a batch run under abuse: every bad file a clear error, every bad row an error on that row.

No model is needed: ``read_prompts`` parses the file without running anything, and a bad
row must never stop the rows after it (issue 12: batch CSVs are one of the probed classes).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from napari_medsam.engine.batch import BatchError, read_prompts
from napari_medsam.engine.errors import MedSAMError

HEADER = "image,box,slice,z_range,propagate,name\n"


def _prompts(tmp_path: Path, text: str | bytes) -> Path:
    p = tmp_path / "prompts.csv"
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text)
    return p


BAD_SLICES = ["inf", "-inf", "1e400", "nan", "2.7", "0.5", "True", "five", "0x10", "1,2"]


@pytest.mark.parametrize("value", BAD_SLICES)
def test_bad_slice_is_an_error_on_its_row_and_the_next_row_still_parses(tmp_path, value):
    """Before: ``inf`` / ``1e400`` raised OverflowError out of read_prompts (the whole batch died
    before any row ran) and ``2.7`` was silently truncated to slice 2."""
    p = _prompts(tmp_path, HEADER + f'a.nii.gz,"1,2,30,40","{value}",,,first\nb.png,"1,2,30,40",,,,second\n')
    first, second = read_prompts(p)
    assert first.error is not None and "slice must be an integer" in first.error and repr(value) in first.error
    assert first.slice is None
    assert second.error is None and second.name == "second"


@pytest.mark.parametrize(("value", "expected"), [("3", 3), (" 7 ", 7), ("12.0", 12), ("1e2", 100), ("0", 0)])
def test_integral_slices_are_accepted(tmp_path, value, expected):
    p = _prompts(tmp_path, HEADER + f'a.nii.gz,"1,2,30,40","{value}",,,\n')
    (row,) = read_prompts(p)
    assert row.error is None and row.slice == expected


def test_a_directory_as_prompts_file_says_directory(tmp_path):
    """Before: "prompts file ... does not exist" for a folder that does exist."""
    with pytest.raises(BatchError, match="is a folder, not a prompts CSV"):
        read_prompts(tmp_path)
    with pytest.raises(MedSAMError, match="does not exist"):
        read_prompts(tmp_path / "nope.csv")


def test_unquoted_box_names_the_cause(tmp_path):
    """``a.png,1,2,3,4`` (box not quoted) spills the box into extra fields: the row error says so."""
    p = _prompts(tmp_path, 'image,box\na.png,1,2,3,4\nb.png,"1,2,3,4"\n')
    bad, good = read_prompts(p)
    assert bad.error is not None and "more fields than the header" in bad.error and "quote" in bad.error
    assert good.error is None and good.box == (1.0, 2.0, 3.0, 4.0)


FILE_CASES = {
    "empty": (b"", "lacks the column"),
    "header of other columns": (b"path,roi\na.png,1\n", "lacks the column"),
    "semicolons": (b"image;box\na.png;1,2,3,4\n", "lacks the column"),
    "utf-16": ('image,box\na.png,"1,2,3,4"\n'.encode("utf-16"), "cannot read prompts file"),
    "binary": (bytes(range(256)) * 4, "cannot read prompts file"),
    "huge field": (b'image,box\na.png,"' + b"1" * 200_000 + b'"\n', "cannot read prompts file"),
}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_unusable_files_raise_batch_error(tmp_path, case):
    data, match = FILE_CASES[case]
    with pytest.raises(BatchError, match=match):
        read_prompts(_prompts(tmp_path, data))


ROW_CASES = {
    "box of three": ('a.png,"1,2,3",,,,', "3 values"),
    "box text": ("a.png,abc,,,,", "four numbers"),
    "box nan": ('a.png,"nan,1,2,3",,,,', "NaN or infinite"),
    "box empty": ("a.png,,,,,", "box is empty"),
    "image empty": (',"1,2,3,4",,,,', "image is empty"),
    "z_range inf": ('a.nii.gz,"1,2,3,4",2,"0,inf",true,', "z_range must be an integer"),
    "z_range of three": ('a.nii.gz,"1,2,3,4",2,"0,1,2",true,', "z_range must be 'first,last'"),
    "propagate maybe": ('a.nii.gz,"1,2,3,4",2,,maybe,', "propagate must be true or false"),
}


@pytest.mark.parametrize("case", list(ROW_CASES))
def test_bad_rows_are_errors_on_their_row(tmp_path, case):
    line, match = ROW_CASES[case]
    p = _prompts(tmp_path, HEADER + line + "\n" + 'b.png,"1,2,30,40",,,,ok\n')
    bad, good = read_prompts(p)
    assert bad.error is not None and match in bad.error, bad.error
    assert good.error is None and good.name == "ok"


def test_header_only_gives_no_rows_and_bom_and_case_are_accepted(tmp_path):
    assert read_prompts(_prompts(tmp_path, "image,box\n")) == []
    p = _prompts(tmp_path, '\ufeff Image , BOX \na.png,"1,2,3,4"\n'.encode())
    (row,) = read_prompts(p)
    assert row.error is None and row.box == (1.0, 2.0, 3.0, 4.0)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_a_named_pipe_as_prompts_file_is_refused(tmp_path):
    fifo = tmp_path / "prompts.csv"
    os.mkfifo(fifo)
    with pytest.raises(MedSAMError, match="not a regular file"):
        read_prompts(fifo)
