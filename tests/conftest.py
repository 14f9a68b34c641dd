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
    """The real LiteMedSAM with its official weights and the authors' exact pipeline (shared by the
    whole session; the reference the fast default is checked against). ``lite_default``: the default."""
    from napari_medsam import MedSAM

    return MedSAM.load("litemedsam", device="cpu", exact=True)


@pytest.fixture(scope="session")
def lite_default(lite):
    """``MedSAM.load("litemedsam")`` as users get it: the fast path (same weights as ``lite``, own cache)."""
    from napari_medsam import MedSAM
    from napari_medsam.engine.cache import EmbeddingCache

    return MedSAM(lite.spec, lite.module, lite.device, EmbeddingCache(), lite.checkpoint, fast=True, exact=False)
