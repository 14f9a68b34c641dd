"""Shared fixtures: where the real data is, the bundled samples, one model per session."""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("MEDSAM_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
SAMPLES = Path(str(files("napari_medsam") / "samples"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED / "cases.csv").exists():
        pytest.skip(f"shared test data not found at {SHARED} (set MEDSAM_SHARED_DATA to its folder)")
    return SHARED


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def lite():
    """The real LiteMedSAM with its official weights (shared by the whole session)."""
    from napari_medsam import MedSAM

    return MedSAM.load("litemedsam", device="cpu")
