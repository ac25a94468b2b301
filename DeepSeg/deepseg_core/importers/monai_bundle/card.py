"""The model card's sections from a bundle's metadata and mapped preprocessing.

Labels come from the output ``channel_def`` of ``network_data_format`` (colours from a fixed
palette, Slicer terminology codes where :mod:`deepseg_core.terminology` knows the name); inputs from
the input ``channel_def`` and modality; the normalisation is the DeepSeg scheme closest to the
bundle's intensity mapping (for the domain check only: the pipeline applies the bundle's own).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Mapping
from typing import Any

from ...model_card import Inputs, LabelSpec, Normalization, TerminologyCode
from ...nets.monai_network import MonaiNetConfig
from .walker import first_entry

#: label colours (RGB 0..1), by label value - 1; repeats after the last.
PALETTE: tuple[tuple[float, float, float], ...] = (
    (0.863, 0.078, 0.235),
    (0.118, 0.565, 1.000),
    (0.196, 0.804, 0.196),
    (1.000, 0.647, 0.000),
    (0.576, 0.439, 0.859),
    (0.000, 0.808, 0.820),
    (1.000, 0.843, 0.000),
    (0.780, 0.082, 0.522),
    (0.545, 0.271, 0.075),
    (0.498, 1.000, 0.831),
    (0.275, 0.510, 0.706),
    (0.933, 0.510, 0.933),
)


def _terminology(name: str) -> tuple[TerminologyCode | None, TerminologyCode | None]:
    """``(type code, category)`` from :mod:`deepseg_core.terminology` when that module exists."""
    if importlib.util.find_spec("deepseg_core.terminology") is None:
        return None, None
    module = importlib.import_module("deepseg_core.terminology")
    found = module.code_for_name(name)
    if isinstance(found, TerminologyCode):
        return found, None
    if isinstance(found, tuple) and len(found) == 2 and all(isinstance(c, TerminologyCode | None) for c in found):
        return found[0], found[1]
    return None, None


def labels_of(metadata: Mapping[str, Any], network: MonaiNetConfig) -> tuple[LabelSpec, ...]:
    """One label per output channel but background (value = channel), named from the output ``channel_def``.

    A single sigmoid channel is label 1; a name used twice gets ``(channel N)`` appended.
    """
    fmt = metadata.get("network_data_format", {})
    channel_def = first_entry(fmt.get("outputs") if isinstance(fmt, Mapping) else None).get("channel_def", {}) or {}
    names: dict[int, str] = {}
    for key, value in channel_def.items():
        if str(key).isdigit() and isinstance(value, str) and value.strip():
            names[int(key)] = value.strip()
    if network.single_logit:  # one sigmoid channel: its name, unless the metadata calls channel 0 background
        named = [n for _, n in sorted(names.items()) if n.lower() != "background"]
        wanted = {1: named[0] if named else "foreground"}
    else:
        wanted = {c: names.get(c) or f"label {c}" for c in range(1, network.out_channels)}
    labels, used = [], set()
    for value, name in wanted.items():
        if name in used:
            name = f"{name} (channel {value})"
        used.add(name)
        code, category = _terminology(name)
        color = PALETTE[(value - 1) % len(PALETTE)]
        labels.append(LabelSpec(value=value, name=name, color=color, code=code, category=category))
    return tuple(labels)


def inputs_of(metadata: Mapping[str, Any], network: MonaiNetConfig, steps: list[dict[str, Any]]) -> Inputs:
    """Modality (CT when the bundle windows Hounsfield units or says so, else MR) and one name per input channel."""
    fmt = metadata.get("network_data_format", {})
    first_input = first_entry(fmt.get("inputs") if isinstance(fmt, Mapping) else None)
    window = next((s for s in steps if s["op"] == "scale_intensity_range"), None)
    hu_window = window is not None and float(window["a_min"]) < 0
    declared = str(first_input.get("modality", "")).upper()
    modality = "CT" if hu_window or declared == "CT" else "MR"
    channel_def = first_input.get("channel_def", {}) or {}
    names = [str(channel_def.get(str(c), "")).strip() for c in range(network.in_channels)]
    if network.in_channels == 1 and names[0].lower() in ("", "image"):
        names = [modality]
    names = [n or f"channel {c}" for c, n in enumerate(names)]
    return Inputs(modality, tuple(names))


def normalization_of(steps: list[dict[str, Any]], modality: str) -> Normalization:
    """The DeepSeg scheme closest to the bundle's intensity mapping (used only by the domain check)."""
    for step in steps:
        if step["op"] == "scale_intensity_range" and step["b_min"] is not None and step["b_max"] is not None:
            a_min, a_max, b_min, b_max = (float(step[k]) for k in ("a_min", "a_max", "b_min", "b_max"))
            if a_max > a_min and b_max != b_min and modality == "CT":
                scale = (a_max - a_min) / (b_max - b_min)
                return Normalization("ct", window=(a_min, a_max), mean=a_min - b_min * scale, std=abs(scale))
        if step["op"] == "scale_intensity_range_percentiles":
            return Normalization("percentile", percentiles=(float(step["lower"]), float(step["upper"])))
    return Normalization("zscore")
