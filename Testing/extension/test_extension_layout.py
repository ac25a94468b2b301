"""The Slicer extension's packaging: CMake lists every shipped file, metadata is complete."""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

from cmake_lists import problems

REPO = Path(__file__).resolve().parents[2]
MODULES = ("DeepSeg", "DeepSegTraining")


@pytest.mark.parametrize("module", MODULES)
def test_cmake_lists_every_shipped_file(module):
    assert problems(REPO / module) == []


def test_a_file_missing_from_cmake_lists_is_reported(tmp_path):
    copy = tmp_path / "DeepSeg"
    shutil.copytree(REPO / "DeepSeg", copy, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (copy / "DeepSegLib" / "forgotten.py").write_text("x = 1\n")
    (copy / "Resources" / "UI" / "Extra.ui").write_text("<ui/>\n")
    found = problems(copy)
    assert any("DeepSegLib/forgotten.py is not in MODULE_PYTHON_SCRIPTS" in p for p in found)
    assert any("Resources/UI/Extra.ui is not in MODULE_PYTHON_RESOURCES" in p for p in found)
    (copy / "deepseg_core" / "io.py").unlink()
    assert any("lists deepseg_core/io.py, which does not exist" in p for p in problems(copy))


def test_top_level_cmake_has_extension_metadata():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    for field in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
        "EXTENSION_SCREENSHOTURLS",
        "EXTENSION_DEPENDS",
    ):
        assert re.search(rf"set\({field}\s+\S", text), field
    assert re.search(r"project\(DeepSeg\)", text)
    for module in MODULES:
        assert f"add_subdirectory({module})" in text


@pytest.mark.parametrize("module", MODULES)
def test_module_file_defines_the_scripted_module_classes(module):
    tree = ast.parse((REPO / module / f"{module}.py").read_text(encoding="utf-8"))
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {module, f"{module}Widget", f"{module}Logic", f"{module}Test"} <= classes
    assert (REPO / module / "Resources" / "Icons" / f"{module}.png").exists()
    assert (REPO / module / "Resources" / "UI" / f"{module}.ui").exists()


@pytest.mark.parametrize("module", MODULES)
def test_slicer_side_code_avoids_python_apis_removed_in_312(module):
    removed = {"imp", "distutils", "asynchat", "asyncore", "smtpd"}
    for path in (REPO / module).rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            assert not removed & set(names), f"{path} imports {removed & set(names)}"
