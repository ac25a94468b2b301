"""Shared pytest set-up: the module folders are importable from the source tree, tests run on CPU.

The Slicer-side suites (``Testing/mrml``, ``Testing/extension``) also run in a Python 3.12 virtual
environment that has what a fresh Slicer has and no torch (``make test`` does both). There, engine
subprocesses run with ``$DEEPSEG_ENGINE_PYTHON`` (the 3.11 environment that has torch), exactly as
Slicer runs the engine in a separate ``PythonSlicer`` process.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
STANDINS = REPO_ROOT / "Testing" / "standins"
for module_dir in ("DeepSeg", "DeepSegTraining"):
    path = str(REPO_ROOT / module_dir)
    if path not in sys.path:
        sys.path.insert(0, path)

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
#: set by `make test` for the torch-free Slicer-side run; torch must then really be absent.
SLICER_SIDE_RUN = os.environ.get("DEEPSEG_SLICER_SIDE_RUN") == "1"
TORCH_AVAILABLE = importlib.util.find_spec("torch") is not None


def pytest_configure(config):
    if SLICER_SIDE_RUN and TORCH_AVAILABLE:
        raise pytest.UsageError("the Slicer-side run must not have torch installed (it stands for a fresh Slicer)")


def pytest_collection_modifyitems(config, items):
    if TORCH_AVAILABLE:
        return
    for item in items:
        if item.get_closest_marker("needs_torch") is not None:
            item.add_marker(pytest.mark.skip(reason="needs torch in this process; runs in the 3.11 suite"))


@pytest.fixture(scope="session")
def engine_python() -> str:
    """The interpreter that runs ``deepseg`` subprocesses (Slicer: PythonSlicer; here: one with torch)."""
    return os.environ.get("DEEPSEG_ENGINE_PYTHON", sys.executable)


@pytest.fixture(autouse=True)
def _few_threads():
    """Keep torch at 2 threads (the CI machine's cores) so tests do not oversubscribe."""
    if "torch" not in sys.modules:
        yield
        return
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, 2))
    yield
    torch.set_num_threads(previous)
