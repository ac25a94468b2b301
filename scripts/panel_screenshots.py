"""Render both modules' panels from their ``.ui`` files to PNG (README and extension screenshots).

    python scripts/panel_screenshots.py [--output Resources/Screenshots]

The panels are loaded with real Qt (PySide6, offscreen) from the same ``.ui`` files Slicer loads.
Slicer's C++ widgets (``ctkCollapsibleButton``, ``qMRMLNodeComboBox``, ...) do not exist outside
Slicer, so this script registers small *screenshot stand-ins* with the same class names that draw
as their closest plain-Qt equivalents (a titled group box, a combo box, a line edit, a table). The
model list, descriptions and device line are the ones the real panel logic produces on this
machine; the rest is each panel's initial state.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "DeepSeg"), str(REPO / "DeepSegTraining"), str(REPO / "Testing" / "extension")]
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets  # noqa: E402

PANEL_WIDTH = 420


class ctkCollapsibleButton(QtWidgets.QGroupBox):  # noqa: N801  (the .ui class name)
    """Screenshot stand-in: a titled group box (Slicer's collapsible section header)."""

    def _text(self) -> str:
        return self.title()

    def _set_text(self, value: str) -> None:
        self.setTitle(value)

    text = QtCore.Property(str, _text, _set_text)


class qMRMLNodeComboBox(QtWidgets.QComboBox):  # noqa: N801
    """Screenshot stand-in: a combo box showing the node name a user would see."""


class ctkPathLineEdit(QtWidgets.QLineEdit):  # noqa: N801
    """Screenshot stand-in: a line edit with a placeholder path."""


class qMRMLTableView(QtWidgets.QTableView):  # noqa: N801
    """Screenshot stand-in: an empty table view."""


class qMRMLWidget(QtWidgets.QWidget):  # noqa: N801
    """Screenshot stand-in: the panel's root widget."""


STANDINS = (ctkCollapsibleButton, qMRMLNodeComboBox, ctkPathLineEdit, qMRMLTableView, qMRMLWidget)


def application() -> QtWidgets.QApplication:
    """The process's QApplication (offscreen)."""
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


def load_panel(module: str) -> QtWidgets.QWidget:
    """The module's ``.ui`` loaded with the stand-ins registered."""
    application()
    loader = QtUiTools.QUiLoader()
    for cls in STANDINS:
        loader.registerCustomWidget(cls)
    path = REPO / module / "Resources" / "UI" / f"{module}.ui"
    file = QtCore.QFile(str(path))
    if not file.open(QtCore.QFile.ReadOnly):
        raise RuntimeError(f"cannot open {path}")
    widget = loader.load(file)
    file.close()
    if widget is None:
        raise RuntimeError(f"{path}: {loader.errorString()}")
    return widget


def _find(widget: QtWidgets.QWidget, name: str) -> QtWidgets.QWidget:
    child = widget.findChild(QtWidgets.QWidget, name)
    if child is None:
        raise RuntimeError(f"no widget {name!r} in the panel")
    return child


def fill_deepseg(widget: QtWidgets.QWidget) -> None:
    """The DeepSeg panel as the panel logic shows it on first open (bundled model, sample loaded)."""
    import slicer

    from DeepSegLib.panel_logic import DeepSegPanelLogic, PanelSettings

    logic = DeepSegPanelLogic(slicer.vtkMRMLScene())
    logic.refresh_models(PanelSettings())
    logic.refresh_device_info()
    view = logic.view
    models = _find(widget, "modelComboBox")
    for entry in view.models:
        models.addItem(entry.label)
    models.setCurrentIndex(view.model_index)
    _find(widget, "modelDescriptionLabel").setText(view.model_description)
    _find(widget, "deviceInfoLabel").setText(view.device_info)
    _find(widget, "inputVolumeSelector").addItem("sample_ct")
    _find(widget, "outputSegmentationSelector").addItem("Create new segmentation on Segment")
    for name in ("additionalVolumeSelector", "additionalVolumeLabel"):
        _find(widget, name).setVisible(view.second_channel_visible)
    _find(widget, "datasetPathLineEdit").setPlaceholderText("/data/site-B-corrections")


def fill_training(widget: QtWidgets.QWidget) -> None:
    """The DeepSegTraining panel as its logic shows it on first open."""
    import slicer

    from DeepSegTrainingLib.training_panel_logic import TrainingPanelLogic, TrainingSettings

    logic = TrainingPanelLogic(slicer.vtkMRMLScene())
    logic.refresh_models(TrainingSettings())
    base = _find(widget, "baseModelComboBox")
    for label, _ in logic.view.base_models:
        base.addItem(label)
    base.setCurrentIndex(logic.view.base_index)
    _find(widget, "datasetInfoLabel").setText(logic.view.dataset_info)
    _find(widget, "datasetPathLineEdit").setPlaceholderText("/data/site-B-corrections")


FILLERS = {"DeepSeg": fill_deepseg, "DeepSegTraining": fill_training}
PARAMETER_NODES = {"DeepSeg": "DeepSegParameterNode", "DeepSegTraining": "DeepSegTrainingParameterNode"}


def show_parameter_defaults(module: str, widget: QtWidgets.QWidget) -> None:
    """Put each bound widget in the state ``connectGui`` gives it: its parameter's default value."""
    from slicer_rules import bound_widgets, parameter_node_fields

    fields = parameter_node_fields(REPO / module / f"{module}.py", PARAMETER_NODES[module])
    for bound in bound_widgets(REPO / module / "Resources" / "UI" / f"{module}.ui"):
        default = fields[bound.parameter].default
        child = _find(widget, bound.name)
        if isinstance(child, QtWidgets.QCheckBox):
            child.setChecked(bool(default))
        elif isinstance(child, QtWidgets.QComboBox) and default is not None and not isinstance(child, qMRMLNodeComboBox):
            child.setCurrentText(str(default))
        elif isinstance(child, (QtWidgets.QSpinBox, QtWidgets.QDoubleSpinBox)):
            child.setValue(default)
        elif isinstance(child, QtWidgets.QLineEdit) and isinstance(default, str) and default != "Path()":
            child.setText(default)


def render(module: str) -> tuple[QtWidgets.QWidget, QtGui.QImage]:
    """The filled panel and its rendering (width :data:`PANEL_WIDTH`, height as the layout needs)."""
    widget = load_panel(module)
    show_parameter_defaults(module, widget)
    FILLERS[module](widget)
    widget.resize(PANEL_WIDTH, widget.sizeHint().height())
    widget.adjustSize()
    widget.resize(PANEL_WIDTH, widget.height())
    return widget, widget.grab().toImage()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=REPO / "Resources" / "Screenshots")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    for module in FILLERS:
        _, image = render(module)
        path = args.output / f"{module}Panel.png"
        if not image.save(str(path)):
            raise RuntimeError(f"could not write {path}")
        print(f"{path} ({image.width()} x {image.height()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
