"""Fixtures for models made by other tools (nnU-Net v2): real results folders built with the tool's own code.

``scripts/make_tiny_nnunet_model.py`` builds tiny nnU-Net folders once (nnU-Net's fingerprint,
planning, preprocessing and a few training iterations, in a subprocess) and caches them under
``Testing/data/cache/nnunet/``; the reference predictions come from nnU-Net's own
``nnUNetPredictor``, run by the same script in one subprocess per test module (sequential, one
thread). Both need ``nnunetv2`` (a test dependency); a run without it fails with the install command.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "make_tiny_nnunet_model.py"
TINY_DATASET = "Dataset501_DeepSegTiny"
TINY_REGIONS_DATASET = "Dataset504_DeepSegTinyRegions"


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return sys.modules[name]


maker = _load("make_tiny_nnunet_model", SCRIPT)


@pytest.fixture(scope="session")
def nnunet_maker() -> ModuleType:
    """``scripts/make_tiny_nnunet_model.py`` as a module (``ensure_models``, ``run_reference``, ``model_folder``)."""
    return maker


@pytest.fixture(scope="session")
def nnunet_results() -> Path:
    """The cached tiny nnU-Net results root (holds ``Dataset501_DeepSegTiny/<Trainer>__<Plans>__<configuration>``)."""
    if maker.versions()["nnunetv2"] == "missing":
        pytest.fail("nnunetv2 is not installed: pip install -c requirements/constraints.txt -e '.[test]'")
    return maker.ensure_models("tiny")


@pytest.fixture(scope="session")
def tiny_folders(nnunet_results: Path) -> dict[str, Path]:
    """The tiny trained model folders by short name: ``3d`` (folds 0, 1), ``2d`` (fold 0), ``resenc`` (fold 0)."""
    return {
        "3d": maker.model_folder(nnunet_results, TINY_DATASET, "3d_fullres"),
        "2d": maker.model_folder(nnunet_results, TINY_DATASET, "2d"),
        "resenc": maker.model_folder(nnunet_results, TINY_DATASET, "3d_fullres", "nnUNetResEncUNetMPlans"),
    }


@pytest.fixture(scope="session")
def tiny_region_folder(nnunet_results: Path) -> Path:
    """The tiny region-based model folder (``Dataset504_DeepSegTinyRegions``: regions "liver and lesions" [1, 2] and
    "liver lesion" 2, ``regions_class_order`` [1, 2]; 3d_fullres, fold 0), trained region-based by nnU-Net."""
    return maker.model_folder(nnunet_results, TINY_REGIONS_DATASET, "3d_fullres")


@pytest.fixture(scope="session")
def head_ct_path() -> Path:
    """The real head CT of Testing/realdata (checksum-verified; fails with the fetch command when missing)."""
    real_images = _load("real_images", REPO / "Testing" / "realdata" / "real_images.py")
    return real_images.real_file(real_images.HEAD_CT)
