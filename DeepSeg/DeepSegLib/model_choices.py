"""The model selectors' entries (panel, Segment Editor effect, training panel), from plain JSON.

Built on :mod:`deepseg_core.model_catalog`, which reads ``model.json`` files without torch or
jsonschema, so the lists fill in a Slicer where nothing is installed yet.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from deepseg_core.model_catalog import CatalogEntry, list_models


@dataclass(frozen=True)
class ModelEntry:
    """One choice of a model selector.

    Attributes:
        ref: what ``--model`` takes (``NAME:VERSION`` or a bundled model's folder).
        name: the model's name (a fine-tune of it continues this name's versions).
        label: the text shown in the selector.
        description: tooltip and description line: labels, modality, channels, validation Dice.
        channels: input channel names (more than one: the panel shows a second volume selector).
        label_names: output label names, in the card's order (the effect's label list).
    """

    ref: str
    name: str
    label: str
    description: str
    channels: tuple[str, ...]
    label_names: tuple[str, ...]


def describe(entry: CatalogEntry) -> str:
    """``"phantom-liver v1 - CT (CT); labels: 1=liver, 2=liver lesion. <description> Validation Dice: ..."``."""
    labels = ", ".join(f"{label.value}={label.name}" for label in entry.labels)
    text = f"{entry.name} v{entry.version} - {entry.modality} ({', '.join(entry.channels)}); labels: {labels}."
    if entry.source:
        text += f" Imported from {entry.source}."
    if entry.description:
        text += f" {entry.description}"
    if entry.validation_dice:
        text += " Validation Dice: " + ", ".join(f"{k} {v:.3f}" for k, v in entry.validation_dice.items()) + "."
    return text


def selector_label(entry: CatalogEntry) -> str:
    """``"name vN (active)"``, ``"name vN"`` or ``"name vN (bundled)"``."""
    mark = " (bundled)" if entry.bundled else " (active)" if entry.active else ""
    return f"{entry.name} v{entry.version}{mark}"


def available_models(models_dir: str | Path | None = None) -> tuple[list[ModelEntry], list[str]]:
    """Every store version (active first per name) and every bundled model not shadowed by the store.

    Returns:
        ``(entries, problems)``: unreadable model folders are described in ``problems``.
    """
    entries, problems = list_models(models_dir)
    choices = [
        ModelEntry(e.ref, e.name, selector_label(e), describe(e), e.channels, tuple(label.name for label in e.labels))
        for e in entries
    ]
    return choices, problems
