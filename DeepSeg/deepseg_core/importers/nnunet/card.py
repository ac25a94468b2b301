"""The card's parts that come from ``dataset.json`` and the plans: name, labels, inputs, grid, fingerprint.

Labels get DeepSeg colours (:data:`PALETTE`, in label order) and terminology codes when
``deepseg_core.terminology`` knows their names; the normalisation on the card is the DeepSeg scheme
closest to nnU-Net's (used by the domain check only: inference runs the pipeline's own).
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...model_card import LabelSpec, Normalization, TerminologyCode
from .source import NnUNetImportError, read_json

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: label colours (RGB 0-1) in label order, cycled: distinct hues that read well over grey CT / MR.
PALETTE: tuple[tuple[float, float, float], ...] = (
    (0.902, 0.098, 0.294),
    (0.235, 0.706, 0.294),
    (1.000, 0.882, 0.098),
    (0.263, 0.388, 0.847),
    (0.961, 0.510, 0.192),
    (0.569, 0.118, 0.706),
    (0.259, 0.831, 0.957),
    (0.941, 0.196, 0.902),
    (0.749, 0.937, 0.271),
    (0.980, 0.745, 0.831),
    (0.275, 0.600, 0.565),
    (0.863, 0.745, 1.000),
    (0.604, 0.388, 0.141),
    (1.000, 0.980, 0.784),
    (0.502, 0.000, 0.000),
    (0.667, 1.000, 0.765),
    (0.502, 0.502, 0.000),
    (1.000, 0.847, 0.694),
    (0.000, 0.000, 0.459),
    (0.663, 0.663, 0.663),
)


def sanitise_name(name: str) -> str:
    """A store name from free text: letters, digits, ``._-`` (others become ``-``), at most 64 characters."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._")
    return cleaned[:64] or "nnunet-model"


def model_name(name: str | None, plans: dict[str, Any], dataset: dict[str, Any], folder: Path) -> str:
    """The store name: ``name``, else the plans' dataset name (e.g. ``Dataset501_Liver``) made a valid name."""
    chosen = name or sanitise_name(str(plans.get("dataset_name") or dataset.get("name") or folder.parent.name))
    if not NAME_PATTERN.match(chosen):
        raise NnUNetImportError(
            "invalid model name",
            expected="letters, digits, '.', '_', '-' (at most 64, starting with a letter or digit)",
            found=chosen,
        )
    return chosen


@dataclass(frozen=True)
class OutputLabels:
    """What the network's output channels are and which label map they become (nnU-Net's ``LabelManager``).

    Label mode (``regions`` empty): one softmax channel per label value, background first; the label
    map is the argmax. Region mode (``dataset.json`` labels that are lists of two or more values, as
    BraTS' ``"whole tumor": [1, 2, 3]``): one sigmoid channel per region, no background channel; the
    label map starts at 0 and, region by region, writes ``regions_class_order[i]`` where region ``i``'s
    probability is above 0.5, so later regions overwrite earlier ones.

    Attributes:
        pairs: ``(name, value)`` of every value of the label map but 0, ascending. In region mode
            value ``regions_class_order[i]`` is named after region ``i`` less the later regions that
            overlap it, leaving out those inside another of them (BraTS: "whole tumor excluding tumor
            core", not "... and enhancing tumor"): that is what those voxels are.
        channel_values: the label value each output channel stands for (label mode: ``0..K-1``;
            region mode: ``regions_class_order``).
        regions: ``(name, values)`` of each region in output channel order (empty in label mode).
    """

    pairs: tuple[tuple[str, int], ...]
    channel_values: tuple[int, ...]
    regions: tuple[tuple[str, tuple[int, ...]], ...] = ()

    @property
    def channels(self) -> int:
        """Network output channels."""
        return len(self.channel_values)


def _values(value: Any) -> tuple[int, ...]:
    """A dataset.json label value as a tuple of ints (a region's list, or one value)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    return tuple(int(v) for v in items)


def check_labels(dataset: dict[str, Any], folder: Path) -> OutputLabels:
    """The output channels and label map of ``dataset.json`` (see :class:`OutputLabels`), checked as nnU-Net checks them.

    Region mode follows nnU-Net's rule: some label is a list of two or more values; a
    ``regions_class_order`` beside plain labels is ignored, as nnU-Net ignores it. The ``ignore``
    label never has an output channel.
    """
    labels = dataset.get("labels")
    subject = folder / "dataset.json"
    if not isinstance(labels, dict) or not labels:
        raise NnUNetImportError("dataset.json has no labels", subject=subject)
    try:
        parsed = {str(name): _values(value) for name, value in labels.items()}
    except (TypeError, ValueError):
        raise NnUNetImportError(
            "dataset.json labels must be integers or lists of integers",
            subject=subject,
            found=json.dumps(labels)[:200],
        ) from None
    if len(parsed.get("ignore", ())) > 1:
        raise NnUNetImportError(
            "dataset.json's ignore label must be one integer (nnU-Net refuses a region there too)",
            subject=subject,
            found=f"ignore: {labels['ignore']}",
        )
    if any(len(values) > 1 for name, values in parsed.items() if name != "ignore"):
        return _regions(parsed, dataset.get("regions_class_order"), subject)
    pairs = sorted(((name, values[0]) for name, values in parsed.items() if name != "ignore"), key=lambda p: p[1])
    values = [v for _, v in pairs]
    if values != list(range(len(values))):
        raise NnUNetImportError(
            "dataset.json labels are not consecutive from 0 (nnU-Net requires it)",
            subject=subject,
            expected="0, 1, 2, ...",
            found=str(values),
        )
    return OutputLabels(tuple(p for p in pairs if p[1] != 0), tuple(values))


def _regions(parsed: dict[str, tuple[int, ...]], order: Any, subject: Path) -> OutputLabels:
    """Region mode: the regions in dataset.json's order (not background, not ``ignore``) and the values they write."""
    # nnU-Net's LabelManager skips the ignore label and anything that is only background
    regions = tuple((name, values) for name, values in parsed.items() if name != "ignore" and set(values) != {0})
    if not isinstance(order, (list, tuple)) or len(order) != len(regions):
        raise NnUNetImportError(
            "a region-based dataset.json needs regions_class_order with one label value per region",
            subject=subject,
            expected=f"{len(regions)} values, one per region {[name for name, _ in regions]}",
            found=f"regions_class_order {order!r}",
            hint="nnU-Net refuses such a dataset.json too; use the one the model was trained with.",
        )
    try:
        written = tuple(int(v) for v in order)
    except (TypeError, ValueError):
        raise NnUNetImportError("regions_class_order must hold integers", subject=subject, found=repr(order)) from None
    if len(set(written)) != len(written) or min(written) < 1 or max(written) > 65535:
        raise NnUNetImportError(
            "DeepSeg needs regions_class_order to give each region its own label value from 1 to 65535 "
            "(each value becomes one named segment)",
            subject=subject,
            found=str(list(written)),
        )
    pairs = []
    for i, (name, values) in enumerate(regions):
        overlapping = [(later, set(v)) for later, v in regions[i + 1 :] if set(v) & set(values)]
        # a later region inside another later one is excluded with it already ("tumor core", not "tumor core
        # and enhancing tumor")
        outer = [later for later, v in overlapping if not any(v < other for _, other in overlapping)]
        pairs.append((f"{name} excluding {' and '.join(outer)}" if outer else name, written[i]))
    pairs.sort(key=lambda p: p[1])
    return OutputLabels(tuple(pairs), written, regions)


def check_output_channels(weights: dict[str, Any], outputs: OutputLabels, folder: Path) -> None:
    """The checkpoint's segmentation heads must have the channels dataset.json describes (a dataset.json
    edited after training, or another model's, would otherwise give labels that mean something else)."""
    heads = sorted(k for k in weights if k.startswith("decoder.seg_layers.") and k.endswith(".weight"))
    if not heads:
        return  # not a plans network nnU-Net builds: the weights' own check names what is missing
    found = int(weights[heads[-1]].shape[0])
    if found != outputs.channels:
        described = (
            f"{outputs.channels} sigmoid regions {[name for name, _ in outputs.regions]}"
            if outputs.regions
            else f"{outputs.channels} labels (background included)"
        )
        raise NnUNetImportError(
            "the checkpoint's network does not output what dataset.json describes",
            subject=folder / "dataset.json",
            expected=described,
            found=f"{found} output channels in {heads[-1]}",
            hint="Use the dataset.json that was saved with the model (nnU-Net copies it into the model folder).",
        )


def channel_names(dataset: dict[str, Any], folder: Path) -> list[str]:
    """The input channels' names in channel order (``channel_names``, or ``modality`` of older datasets)."""
    channels = [
        str(v) for _, v in sorted(dataset.get("channel_names", dataset.get("modality", {})).items(), key=lambda kv: int(kv[0]))
    ]
    if not channels:
        raise NnUNetImportError("dataset.json has no channel_names", subject=folder / "dataset.json")
    return channels


def _terminology(name: str) -> tuple[TerminologyCode | None, TerminologyCode | None]:
    """``(type code, category code)`` from ``deepseg_core.terminology.code_for_name`` when that module exists.

    ``code_for_name(name)`` may return None, a :class:`TerminologyCode` (the type), a ``(type, category)``
    pair, or an object with ``code`` / ``category`` attributes.
    """
    try:
        module = importlib.import_module("deepseg_core.terminology")
    except ModuleNotFoundError as exc:
        if exc.name != "deepseg_core.terminology":
            raise
        return None, None
    match = module.code_for_name(name) if hasattr(module, "code_for_name") else None
    if match is None:
        return None, None
    if isinstance(match, TerminologyCode):
        return match, None
    if isinstance(match, tuple) and len(match) == 2:
        return match[0], match[1]
    return getattr(match, "code", None), getattr(match, "category", None)


def label_specs(pairs: Sequence[tuple[str, int]]) -> tuple[LabelSpec, ...]:
    """One label per value of the label map but 0: its name, value, palette colour and terminology codes."""
    specs = []
    for name, value in pairs:
        if value == 0:
            continue
        code, category = _terminology(name)
        specs.append(LabelSpec(value, name, PALETTE[(value - 1) % len(PALETTE)], code, category))
    return tuple(specs)


def normalization(scheme: str, properties: dict[str, Any]) -> Normalization:
    """The DeepSeg scheme closest to nnU-Net's (for the domain check; inference uses the pipeline's own)."""
    if scheme == "CTNormalization":
        return Normalization(
            "ct",
            window=(float(properties["percentile_00_5"]), float(properties["percentile_99_5"])),
            mean=float(properties["mean"]),
            std=max(float(properties["std"]), 1e-8),
        )
    return Normalization("zscore")


def to_xyz(values_t: Sequence[float], transpose_backward: Sequence[int]) -> tuple[float, float, float]:
    """Values in nnU-Net's transposed axis order -> (x, y, z) of the input arrays."""
    zyx = [float(values_t[transpose_backward[j]]) for j in range(3)]
    return (zyx[2], zyx[1], zyx[0])


def grid_defaults(settings: dict[str, Any], plans: dict[str, Any]) -> tuple[tuple[float, float, float], tuple[int, ...]]:
    """The card's target spacing ``(x, y, z)`` and patch ``(z, y, x)`` from the pipeline settings.

    A 2D model keeps each image's slice spacing; the fingerprint's median stands in for it on the card.
    """
    spacing, patch, backward = settings["spacing"], settings["patch_size"], settings["transpose_backward"]
    if len(spacing) == 3:
        return to_xyz(spacing, backward), tuple(patch)
    median = plans.get("original_median_spacing_after_transp") or [spacing[0], *spacing]
    return to_xyz([float(median[0]), *spacing], backward), (1, *patch)


def fingerprint(folder: Path, modality: str, channels: Sequence[str]) -> dict[str, Any]:
    """The card's training fingerprint from ``dataset_fingerprint.json`` (what it allows; see below).

    Produced: ``num_cases``, ``modality``, ``channels``, ``spacing_xyz_mm`` (min / median / max of the
    training images), ``shape_zyx_median`` (after nnU-Net's crop), ``intensity_foreground`` (channel 0's
    foreground mean, std and 0.5 / 50 / 99.5 percentiles). Missing, because nnU-Net does not record
    them: ``orientation`` (so the orientation check is skipped), ``intensity_all`` and
    ``intensity_body`` (the body-intensity distribution the intensity check compares; that check is
    skipped), ``profiles``.
    """
    path = folder / "dataset_fingerprint.json"
    if not path.is_file():
        return {}
    data = read_json(path)
    spacings = np.array([s[::-1] for s in data.get("spacings", [])], dtype=float)  # nnU-Net stores (z, y, x)
    out: dict[str, Any] = {
        "num_cases": int(len(spacings)),
        "modality": modality,
        "channels": list(channels),
        "source": "nnunetv2",
    }
    if len(spacings):
        out["spacing_xyz_mm"] = {
            "min": spacings.min(0).tolist(),
            "median": np.median(spacings, 0).tolist(),
            "max": spacings.max(0).tolist(),
        }
    shapes = data.get("shapes_after_crop")
    if shapes:
        out["shape_zyx_median"] = np.median(np.array(shapes, dtype=float), 0).tolist()
    stats = (data.get("foreground_intensity_properties_per_channel") or {}).get("0")
    if stats:
        out["intensity_foreground"] = {
            "mean": float(stats["mean"]),
            "std": float(stats["std"]),
            "p00_5": float(stats["percentile_00_5"]),
            "p50": float(stats["median"]),
            "p99_5": float(stats["percentile_99_5"]),
        }
    return out
