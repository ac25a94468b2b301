"""Every Slicer rule the modules depend on, checked against Slicer's own behaviour (Slicer v5.10.0).

- effect loading: the effect file is loaded as Slicer loads it, then every DeepSeg module imports;
- parameter nodes: every bound widget satisfies the GUI connector rules (``guiConnectors.py``);
- the panels' Qt-free settings classes have exactly the parameter nodes' fields;
- supported versions: the module files parse on Python 3.9 (Slicer 5.8) and say why they cannot run;
- extension metadata: minimum Slicer version, screenshots that exist, the catalog entry.

See ``slicer_rules.py`` for the rules and the Slicer source lines they come from.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from slicer_rules import connector_problems, parameter_node_fields

from DeepSegLib.panel_logic import DEVICE_CHOICES, PanelSettings

REPO = Path(__file__).resolve().parents[2]
PROBES = REPO / "Testing" / "probes"
PANELS = {
    "DeepSeg": ("DeepSegParameterNode", "DeepSegLib.panel_logic", "PanelSettings"),
    "DeepSegTraining": ("DeepSegTrainingParameterNode", "DeepSegTrainingLib.training_panel_logic", "TrainingSettings"),
}


def load_effect(effect_file: Path, *roots: Path) -> dict:
    probe = PROBES / "load_effect_like_slicer.py"
    result = subprocess.run(
        [sys.executable, str(probe), str(effect_file), *map(str, roots)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_the_effect_loads_as_slicer_loads_it_and_every_deepseg_module_still_imports():
    effect = REPO / "DeepSeg" / "SegmentEditorDeepSegLib" / "SegmentEditorEffect.py"
    report = load_effect(effect, REPO / "DeepSeg", REPO / "DeepSegTraining")
    assert report["module_name"] == "SegmentEditorDeepSegLib" and report["class_found"]
    assert report["effect_name"] == "DeepSeg"
    assert report["errors"] == {}
    assert {"DeepSegLib.panel_logic", "DeepSegLib.effect_logic", "DeepSegLib.segment_job"} <= set(report["imported"])


def test_an_effect_inside_deepseglib_would_break_the_package_as_it_did_before(tmp_path):
    """The old layout, loaded the same way: Slicer replaces the DeepSegLib package by the effect module."""
    modules = tmp_path / "DeepSeg"
    shutil.copytree(REPO / "DeepSeg" / "DeepSegLib", modules / "DeepSegLib")
    shutil.copy(REPO / "DeepSeg" / "SegmentEditorDeepSegLib" / "SegmentEditorEffect.py", modules / "DeepSegLib")
    report = load_effect(modules / "DeepSegLib" / "SegmentEditorEffect.py", modules, REPO / "DeepSeg", REPO / "DeepSegTraining")
    assert report["module_name"] == "DeepSegLib"
    assert "is not a package" in report["errors"].get("DeepSegLib", "") or any(
        "is not a package" in e for e in report["errors"].values()
    )


def test_the_module_registers_the_effect_from_its_own_folder():
    text = (REPO / "DeepSeg" / "DeepSeg.py").read_text(encoding="utf-8")
    assert '"SegmentEditorDeepSegLib", "SegmentEditorEffect.py"' in text
    assert 'slicer.app.connect("startupCompleted()", registerSegmentEditorEffect)' in text
    init = (REPO / "DeepSeg" / "SegmentEditorDeepSegLib" / "__init__.py").read_text(encoding="utf-8")
    assert "from .SegmentEditorEffect import *" in init  # Slicer's effect template (SegmentEditorTemplateKeyLib)
    assert sorted(p.name for p in (REPO / "DeepSeg" / "SegmentEditorDeepSegLib").glob("*.py")) == [
        "SegmentEditorEffect.py",
        "__init__.py",
    ], "Slicer replaces this package by the effect module: nothing else may live there"


@pytest.mark.parametrize("module", PANELS)
def test_every_bound_widget_satisfies_slicers_gui_connector_rules(module):
    fields = parameter_node_fields(REPO / module / f"{module}.py", PANELS[module][0])
    assert connector_problems(REPO / module / "Resources" / "UI" / f"{module}.ui", fields) == []


def test_the_rules_catch_a_plain_str_bound_to_a_combo_box(tmp_path):
    """The fault this check exists for: ``device: str`` on a QComboBox aborts setup() in Slicer."""
    module = tmp_path / "Panel.py"
    module.write_text(
        "@parameterNodeWrapper\nclass P:\n    device: str = 'auto'\n    overlap: float = 0.5\n    folder: str = ''\n",
        encoding="utf-8",
    )
    ui = tmp_path / "Panel.ui"
    ui.write_text(
        '<ui><widget class="QWidget" name="w">'
        '<widget class="QComboBox" name="d"><property name="SlicerParameterName"><string>device</string></property></widget>'
        '<widget class="QSlider" name="o"><property name="SlicerParameterName"><string>overlap</string></property></widget>'
        '<widget class="ctkPathLineEdit" name="f">'
        '<property name="SlicerParameterName"><string>folder</string></property></widget>'
        '<widget class="QLineEdit" name="x"><property name="SlicerParameterName"><string>typo</string></property></widget>'
        "</widget></ui>",
        encoding="utf-8",
    )
    problems = "\n".join(connector_problems(ui, parameter_node_fields(module, "P")))
    assert "QComboBox 'd' bound to 'device'" in problems and "requires the Choice annotation" in problems
    assert "QSlider 'o' bound to 'overlap'" in problems and "does not accept a float" in problems
    assert "ctkPathLineEdit 'f' bound to 'folder'" in problems and "does not accept a str" in problems
    assert "bound to 'typo': no such parameter" in problems


@pytest.mark.parametrize("module", PANELS)
def test_the_panel_logic_settings_have_exactly_the_parameter_nodes_fields(module):
    import importlib

    class_name, logic_module, settings_name = PANELS[module]
    fields = parameter_node_fields(REPO / module / f"{module}.py", class_name)
    settings = getattr(importlib.import_module(logic_module), settings_name)
    instance = settings()
    declared = {f.name: f for f in dataclasses.fields(settings)}
    assert list(declared) == list(fields)
    for name, field in fields.items():
        default = getattr(instance, name)
        if field.base_type == "node":
            assert default is None, name
        elif field.base_type == "pathlib.Path":
            assert default == Path(), name
        else:
            assert default == field.default and type(default).__name__ == field.base_type, name


def test_the_device_choices_of_the_panel_logic_are_the_parameter_nodes():
    fields = parameter_node_fields(REPO / "DeepSeg" / "DeepSeg.py", "DeepSegParameterNode")
    assert fields["device"].choices == DEVICE_CHOICES
    assert PanelSettings().device in DEVICE_CHOICES


def _python39() -> str | None:
    found = shutil.which("python3.9")
    if found is None:
        return None
    probe = subprocess.run([found, "--version"], capture_output=True, text=True, env={**os.environ, "PYENV_VERSION": "3.9.18"})
    return found if probe.returncode == 0 and "3.9" in probe.stdout + probe.stderr else None


def test_an_older_slicer_gets_one_clear_message_not_a_traceback():
    """Slicer 5.8 ships Python 3.9: the module files must parse there, and the gate must explain."""
    python39 = _python39()
    if python39 is None:
        if os.environ.get("DEEPSEG_REQUIRE_PY39") == "1":
            pytest.fail("Python 3.9 (Slicer 5.8's Python) is needed for this check and was not found")
        pytest.skip("no Python 3.9 on this machine")
    files = [
        REPO / "DeepSeg" / "DeepSeg.py",
        REPO / "DeepSegTraining" / "DeepSegTraining.py",
        REPO / "DeepSeg" / "DeepSegLib" / "__init__.py",
        REPO / "DeepSeg" / "DeepSegLib" / "compatibility.py",
    ]
    code = (
        "import ast, sys\n"
        f"for path in {[str(f) for f in files]!r}:\n"
        "    ast.parse(open(path, encoding='utf-8').read(), path)\n"
        f"sys.path.insert(0, {str(REPO / 'DeepSeg')!r})\n"
        "from DeepSegLib.compatibility import unsupported_reason\n"
        "print(unsupported_reason(sys.version_info[:2], (5, 8)))\n"
        "print(unsupported_reason((3, 12), (5, 10)))\n"
    )
    env = {**os.environ, "PYENV_VERSION": "3.9.18"}
    result = subprocess.run([python39, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    message, supported = result.stdout.strip().splitlines()
    assert message.startswith("DeepSeg needs 3D Slicer 5.10 or later (Python 3.12); this is Slicer 5.8")
    assert "its Python is 3.9" in message and "download.slicer.org" in message
    assert supported == "None"


def test_extension_metadata_states_the_minimum_slicer_and_points_to_real_screenshots():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    assert "find_package(Slicer 5.10 REQUIRED)" in text
    urls = text.split("set(EXTENSION_SCREENSHOTURLS", 1)[1].split(")", 1)[0].split('"')[1].split()
    assert len(urls) == 2
    prefix = "https://raw.githubusercontent.com/deepseg-slicer/SlicerDeepSeg/main/"
    for url in urls:
        assert url.startswith(prefix) and (REPO / url[len(prefix) :]).is_file(), url
    entry = json.loads((REPO / "Resources" / "ExtensionsIndex" / "DeepSeg.json").read_text(encoding="utf-8"))
    # Slicer's catalog schema (Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json): these keys only.
    assert set(entry) <= {
        "$schema",
        "category",
        "scm_url",
        "scm_revision",
        "scm_type",
        "build_dependencies",
        "build_subdirectory",
        "enabled",
        "tier",
    }
    assert {"$schema", "category", "scm_url"} <= set(entry) and entry["category"] == "Segmentation"
