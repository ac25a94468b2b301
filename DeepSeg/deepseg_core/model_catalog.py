"""The model store's layout and the list of available models, read as plain JSON.

This is what the Slicer panels and the Segment Editor effect use to list models and show their
labels *before* anything is installed: only the standard library, no torch, no jsonschema, no
safetensors (a fresh Slicer has none of them). :mod:`.model_store` builds on the same layout
functions and adds validation, checksums, weights and changes.

Store layout (default ``~/.deepseg/models``, or ``$DEEPSEG_MODELS``, or ``--models-dir``)::

    <root>/<name>/<version>/model.json
    <root>/<name>/<version>/weights.safetensors
    <root>/<name>/state.json          {"active": 3, "history": [1, 2, 3]}

Bundled models (shipped inside the package) are listed when the store holds no model of that
name yet; once a bundled model is imported or fine-tuned, its store copy replaces the entry.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CARD_FILE = "model.json"
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.json"
ENV_MODELS_DIR = "DEEPSEG_MODELS"
#: Models shipped inside the package; found by name when the store does not hold that name.
BUNDLED_MODELS = Path(__file__).with_name("bundled") / "models"


class CatalogError(ValueError):
    """A model folder's ``model.json`` cannot be read as a card (missing, not JSON, fields missing)."""


def store_root(root: str | Path | None = None) -> Path:
    """The store folder: ``root``, else ``$DEEPSEG_MODELS``, else ``~/.deepseg/models``."""
    return Path(root or os.environ.get(ENV_MODELS_DIR) or Path.home() / ".deepseg" / "models").expanduser()


def store_names(root: Path) -> list[str]:
    """Model names in the store at ``root`` (folders not starting with a dot), sorted."""
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def store_versions(root: Path, name: str) -> list[int]:
    """Stored versions of ``name``, ascending."""
    folder = root / name
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def store_state(root: Path, name: str) -> dict[str, Any]:
    """``{"active": version or None, "history": [...]}``; without ``state.json`` the newest version is active."""
    path = root / name / STATE_FILE
    if not path.exists():
        versions = store_versions(root, name)
        return {"active": versions[-1] if versions else None, "history": versions[-1:]}
    return json.loads(path.read_text(encoding="utf-8"))


def bundled_model_folders() -> dict[str, Path]:
    """Name -> folder of the models shipped with DeepSeg."""
    if not BUNDLED_MODELS.is_dir():
        return {}
    return {p.name: p for p in sorted(BUNDLED_MODELS.iterdir()) if (p / CARD_FILE).exists()}


@dataclass(frozen=True)
class CatalogLabel:
    """One output label as the card lists it: voxel value, name, RGB colour in [0, 1]."""

    value: int
    name: str
    color: tuple[float, float, float]


@dataclass(frozen=True)
class CatalogEntry:
    """One model version the user can choose.

    Attributes:
        ref: what ``--model`` takes (``NAME:VERSION`` for the store, the folder for a bundled model).
        name: model name.
        version: version number.
        folder: the model folder.
        active: the version ``NAME`` resolves to.
        bundled: shipped inside the package (not in the store).
        modality: ``CT`` or ``MR`` (or what the card says).
        channels: input channel names, in network input order.
        labels: output labels.
        description: the card's description.
        validation_dice: label name -> Dice on the fixed validation split, when the card has it.
        source: where an imported model came from (``nnunetv2``, ``monai_bundle``, ...) or "".
    """

    ref: str
    name: str
    version: int
    folder: Path
    active: bool
    bundled: bool
    modality: str
    channels: tuple[str, ...]
    labels: tuple[CatalogLabel, ...]
    description: str
    validation_dice: dict[str, float]
    source: str = ""


def read_card_json(folder: Path) -> dict[str, Any]:
    """``folder/model.json`` as a dict, checked for the fields the catalog needs (no schema validation)."""
    path = Path(folder) / CARD_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CatalogError(f"{path}: model card not found (a model folder holds {CARD_FILE} and {WEIGHTS_FILE})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CatalogError(f"{path}: model card cannot be read as JSON ({exc})") from None
    missing = [key for key in ("name", "version", "inputs", "labels") if key not in data]
    if not isinstance(data, dict) or missing:
        raise CatalogError(f"{path}: model card lacks the field(s) {missing}; re-import the model")
    return data


def _validation_dice(metrics: Any) -> dict[str, float]:
    validation = metrics.get("validation", {}) if isinstance(metrics, dict) else {}
    dice = validation.get("dice", {}) if isinstance(validation, dict) else {}
    return {str(k): float(v) for k, v in dice.items() if isinstance(v, (int, float))} if isinstance(dice, dict) else {}


def entry_from_card(data: dict[str, Any], folder: Path, ref: str, active: bool, bundled: bool) -> CatalogEntry:
    """A :class:`CatalogEntry` from a card dict (as read by :func:`read_card_json`)."""
    inputs = data.get("inputs") or {}
    labels = tuple(
        CatalogLabel(int(label["value"]), str(label["name"]), tuple(float(c) for c in label.get("color", (0.5, 0.5, 0.5))))
        for label in data["labels"]
    )
    source = data.get("source") or {}
    return CatalogEntry(
        ref=ref,
        name=str(data["name"]),
        version=int(data["version"]),
        folder=folder,
        active=active,
        bundled=bundled,
        modality=str(inputs.get("modality", "")),
        channels=tuple(str(c) for c in inputs.get("channels", ())),
        labels=labels,
        description=str(data.get("description", "")),
        validation_dice=_validation_dice(data.get("metrics")),
        source=str(source.get("format", "")) if isinstance(source, dict) else "",
    )


def list_models(root: str | Path | None = None) -> tuple[list[CatalogEntry], list[str]]:
    """Every version in the store (per name: active first, then newest first) and every bundled model
    whose name the store does not hold.

    Returns:
        ``(entries, problems)``: a folder whose card cannot be read is left out and described in
        ``problems`` (one sentence each) instead of hiding every other model.
    """
    folder_root = store_root(root)
    entries: list[CatalogEntry] = []
    problems: list[str] = []
    names = store_names(folder_root)
    for name in names:
        active = store_state(folder_root, name).get("active")
        for version in sorted(store_versions(folder_root, name), key=lambda v: (v != active, -v)):
            folder = folder_root / name / str(version)
            try:
                entries.append(entry_from_card(read_card_json(folder), folder, f"{name}:{version}", version == active, False))
            except (CatalogError, KeyError, TypeError, ValueError) as exc:
                problems.append(str(exc))
    for name, folder in bundled_model_folders().items():
        if name in names:
            continue
        try:
            entries.append(entry_from_card(read_card_json(folder), folder, str(folder), True, True))
        except (CatalogError, KeyError, TypeError, ValueError) as exc:
            problems.append(str(exc))
    return entries, problems
