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
