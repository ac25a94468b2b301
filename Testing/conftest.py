"""Shared pytest set-up: the core package is importable from the source tree, tests run on CPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
for module_dir in ("DeepSeg", "DeepSegTraining"):
    path = str(REPO_ROOT / module_dir)
    if path not in sys.path:
        sys.path.insert(0, path)

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


@pytest.fixture(autouse=True)
def _few_threads():
    """Keep torch at 2 threads (the CI machine's cores) so tests do not oversubscribe."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(min(previous, 2))
    yield
    torch.set_num_threads(previous)
