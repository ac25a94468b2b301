"""Slicer's rules that DeepSeg's modules depend on, as data the contract tests check against.

Each rule names the Slicer source it was verified against: Slicer/Slicer tag v5.10.0 (commit
a2b6d082be04274a849884fbb1e85634a9df90fb); lines are at that tag.
"""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

SLICER_TAG = "v5.10.0"

#: Base/Python/slicer/parameterNodeWrapper/guiConnectors.py: each connector's ``canRepresent`` compares
#: ``type(widget)`` exactly (no subclasses) and the unannotated Python type. Widget class -> the
#: types it accepts, and the connector (line) that decides it.
GUI_CONNECTORS: dict[str, tuple[frozenset[str], str]] = {
    "QCheckBox": (frozenset({"bool"}), "QCheckBoxToBoolConnector (161-191)"),
    "ctkCheckBox": (frozenset({"bool"}), "QCheckBoxToBoolConnector (161-191)"),
    "QPushButton": (frozenset({"bool"}), "QCheckablePushButtonToBoolConnector (194-227)"),
    "QSpinBox": (frozenset({"int"}), "QSliderOrSpinBoxToIntConnector (275-336)"),
    "QSlider": (frozenset({"int"}), "QSliderOrSpinBoxToIntConnector (275-336), bounded only"),
    "QDoubleSpinBox": (frozenset({"float", "int"}), "QDoubleSpinBoxCtkSliderWidgetToFloatIntConnector (339-414)"),
    "ctkDoubleSpinBox": (frozenset({"float", "int"}), "QDoubleSpinBoxCtkSliderWidgetToFloatIntConnector (339-414)"),
    "ctkSliderWidget": (frozenset({"float", "int"}), "QDoubleSpinBoxCtkSliderWidgetToFloatIntConnector (339-414), bounded only"),
    "QComboBox": (frozenset({"str", "int", "float", "bool"}), "QComboBoxToStringableConnector (417-462), needs Choice"),
    "ctkComboBox": (frozenset({"str", "int", "float", "bool"}), "QComboBoxToStringableConnector (417-462), needs Choice"),
    "QLineEdit": (frozenset({"str"}), "QLineEditToStrConnector (514-548)"),
    "QLabel": (frozenset({"str"}), "QLabelToStrConnector (550-581)"),
    "ctkPathLineEdit": (frozenset({"pathlib.Path"}), "ctkPathLineEditToPathConnector (672-705)"),
    "ctkDirectoryButton": (frozenset({"pathlib.Path"}), "ctkDirectoryButtonToPathConnector (708-741)"),
    "qMRMLNodeComboBox": (frozenset({"node"}), "qMRMLNodeComboBoxToNodeConnector (744-774)"),
}
#: widgets whose connector refuses an unbounded number (RuntimeError "... is unbounded").
NEEDS_BOUNDS = {"QSlider", "ctkSliderWidget"}
#: widgets whose connector raises "ComboBoxToStringableConnector requires the Choice annotation".
NEEDS_CHOICE = {"QComboBox", "ctkComboBox"}
#: wrapper.py 331-354: names a parameterNodeWrapper field may not have.
RESERVED_FIELD_NAMES = {
    "allParameters",
    "default",
    "isCached",
    "dataType",
    "getValue",
    "setValue",
    "connectGui",
    "connectParametersToGui",
    "disconnectGui",
    "StartModify",
    "EndModify",
    "AddObserver",
    "RemoveObserver",
    "Modified",
    "parameterNode",
}


@dataclass(frozen=True)
class Field:
    """One ``@parameterNodeWrapper`` field as written in the module file."""

    name: str
    base_type: str  # "str", "int", "float", "bool", "pathlib.Path" or "node"
    choices: tuple | None
    within_range: tuple[float, float] | None
    default: object


def _base_type(node: ast.expr) -> str:
    text = ast.unparse(node)
    if text.startswith("slicer.vtkMRML"):
        return "node"
    return {"Path": "pathlib.Path"}.get(text, text)


def parameter_node_fields(module_file: Path, class_name: str) -> dict[str, Field]:
    """The fields of ``class_name`` (a ``@parameterNodeWrapper`` class) in ``module_file``, by AST."""
    tree = ast.parse(module_file.read_text(encoding="utf-8"))
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == class_name)
    decorators = {ast.unparse(d) for d in cls.decorator_list}
    if "parameterNodeWrapper" not in decorators:
        raise AssertionError(f"{class_name} is not decorated with @parameterNodeWrapper")
    fields = {}
    for statement in cls.body:
        if not isinstance(statement, ast.AnnAssign):
            continue
        annotation = statement.annotation
        choices = within = None
        if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Annotated":
            parts = annotation.slice.elts  # type: ignore[attr-defined]
            base = _base_type(parts[0])
            for extra in parts[1:]:
                name = ast.unparse(extra.func) if isinstance(extra, ast.Call) else ""
                if name == "Choice":
                    choices = tuple(ast.literal_eval(extra.args[0]))
                elif name == "WithinRange":
                    within = (ast.literal_eval(extra.args[0]), ast.literal_eval(extra.args[1]))
        else:
            base = _base_type(annotation)
        default = None
        if statement.value is not None:
            text = ast.unparse(statement.value)
            default = "Path()" if text in ("pathlib.Path()", "Path()") else ast.literal_eval(statement.value)
        fields[statement.target.id] = Field(statement.target.id, base, choices, within, default)  # type: ignore[attr-defined]
    return fields


@dataclass(frozen=True)
class BoundWidget:
    """A widget of a ``.ui`` file with a ``SlicerParameterName`` dynamic property."""

    name: str
    widget_class: str
    parameter: str
    items: tuple[str, ...]
    minimum: float | None
    maximum: float | None


def bound_widgets(ui_file: Path) -> list[BoundWidget]:
    """Every widget bound to a parameter (wrapper.py 241-253 reads the ``SlicerParameterName`` property)."""
    root = ElementTree.parse(ui_file).getroot()
    found = []
    for widget in root.iter("widget"):
        props = {p.get("name"): p for p in widget.findall("property")}
        if "SlicerParameterName" not in props:
            continue
        items = tuple(item.findtext("property/string") or "" for item in widget.findall("item"))

        def number(key: str, props: dict = props) -> float | None:
            prop = props.get(key)
            if prop is None:
                return None
            return float(prop.findtext("number") or prop.findtext("double"))

        found.append(
            BoundWidget(
                widget.get("name"),
                widget.get("class"),
                props["SlicerParameterName"].findtext("string"),
                items,
                number("minimum"),
                number("maximum"),
            )
        )
    return found


def connector_problems(ui_file: Path, fields: dict[str, Field]) -> list[str]:
    """What Slicer's ``connectGui`` would refuse (an exception in the panel's ``setup``), in words."""
    problems = []
    for name in fields:
        if name in RESERVED_FIELD_NAMES:
            problems.append(f"field {name!r} uses a name reserved by parameterNodeWrapper (wrapper.py 331-354)")
    for field in fields.values():
        if field.choices is not None and field.default is not None and field.default not in field.choices:
            problems.append(f"field {field.name!r}: default {field.default!r} is not one of its choices {field.choices}")
    for widget in bound_widgets(ui_file):
        where = f"{ui_file.name}: {widget.widget_class} {widget.name!r} bound to {widget.parameter!r}"
        field = fields.get(widget.parameter)
        if field is None:
            problems.append(f"{where}: no such parameter (wrapper.py 146-159 raises ValueError)")
            continue
        rule = GUI_CONNECTORS.get(widget.widget_class)
        if rule is None:
            problems.append(f"{where}: no GUI connector exists for this widget class (guiConnectors.py 126-147)")
            continue
        accepted, connector = rule
        if field.base_type not in accepted:
            problems.append(f"{where}: {connector} does not accept a {field.base_type} parameter")
            continue
        if widget.widget_class in NEEDS_CHOICE and field.choices is None:
            problems.append(f"{where}: {connector}: RuntimeError 'requires the Choice annotation' (a plain str is refused)")
        if widget.widget_class in NEEDS_CHOICE and field.choices is not None and widget.items:
            if tuple(str(c) for c in field.choices) != widget.items:
                problems.append(f"{where}: the .ui items {widget.items} differ from the choices {field.choices}")
        if widget.widget_class in NEEDS_BOUNDS and field.within_range is None:
            problems.append(f"{where}: {connector}: RuntimeError for an unbounded number (needs WithinRange)")
        if field.within_range is not None and widget.minimum is not None and widget.minimum != field.within_range[0]:
            problems.append(f"{where}: .ui minimum {widget.minimum} differs from WithinRange {field.within_range}")
        if field.within_range is not None and widget.maximum is not None and widget.maximum != field.within_range[1]:
            problems.append(f"{where}: .ui maximum {widget.maximum} differs from WithinRange {field.within_range}")
    return problems
