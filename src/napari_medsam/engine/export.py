"""Kept import path: the session export lives in :mod:`napari_medsam.engine.session.export`."""

from .session.export import (
    EXPORT_DIR,
    SUMMARY_FIELDS,
    SUMMARY_NAME,
    ExportResult,
    export_session,
    gts_dtype,
    model_input,
)

__all__ = ["EXPORT_DIR", "SUMMARY_FIELDS", "SUMMARY_NAME", "ExportResult", "export_session", "gts_dtype", "model_input"]
