"""The module panels load with real Qt (PySide6, offscreen) and hold every widget the code uses."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULES = ("DeepSeg", "DeepSegTraining")

QtWidgets = pytest.importorskip("PySide6.QtWidgets")
QtUiTools = pytest.importorskip("PySide6.QtUiTools")
QtCore = pytest.importorskip("PySide6.QtCore")


@pytest.fixture(scope="module")
def app():
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


def load_ui(path: Path):
    loader = QtUiTools.QUiLoader()
    file = QtCore.QFile(str(path))
    assert file.open(QtCore.QFile.ReadOnly)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        widget = loader.load(file)
    file.close()
    assert widget is not None, loader.errorString()
    return widget


def widget_names_used(module: str) -> set[str]:
    names = set()
    for path in (REPO / module).rglob("*.py"):
        names |= set(re.findall(r"self\.ui\.(\w+)", path.read_text(encoding="utf-8")))
    return names


@pytest.mark.parametrize("module", MODULES)
def test_ui_loads_and_has_every_widget_the_code_uses(app, module):
    widget = load_ui(REPO / module / "Resources" / "UI" / f"{module}.ui")
    present = {child.objectName() for child in widget.findChildren(QtCore.QObject)}
    used = widget_names_used(module)
    assert used, "the module code should use its panel"
    assert used <= present, f"missing in {module}.ui: {sorted(used - present)}"


@pytest.mark.parametrize("module", MODULES)
def test_ui_renders_offscreen(app, module, tmp_path):
    widget = load_ui(REPO / module / "Resources" / "UI" / f"{module}.ui")
    widget.resize(360, 260)
    image = widget.grab().toImage()
    path = tmp_path / f"{module}.png"
    assert image.save(str(path))
    assert image.width() == 360 and path.stat().st_size > 500


def _parameter_node_fields(module_file: Path, class_name: str) -> set[str]:
    import ast

    tree = ast.parse(module_file.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            return {stmt.target.id for stmt in node.body if isinstance(stmt, ast.AnnAssign)}
    raise AssertionError(f"{class_name} not found in {module_file}")


def test_every_gui_bound_widget_names_a_parameter_node_field(app):
    """connectGui binds widgets by their SlicerParameterName; a typo would silently not save state."""
    widget = load_ui(REPO / "DeepSeg" / "Resources" / "UI" / "DeepSeg.ui")
    bound = {
        str(child.property("SlicerParameterName"))
        for child in widget.findChildren(QtCore.QObject)
        if child.property("SlicerParameterName")
    }
    fields = _parameter_node_fields(REPO / "DeepSeg" / "DeepSeg.py", "DeepSegParameterNode")
    assert {"inputVolume", "outputSegmentation", "device", "overlap", "tta", "instances", "datasetFolder"} <= bound
    assert bound <= fields, f"bound to unknown fields: {sorted(bound - fields)}"


def test_module_logic_library_has_no_qt_imports():
    """DeepSegLib runs headless (tests, scripts); only the Segment Editor effect file may use Qt."""
    import ast

    for path in (REPO / "DeepSeg" / "DeepSegLib").glob("*.py"):
        if path.name == "SegmentEditorEffect.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = {alias.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for alias in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imported & {"qt", "ctk", "PythonQt"}, f"{path.name} imports Qt"
