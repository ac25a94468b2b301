"""The test run's own set-up (``Testing/conftest.py``)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_long_files_run_first_are_test_files_that_exist():
    # a renamed or deleted file would silently leave the list, and a long file would then start last
    tree = ast.parse((REPO / "Testing" / "conftest.py").read_text())
    assigned = {
        target.id: node.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    long_files = ast.literal_eval(assigned["LONG_FILES"])
    assert len(long_files) == len(set(long_files)) > 5
    missing = [path for path in long_files if not (REPO / path).is_file() or not Path(path).name.startswith("test_")]
    assert missing == []
