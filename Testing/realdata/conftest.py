"""Fixtures for the real-image tests: paths into ``Testing/data/cache/`` (see Testing/data/README.md).

Each path fixture FAILS (never skips) with "run `python scripts/fetch_test_images.py`" when its file
is missing or its SHA-256 differs from the one the fetch script records.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from real_images import AAL, AAL_LUT, AAL_NAMES, COLIN_T1, HEAD_CT, LIVER_SEG, MNI_GM, MNI_T1, MNI_WM, real_file


@pytest.fixture(scope="session")
def mni_t1_path() -> Path:
    """MNI ICBM152 2009a symmetric T1 template (nilearn), 197 x 233 x 189 voxels of 1 mm, uint8."""
    return real_file(MNI_T1)


@pytest.fixture(scope="session")
def mni_gm_path() -> Path:
    """Grey-matter probability map on the MNI T1 grid (uint8, 255 = probability 1)."""
    return real_file(MNI_GM)


@pytest.fixture(scope="session")
def mni_wm_path() -> Path:
    """White-matter probability map on the MNI T1 grid (uint8, 255 = probability 1)."""
    return real_file(MNI_WM)


@pytest.fixture(scope="session")
def colin_t1_path() -> Path:
    """Colin27 T1 (``ch2.nii.gz``, mricron-data), 181 x 217 x 181 voxels of 1 mm, uint8."""
    return real_file(COLIN_T1)


@pytest.fixture(scope="session")
def aal_path() -> Path:
    """AAL atlas, 116 labels on the Colin27 grid (uint8)."""
    return real_file(AAL)


@pytest.fixture(scope="session")
def aal_names() -> dict[int, str]:
    """AAL label value -> name, from ``aal.nii.txt`` (``value name code`` lines, CRLF)."""
    names = {}
    for line in real_file(AAL_NAMES).read_text(encoding="ascii").splitlines():
        fields = line.split()
        if fields:
            names[int(fields[0])] = fields[1]
    return names


@pytest.fixture(scope="session")
def aal_colors() -> dict[int, tuple[float, float, float]]:
    """AAL label value -> RGB in [0, 1], from MRIcron's ``aal.nii.lut`` (256 red, 256 green, 256 blue bytes)."""
    planes = real_file(AAL_LUT).read_bytes()
    assert len(planes) == 768, f"{AAL_LUT} should hold 3 x 256 bytes, found {len(planes)}"
    return {value: tuple(planes[channel * 256 + value] / 255.0 for channel in range(3)) for value in range(256)}  # type: ignore[misc]


@pytest.fixture(scope="session")
def head_ct_path() -> Path:
    """Head CT atlas (TotalSegmentator resources), 202 x 202 x 179 voxels of 1 mm, int16."""
    return real_file(HEAD_CT)


@pytest.fixture(scope="session")
def liver_seg_path() -> Path:
    """DICOM SEG of a liver on three CT slices (pydicom-data); the CT it references is not shipped."""
    return real_file(LIVER_SEG)
