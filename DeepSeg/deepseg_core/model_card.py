"""The model card (``model.json``): what a model is, typed, and checked against a JSON Schema.

A model is a folder holding ``model.json`` and ``weights.safetensors``. The card says how to rebuild
the network, what it expects as input, how to preprocess, what its labels are (names, colours,
terminology codes), what data it was trained on (fingerprint), how well it did (metrics), and the
SHA-256 of its weights. ``schemas/model.schema.json`` is enforced on every load and save.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from .config import from_dict, to_dict
from .errors import DeepSegError
from .io import SegmentInfo

SCHEMA_PATH = Path(__file__).with_name("schemas") / "model.schema.json"
FORMAT_VERSION = 1


class ModelError(DeepSegError):
    """A model folder, card, store entry or weights file is missing, invalid or inconsistent."""


@dataclass(frozen=True)
class TerminologyCode:
    """A coded concept, e.g. SNOMED CT ``("SCT", "10200004", "Liver")``."""

    scheme: str
    value: str
    meaning: str


ANATOMICAL_STRUCTURE = TerminologyCode("SCT", "123037004", "Anatomical Structure")
SLICER_TERMINOLOGY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"


@dataclass(frozen=True)
class LabelSpec:
    """One output label.

    Attributes:
        value: voxel value in the labelmap (and network output channel).
        name: display name.
        color: RGB in [0, 1].
        code: terminology type code (e.g. SNOMED CT), or None.
        category: terminology category code (default: Anatomical Structure).
        thing: countable objects (lesions) that get instance ids; False for "stuff" (organs).
    """

    value: int
    name: str
    color: tuple[float, float, float]
    code: TerminologyCode | None = None
    category: TerminologyCode | None = None
    thing: bool = False

    def segment_info(self) -> SegmentInfo:
        """The segment Slicer shows for this label (name, colour, terminology entry)."""
        terminology = None
        if self.code is not None:
            category = self.category or ANATOMICAL_STRUCTURE
            terminology = {
                "contextName": SLICER_TERMINOLOGY_CONTEXT,
                "category": [category.scheme, category.value, category.meaning],
                "type": [self.code.scheme, self.code.value, self.code.meaning],
            }
        return SegmentInfo(name=self.name, label_value=self.value, color_rgb=self.color, terminology=terminology)


@dataclass(frozen=True)
class Normalization:
    """Intensity normalisation.

    Schemes: ``ct`` clips to ``window`` (HU) then applies the fixed ``mean``/``std`` of the training
    data; ``zscore`` uses each image's own mean/std over voxels above its 1st percentile (MR);
    ``percentile`` clips to the image's own ``percentiles`` then z-scores.
    """

    scheme: str
    window: tuple[float, float] | None = None
    mean: float | None = None
    std: float | None = None
    percentiles: tuple[float, float] | None = None


@dataclass(frozen=True)
class Preprocessing:
    """Resampling target and normalisation."""

    target_spacing_xyz_mm: tuple[float, float, float]
    normalization: Normalization


@dataclass(frozen=True)
class InferenceDefaults:
    """Sliding-window defaults stored with the model."""

    patch_size_zyx: tuple[int, int, int]
    overlap: float = 0.5
    batch_size: int = 2


@dataclass(frozen=True)
class Architecture:
    """Registry name of the network and its config dict."""

    name: str
    config: dict[str, Any]


@dataclass(frozen=True)
class Inputs:
    """Modality and the channel names, in network input order."""

    modality: str
    channels: tuple[str, ...]


@dataclass(frozen=True)
class Region:
    """An overlapping region of a region-based nnU-Net model (BraTS' "whole tumor": values 1, 2, 3).

    Attributes:
        name: as the model's dataset.json names it.
        values: the label values whose union it is, in the label map (nnU-Net evaluates it so).
        row_name: its row in measurement and evaluation tables: a one-value region is its label's row
            (that label's name); a region of several values is a row of its own, named ``name``, or
            ``"<name> (region)"`` when a label already has that name.
    """

    name: str
    values: tuple[int, ...]
    row_name: str


def region_title(name: str, values: Sequence[int]) -> str:
    """How tables show a region of several values: ``"whole tumor (values 1, 2, 3)"``."""
    return f"{name} (values {', '.join(str(v) for v in values)})"


def created_now() -> str:
    """A card's ``created`` for a version made now (UTC, ISO 8601 to the second)."""
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class ModelCard:
    """The whole ``model.json``.

    Optional sections (absent in cards of DeepSeg's own models):

    - ``source``: where an imported model came from: ``format`` (``nnunetv2``, ``monai_bundle``),
      ``path``, ``files`` (relative path -> SHA-256 of every source file read), and format details.
      A fine-tuned version keeps its parent's ``source``.
    - ``pipeline``: ``{"name": ..., "config": {...}}``, the preprocessing and export of the tool the
      model comes from (:mod:`deepseg_core.inference.pipelines`); none means DeepSeg's own.
    - ``ensemble``: member names (nnU-Net folds); ``weights.safetensors`` then holds each member's
      tensors under ``<member>.`` and the members' logits are averaged.
    """

    name: str
    version: int
    architecture: Architecture
    inputs: Inputs
    labels: tuple[LabelSpec, ...]
    preprocessing: Preprocessing
    inference: InferenceDefaults
    weights_sha256: str
    parent_version: int | None = None
    created: str = field(default_factory=lambda: created_now())
    description: str = ""
    fingerprint: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    source: dict[str, Any] = field(default_factory=dict)
    pipeline: dict[str, Any] = field(default_factory=dict)
    ensemble: tuple[str, ...] = ()

    @property
    def ref(self) -> str:
        """``name:version``."""
        return f"{self.name}:{self.version}"

    @property
    def num_classes(self) -> int:
        """Network output channels: background + one per label value up to the largest."""
        return max(label.value for label in self.labels) + 1

    @property
    def regions(self) -> tuple[Region, ...]:
        """The regions of a region-based nnU-Net model, in its ``regions_class_order``; empty for other models."""
        config = (self.pipeline or {}).get("config") or {}
        names = {label.value: label.name for label in self.labels}
        regions = []
        for entry in config.get("regions") or ():
            name, values = str(entry["name"]), tuple(int(v) for v in entry["values"])
            if len(values) == 1 and values[0] in names:
                row_name = names[values[0]]
            else:
                row_name = name if name not in names.values() else f"{name} (region)"
            regions.append(Region(name, values, row_name))
        return tuple(regions)

    @property
    def previous_stage(self) -> ModelCard | None:
        """The first stage of an nnU-Net cascade (``3d_cascade_fullres``), as a card of its own, or None.

        The cascade's card carries its first stage (``3d_lowres``) in ``pipeline["config"]["previous_stage"]``:
        ``architecture`` (``name``, ``config``), ``ensemble`` (its folds), ``pipeline`` (its tool's settings)
        and ``patch_size_zyx``; its weights are stored under ``previous_stage.`` in the same weights file.
        The first stage segments the input, and its labels become extra input channels of the second.
        """
        stage = ((self.pipeline or {}).get("config") or {}).get("previous_stage")
        if not stage:
            return None
        try:
            return dataclasses.replace(
                self,
                architecture=Architecture(str(stage["architecture"]["name"]), dict(stage["architecture"]["config"])),
                ensemble=tuple(str(m) for m in stage.get("ensemble") or ()),
                pipeline=dict(stage["pipeline"]),
                inference=dataclasses.replace(self.inference, patch_size_zyx=tuple(int(p) for p in stage["patch_size_zyx"])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(
                f"model {self.ref}: its cascade's first stage is incompletely described ({exc})",
                hint="Re-import the model with `deepseg models import FOLDER`.",
            ) from None

    def label(self, value: int) -> LabelSpec:
        """The label with voxel value ``value``."""
        for spec in self.labels:
            if spec.value == value:
                return spec
        raise KeyError(value)

    def to_json_dict(self) -> dict[str, Any]:
        """The card as schema-valid JSON data."""
        data = to_dict(self)
        validate_card_dict(data)
        return data

    @classmethod
    def from_json_dict(cls, data: dict[str, Any], subject: str | Path = "model.json") -> ModelCard:
        """Validate ``data`` against the schema, then build the card."""
        validate_card_dict(data, subject)
        return from_dict(cls, data)

    @classmethod
    def read(cls, path: str | Path) -> ModelCard:
        """Read and validate a ``model.json``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelError(
                "model card not found", subject=path, hint="A model folder holds model.json and weights.safetensors."
            ) from None
        except json.JSONDecodeError as exc:
            raise ModelError(f"model card is not valid JSON ({exc.msg}, line {exc.lineno})", subject=path) from None
        return cls.from_json_dict(data, subject=path)


@cache
def _schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def validate_card_dict(data: dict[str, Any], subject: str | Path = "model.json") -> None:
    """Raise :class:`ModelError` naming the first invalid field (JSON path) and why."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(_schema())
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        first = errors[0]
        where = "/".join(str(p) for p in first.absolute_path) or "(top level)"
        raise ModelError(
            f"model card does not match the schema at {where}: {first.message}",
            subject=subject,
            hint=f"{len(errors)} problem(s) in all; see {SCHEMA_PATH.name} in deepseg_core/schemas.",
        )
    values = [label["value"] for label in data["labels"]]
    names = [label["name"] for label in data["labels"]]
    if len(set(values)) != len(values) or len(set(names)) != len(names):
        raise ModelError("model card has duplicate label values or names", subject=subject, found=f"{values} / {names}")
