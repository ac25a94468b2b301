"""Run the panels' logic as a fresh Slicer would, before the user agreed to install anything.

A fresh Slicer bundles numpy, scipy, SimpleITK and VTK but not torch, jsonschema, safetensors or
slicerio; this probe makes those unimportable (a meta-path finder that refuses them), imports every
DeepSeg Slicer-side module, opens the three panels' logic on a real MRML scene and prints, as one
JSON line, what a user would see. Usage: ``python fresh_slicer_panels.py REPO MODELS_DIR``.
"""

import importlib
import importlib.abc
import json
import pkgutil
import sys
from pathlib import Path

NOT_IN_A_FRESH_SLICER = {"torch", "jsonschema", "safetensors", "slicerio"}


class NotInstalled(importlib.abc.MetaPathFinder):
    """Refuses the packages a fresh Slicer does not have, as if they were not installed."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in NOT_IN_A_FRESH_SLICER:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed in a fresh Slicer)", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
repo, models_dir = Path(sys.argv[1]), sys.argv[2]
sys.path[:0] = [str(repo / "DeepSeg"), str(repo / "DeepSegTraining")]

import slicer  # noqa: E402

imported = []
for package in ("DeepSegLib", "DeepSegTrainingLib"):
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__):
        imported.append(importlib.import_module(f"{package}.{info.name}").__name__)

from DeepSegLib.effect_logic import DeepSegEffectLogic  # noqa: E402
from DeepSegLib.panel_logic import DeepSegPanelLogic, PanelError, PanelSettings  # noqa: E402
from DeepSegTrainingLib.training_panel_logic import TrainingPanelLogic, TrainingSettings  # noqa: E402

scene = slicer.vtkMRMLScene()
panel = DeepSegPanelLogic(scene, models_dir=models_dir)
settings = PanelSettings()
panel.refresh_models(settings)
panel.refresh_device_info()
offer = panel.install_offer()
settings.inputVolume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
try:
    panel.start_segment(settings)
    refusal = ""
except PanelError as exc:
    refusal = str(exc)
training = TrainingPanelLogic(scene, models_dir=models_dir)
training_settings = TrainingSettings()
training.refresh_models(training_settings)
effect = DeepSegEffectLogic(models_dir=models_dir)
effect.refresh_models()
print(
    json.dumps(
        {
            "imported": imported,
            "models": [entry.label for entry in panel.view.models],
            "model_saved": settings.model,
            "description": panel.view.model_description,
            "device_info": panel.view.device_info,
            "offer_missing": list(offer.missing) if offer else [],
            "offer_message": offer.message() if offer else "",
            "refusal": refusal,
            "job_started": panel.job is not None,
            "training_base_models": [label for label, _ in training.view.base_models],
            "training_base_saved": training_settings.baseModel,
            "effect_labels": list(effect.view.label_names),
            "loaded": sorted(m for m in sys.modules if m.split(".")[0] in NOT_IN_A_FRESH_SLICER),
        }
    )
)
