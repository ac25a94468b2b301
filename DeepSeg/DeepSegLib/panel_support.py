"""Plain-Python helpers of the DeepSeg panel: the model list, event text, and first-use dependencies.

Nothing here imports Slicer or Qt, so it is tested as is.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from deepseg_core.model_card import ModelCard

#: import name -> pip requirement the DeepSeg engine needs inside Slicer's Python.
REQUIRED_PACKAGES = {
    "torch": "torch",
    "SimpleITK": "SimpleITK",
    "safetensors": "safetensors",
    "slicerio": "slicerio",
    "jsonschema": "jsonschema",
    "scipy": "scipy",
}
#: CUDA builds of torch, newest first (PyTorch's wheel index names them cuXYZ).
TORCH_CUDA_INDEX = "https://download.pytorch.org/whl/{tag}"


@dataclass(frozen=True)
class ModelEntry:
    """One choice of the panel's model selector.

    Attributes:
        ref: what ``--model`` takes (``NAME:VERSION`` or a bundled model's folder).
        label: the text shown in the selector.
        description: tooltip: labels, modality, channels, description, validation Dice.
        channels: input channel names (more than one: the panel shows extra volume selectors).
    """

    ref: str
    label: str
    description: str
    channels: tuple[str, ...]


def _describe(card: ModelCard) -> str:
    labels = ", ".join(f"{label.value}={label.name}" for label in card.labels)
    text = f"{card.name} v{card.version} - {card.inputs.modality} ({', '.join(card.inputs.channels)}); labels: {labels}."
    if card.description:
        text += f" {card.description}"
    validation = card.metrics.get("validation", {}) if isinstance(card.metrics, dict) else {}
    dice = validation.get("dice", {}) if isinstance(validation, dict) else {}
    scores = ", ".join(f"{k} {v:.3f}" for k, v in dice.items() if isinstance(v, (int, float)))
    if scores:
        text += f" Validation Dice: {scores}."
    return text


def available_models(models_dir: str | Path | None = None) -> list[ModelEntry]:
    """Every version in the store (active first per name) and every bundled model."""
    from deepseg_core.model_store import CARD_FILE, ModelStore, bundled_models

    store = ModelStore(models_dir)
    entries = []
    for name in store.names():
        active = store.active_version(name)
        for version in sorted(store.versions(name), key=lambda v: (v != active, -v)):
            card = ModelCard.read(store.folder(f"{name}:{version}") / CARD_FILE)
            mark = " (active)" if version == active else ""
            entries.append(
                ModelEntry(f"{name}:{version}", f"{name} v{version}{mark}", _describe(card), tuple(card.inputs.channels))
            )
    for name, folder in bundled_models().items():
        if name in store.names():
            continue
        card = ModelCard.read(folder / CARD_FILE)
        entries.append(ModelEntry(str(folder), f"{name} v{card.version} (bundled)", _describe(card), tuple(card.inputs.channels)))
    return entries


def progress_text(event: dict) -> tuple[int | None, str]:
    """``(percent or None, status line)`` for one ``deepseg segment --json`` event."""
    kind = event.get("event")
    if kind == "start":
        return 0, f"Segmenting with {event.get('model')} on {event.get('device')}..."
    if kind == "progress":
        done, total = int(event.get("done", 0)), max(1, int(event.get("total", 1)))
        return round(100 * done / total), f"Tile {done}/{total}, about {float(event.get('eta_s', 0.0)):.0f} s left"
    if kind == "case_done":
        return 100, f"Done in {float(event.get('seconds', 0.0)):.1f} s."
    if kind == "case_failed":
        return None, f"Failed: {event.get('error')}"
    return None, ""


def missing_packages() -> list[str]:
    """Import names of the engine's dependencies that this Python cannot import."""
    return [name for name in REQUIRED_PACKAGES if importlib.util.find_spec(name) is None]


def nvidia_cuda_version() -> str | None:
    """The CUDA version the NVIDIA driver supports (``"12.4"``), or None without an NVIDIA GPU."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi], capture_output=True, text=True, timeout=20, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    marker = "CUDA Version:"
    if marker not in out:
        return None
    return out.split(marker, 1)[1].split()[0]


def install_plan(missing: list[str], cuda_version: str | None) -> list[list[str]]:
    """pip argument lists that install ``missing``; torch from the CUDA index matching the driver.

    The panel shows these commands and runs them only after the user agreed.
    """
    plans = []
    if "torch" in missing:
        args = ["torch"]
        if cuda_version is not None:
            major, minor = (int(p) for p in cuda_version.split(".")[:2])
            tag = "cu126" if (major, minor) >= (12, 6) else "cu124" if (major, minor) >= (12, 4) else "cu118"
            if major >= 12 or (major, minor) >= (11, 8):
                args += ["--index-url", TORCH_CUDA_INDEX.format(tag=tag)]
        else:
            args += ["--index-url", TORCH_CUDA_INDEX.format(tag="cpu")]
        plans.append(args)
    others = [REQUIRED_PACKAGES[name] for name in missing if name != "torch"]
    if others:
        plans.append(others)
    return plans
