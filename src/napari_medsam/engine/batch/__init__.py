"""Batch segmentation from a prompts CSV, on one process or a Dask cluster.

The prompts format is described in :mod:`.prompts`, the run and its outputs in
:mod:`.run`. The names below are the public import path
``napari_medsam.engine.batch`` (the demo and the one-image segmenter are
re-exported from :mod:`..demo` and :mod:`..segment` for older callers).
"""

from napari_medsam.engine.cases import load_ground_truth
from napari_medsam.engine.demo import DemoResult, overlay, run_demo, samples_dir
from napari_medsam.engine.errors import BatchError
from napari_medsam.engine.segment import (
    ImageSegmenter,
    ImageSession,
    Segmentation,
    check_device,
    load_model,
    model_spec,
)

from .prompts import PromptRow, group_rows, parse_box_text, parse_z_range, read_prompts
from .results import SUMMARY_FIELDS, SUMMARY_NAME, BatchResult, RowResult, RowStatus, write_summary
from .run import check_output_dir, run_batch, run_group

__all__ = [
    "SUMMARY_FIELDS",
    "SUMMARY_NAME",
    "BatchError",
    "BatchResult",
    "DemoResult",
    "ImageSegmenter",
    "ImageSession",
    "PromptRow",
    "RowResult",
    "RowStatus",
    "Segmentation",
    "check_device",
    "check_output_dir",
    "group_rows",
    "load_ground_truth",
    "load_model",
    "model_spec",
    "overlay",
    "parse_box_text",
    "parse_z_range",
    "read_prompts",
    "run_batch",
    "run_demo",
    "run_group",
    "samples_dir",
    "write_summary",
]
