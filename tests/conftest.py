"""Shared fixtures: where the real data is, the bundled samples, one model per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from _data import SAMPLES, require_shared


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return require_shared()


@pytest.fixture(scope="session")
def samples() -> Path:
    return SAMPLES


@pytest.fixture(scope="session")
def lite():
    """The real LiteMedSAM with its official weights (shared by the whole session)."""
    from napari_medsam import MedSAM

    return MedSAM.load("litemedsam", device="cpu")
