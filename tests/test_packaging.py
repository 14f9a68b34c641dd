"""What a wheel or sdist carries besides the code: the licence, the attribution, the samples' origin.

Apache-2.0 (section 4(d)) asks redistributions to carry the NOTICE file; it attributes the
LiteMedSAM weights and every bundled sample image.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "src" / "napari_medsam" / "samples"


def test_wheels_and_sdists_carry_license_and_notice():
    """Before: ``license_files = LICENSE`` left NOTICE out of the built wheel."""
    setupcfg = pytest.importorskip("setuptools.config.setupcfg")
    meta = setupcfg.read_configuration(str(ROOT / "setup.cfg"))["metadata"]
    assert meta["license"] == "Apache-2.0"
    assert set(meta["license_files"]) == {"LICENSE", "NOTICE"}
    assert "Apache License" in (ROOT / "LICENSE").read_text() and "Version 2.0" in (ROOT / "LICENSE").read_text()


def test_notice_attributes_the_weights_and_every_bundled_sample():
    notice = (ROOT / "NOTICE").read_text()
    assert "lite_medsam.pth" in notice and "bowang-lab/MedSAM" in notice
    files = sorted(p.name for p in SAMPLES.iterdir() if p.is_file() and p.name != "README.md")
    assert files, "the samples folder is bundled"
    missing = [name for name in files if name not in notice]
    assert not missing, f"bundled samples without attribution in NOTICE: {missing}"
