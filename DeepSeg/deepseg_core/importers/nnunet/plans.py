"""``plans.json``: the configuration resolved, what DeepSeg does not reproduce refused, the pipeline settings.

The ``nnunetv2`` pipeline (:mod:`deepseg_core.pipelines.nnunet`) reproduces nnU-Net's default
preprocessing and export; a configuration that asks for anything else (a cascade of more than two stages, a custom
reader, preprocessor, label manager, resampling function or normalisation) is refused here, with
what to do, rather than segmented differently.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .source import NnUNetImportError

if TYPE_CHECKING:
    from .card import OutputLabels

#: readers that give the voxels in SimpleITK's order (nnU-Net's default; nibabel's transposed to match)
READERS = ("SimpleITKIO", "NibabelIO")
RESAMPLING_FUNCTION = "resample_data_or_seg_to_shape"


def resolve_configuration(plans: dict[str, Any], name: str) -> dict[str, Any]:
    """A configuration of the plans with ``inherits_from`` resolved (the child's keys win), as nnU-Net does."""
    configurations = plans.get("configurations", {})
    if name not in configurations:
        raise NnUNetImportError(
            f"configuration {name!r} is not in plans.json", expected=f"one of {sorted(configurations)}", found=name
        )
    config = copy.deepcopy(configurations[name])
    parent = config.get("inherits_from")
    if parent is not None:
        base = resolve_configuration(plans, parent)
        base.update(config)
        config = base
    return config


def check_configuration(config: dict[str, Any], configuration: str, plans: dict[str, Any], folder: Path) -> None:
    def refuse(what: str, expected: str, found: object, hint: str | None = None) -> NnUNetImportError:
        return NnUNetImportError(
            f"{what} is not supported yet", subject=folder / "plans.json", expected=expected, found=str(found), hint=hint
        )

    previous = config.get("previous_stage")
    if previous is not None:
        # a cascade's second stage reads its first stage's segmentation (importer.py runs it first); that first
        # stage must be a model of its own
        first = resolve_configuration(plans, str(previous))
        seg_order_z = int(config.get("resampling_fn_seg_kwargs", {}).get("order_z", 0))
        if seg_order_z != 0:
            # the first stage's labels are resampled as segmentations (resampling_fn_seg) on the way in
            raise refuse("a cascade whose segmentations are resampled with order_z != 0", "order_z 0", seg_order_z)
        if first.get("previous_stage"):
            raise refuse(
                f"a cascade of more than two stages ({configuration!r} after {previous!r} after {first['previous_stage']!r})",
                "a second stage whose first stage reads only the image",
                first["previous_stage"],
            )
    reader = str(plans.get("image_reader_writer", "SimpleITKIO"))
    if reader not in READERS:
        raise refuse(
            f"the image reader {reader!r} (it may reorient or read 2D images)",
            f"one of {list(READERS)} (the voxels in the file's own order)",
            reader,
        )
    if config.get("preprocessor_name", "DefaultPreprocessor") != "DefaultPreprocessor":
        raise refuse("a custom preprocessor", "DefaultPreprocessor", config.get("preprocessor_name"))
    if str(plans.get("label_manager", "LabelManager")) != "LabelManager":
        raise refuse("a custom label manager", "LabelManager", plans.get("label_manager"))
    for kind in ("data", "seg", "probabilities"):
        function = str(config.get(f"resampling_fn_{kind}", RESAMPLING_FUNCTION))
        if function != RESAMPLING_FUNCTION:
            raise refuse(f"the resampling function {function!r}", RESAMPLING_FUNCTION, function)
    probability_kwargs = config.get("resampling_fn_probabilities_kwargs", {})
    if int(probability_kwargs.get("order", 1)) not in (0, 1) or int(probability_kwargs.get("order_z", 0)) not in (0, 1):
        raise refuse("resampling logits with a spline of order > 1", "order and order_z 0 or 1", probability_kwargs)
    data_kwargs = config.get("resampling_fn_data_kwargs", {})
    if int(data_kwargs.get("order_z", 0)) not in (0, 1):
        raise refuse("resampling images along the separate axis with order > 1", "order_z 0 or 1", data_kwargs)
    from ...pipelines.nnunet import NORMALIZATION_SCHEMES

    unknown = [s for s in config.get("normalization_schemes", []) if s not in NORMALIZATION_SCHEMES]
    if unknown:
        raise refuse(f"the normalisation {unknown[0]!r}", f"one of {list(NORMALIZATION_SCHEMES)}", unknown[0])


def resampling_kwargs(config: dict[str, Any], kind: str, defaults: tuple[int, int]) -> dict[str, Any]:
    kwargs = config.get(f"resampling_fn_{kind}_kwargs", {}) or {}
    return {
        "order": int(kwargs.get("order", defaults[0])),
        "order_z": int(kwargs.get("order_z", defaults[1])),
        "force_separate_z": kwargs.get("force_separate_z"),
    }


def pipeline_config(
    plans: dict[str, Any],
    config: dict[str, Any],
    configuration: str,
    channels: Sequence[str],
    outputs: OutputLabels,
    mirroring: Sequence[int] | None,
    folder: Path,
) -> dict[str, Any]:
    """The ``nnunetv2`` pipeline settings of a resolved configuration (``card.pipeline["config"]``).

    ``outputs``: the output channels (:func:`.card.check_labels`); a region-based model also gets
    ``regions`` (name and label values of each output channel).

    ``mirroring``: the checkpoint's ``inference_allowed_mirroring_axes``. The keys are described in
    :class:`~deepseg_core.pipelines.nnunet.NnUNetPipeline`.
    """
    properties = plans.get("foreground_intensity_properties_per_channel") or plans.get(
        "foreground_intensity_properties_by_modality", {}
    )
    schemes = list(config["normalization_schemes"])
    if len(schemes) != len(channels):
        raise NnUNetImportError(
            "plans.json normalises another number of channels than dataset.json names",
            subject=folder,
            expected=str(len(channels)),
            found=str(len(schemes)),
        )
    missing_properties = [c for c, s in enumerate(schemes) if s == "CTNormalization" and str(c) not in properties]
    if missing_properties:
        raise NnUNetImportError(
            "CT normalisation without the channel's foreground intensity properties", subject=folder / "plans.json"
        )
    settings = {
        "configuration": configuration,
        "transpose_forward": [int(a) for a in plans.get("transpose_forward", [0, 1, 2])],
        "transpose_backward": [int(a) for a in plans.get("transpose_backward", [0, 1, 2])],
        "spacing": [float(s) for s in config["spacing"]],
        "patch_size": [int(p) for p in config["patch_size"]],
        "normalization_schemes": schemes,
        "use_mask_for_norm": [bool(u) for u in config.get("use_mask_for_norm", [False] * len(schemes))],
        "foreground_intensity_properties_per_channel": {
            str(c): {k: float(v) for k, v in properties.get(str(c), {}).items()} for c in range(len(channels))
        },
        "resampling_data": resampling_kwargs(config, "data", (3, 0)),
        "resampling_seg": resampling_kwargs(config, "seg", (1, 0)),
        "resampling_probabilities": resampling_kwargs(config, "probabilities", (1, 0)),
        "anisotropy_threshold": 3.0,
        "tile_step_size": 0.5,
        "allowed_mirroring_axes": [int(a) for a in mirroring] if mirroring is not None else None,
        "label_values": [int(v) for v in outputs.channel_values],
        # the Dice of nnU-Net's training loss: counts summed over the batch, or one Dice per sample
        "batch_dice": bool(config.get("batch_dice", True)),
    }
    if outputs.regions:
        settings["regions"] = [{"name": name, "values": list(values)} for name, values in outputs.regions]
    return settings
