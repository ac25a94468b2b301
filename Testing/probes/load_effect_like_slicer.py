"""Load a Segment Editor effect file exactly as Slicer 5.10 does, then import every DeepSeg module.

Slicer (v5.10.0, ``qSlicerSegmentEditorScriptedEffect::setPythonSource``, lines 146-187, and
``qSlicerScriptedUtils::loadSourceAsModule``, lines 37-62): the module name is the effect file's
*parent folder*, the class name its base name (+ "Effect" unless it ends so); when
``sys.modules[module]`` already has that class it is reused, otherwise the file is executed as a new
module that is first inserted into ``sys.modules`` under the folder's name (replacing what was
there). Slicer's own ``DeepSeg.py`` imports ``DeepSegLib.compatibility`` before the effect is
registered, so this probe does too.

The Slicer GUI application's Python modules cannot exist here; ``qt`` and
``SegmentEditorEffects.AbstractScriptedSegmentEditorEffect`` are replaced by the two small named
stand-ins below (the effect file only needs them to exist at import). Everything else is real.

Usage: ``python load_effect_like_slicer.py EFFECT_FILE MODULE_ROOT...``; prints one JSON line.
"""

import importlib
import importlib.util
import json
import pkgutil
import sys
import types
from pathlib import Path

effect_file = Path(sys.argv[1])
sys.path[:0] = sys.argv[2:]

# --- stand-ins for the Slicer desktop application's modules (not installable here) -------------
qt_standin = types.ModuleType("qt")
qt_standin.__doc__ = "stand-in for Slicer's PythonQt 'qt' module"
sys.modules["qt"] = qt_standin
editor_effects = types.ModuleType("SegmentEditorEffects")
abstract_module = types.ModuleType("SegmentEditorEffects.AbstractScriptedSegmentEditorEffect")


class AbstractScriptedSegmentEditorEffect:
    """Stand-in for Slicer's base class (AbstractScriptedSegmentEditorEffect.py 49-50)."""

    def __init__(self, scriptedEffect):
        self.scriptedEffect = scriptedEffect


abstract_module.AbstractScriptedSegmentEditorEffect = AbstractScriptedSegmentEditorEffect
editor_effects.AbstractScriptedSegmentEditorEffect = abstract_module
sys.modules["SegmentEditorEffects"] = editor_effects
sys.modules["SegmentEditorEffects.AbstractScriptedSegmentEditorEffect"] = abstract_module

# --- what DeepSeg.py does before startupCompleted ------------------------------------------------
importlib.import_module("DeepSegLib.compatibility")

# --- setPythonSource ---------------------------------------------------------------------------
module_name = effect_file.parent.name
class_name = effect_file.name.split(".")[0]
class_name = class_name if class_name.endswith("Effect") else class_name + "Effect"
effect_class = getattr(sys.modules.get(module_name), class_name, None)
if not isinstance(effect_class, type):
    spec = importlib.util.spec_from_file_location(module_name, str(effect_file))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    effect_class = getattr(sys.modules[module_name], class_name, None)
report = {"module_name": module_name, "class_found": isinstance(effect_class, type)}
if report["class_found"]:
    scripted_effect = types.SimpleNamespace(name="", perSegment=False, requireSegments=False)
    effect_class(scripted_effect)
    report["effect_name"] = scripted_effect.name

# --- then every DeepSeg module must still import ---------------------------------------------------
imported, errors = [], {}
for package in ("DeepSegLib", "DeepSegTrainingLib"):
    try:
        root = importlib.import_module(package)
        names = [f"{package}.{info.name}" for info in pkgutil.iter_modules(root.__path__)]
    except Exception as exc:  # report, do not stop: the point is to see what breaks
        errors[package] = f"{type(exc).__name__}: {exc}"
        continue
    for name in names:
        try:
            importlib.import_module(name)
            imported.append(name)
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
report.update(imported=imported, errors=errors)
print(json.dumps(report))
