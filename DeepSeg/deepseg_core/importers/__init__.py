"""Bring trained models into the store: DeepSeg model folders, nnU-Net v2 results, MONAI bundles.

:func:`import_model` recognises the folder's format (:func:`detect_format`) and turns it into an
ordinary, immutable DeepSeg model version (``model.json`` + ``weights.safetensors``); after import
nothing but the card's ``source`` section says where it came from. Format importers are imported on
first use (they need torch; the nnU-Net one never imports ``nnunetv2``, the MONAI one needs
``monai``).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from ..model_card import ModelCard, ModelError
from ..model_catalog import CARD_FILE, WEIGHTS_FILE

#: format -> "module:function" taking ``(folder, store, name=..., activate=..., **options)``.
IMPORTERS: dict[str, str] = {
    "deepseg": "deepseg_core.importers:import_deepseg_folder",
    "nnunetv2": "deepseg_core.importers.nnunet:import_nnunet",
    "monai_bundle": "deepseg_core.importers.monai_bundle:import_bundle",
}
FORMAT_DESCRIPTIONS = {
    "deepseg": f"a DeepSeg model folder ({CARD_FILE} + {WEIGHTS_FILE})",
    "nnunetv2": "an nnU-Net v2 trained model folder (dataset.json, plans.json, fold_*/checkpoint_final.pth)",
    "monai_bundle": "a MONAI bundle (configs/metadata.json, configs/inference.json or .yaml, models/model.pt)",
}


def detect_format(folder: str | Path) -> str:
    """``deepseg``, ``nnunetv2`` or ``monai_bundle``; a clear :class:`ModelError` for anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError("model folder not found", subject=folder, hint="Give the folder that holds the trained model.")
    if (folder / CARD_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
        return "deepseg"
    if (folder / "plans.json").is_file() and (folder / "dataset.json").is_file():
        return "nnunetv2"
    configs = folder / "configs"
    if (configs / "metadata.json").is_file() and any((configs / f"inference.{e}").is_file() for e in ("json", "yaml", "yml")):
        return "monai_bundle"
    trainer_folders = sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / "plans.json").is_file())
    hint = "Give the folder itself, not its parent or a file inside it."
    if trainer_folders:
        example = folder / trainer_folders[0]
        hint = f"This looks like an nnU-Net dataset folder: give one of its trained model folders, e.g. {example}"
    raise ModelError(
        "not a model folder DeepSeg can import",
        subject=folder,
        expected="; or ".join(FORMAT_DESCRIPTIONS.values()),
        found=", ".join(sorted(p.name for p in folder.iterdir())[:8]) or "an empty folder",
        hint=hint,
    )


def import_deepseg_folder(folder: Path, store: Any, name: str | None = None, activate: bool = True, **options: Any) -> ModelCard:
    """A DeepSeg model folder, copied into the store under its own name and version."""
    if name is not None or options:
        raise ModelError("a DeepSeg model folder is imported as it is", found=f"options {sorted(options) or ['--name']}")
    return store.import_folder(folder, activate=activate)


def import_model(folder: str | Path, store: Any, *, name: str | None = None, activate: bool = True, **options: Any) -> ModelCard:
    """Import the model folder (any supported format) into ``store`` as a new version; returns its card.

    Args:
        folder: the trained model's folder.
        store: a :class:`~deepseg_core.model_store.ModelStore`.
        name: the model's name in the store (default: from the source, e.g. nnU-Net's dataset name).
        activate: make the imported version active.
        options: format options (nnU-Net: ``folds``, ``configuration``, ``checkpoint``, ``reorient``).
    """
    fmt = detect_format(folder)
    module_name, function_name = IMPORTERS[fmt].split(":")
    importer = getattr(importlib.import_module(module_name), function_name)
    return importer(Path(folder), store, name=name, activate=activate, **options)
