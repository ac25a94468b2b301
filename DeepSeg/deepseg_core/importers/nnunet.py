"""Import an nnU-Net v2 trained model folder as a DeepSeg model version (never imports ``nnunetv2``).

A trained model folder is ``<results>/DatasetXXX_Name/<Trainer>__<Plans>__<configuration>/`` holding
``dataset.json``, ``plans.json`` (``dataset_fingerprint.json``) and ``fold_*/checkpoint_final.pth``
(or ``checkpoint_best.pth``). :func:`import_nnunet` reads them and stores:

- the network: DeepSeg's own rebuild of the plans' ``PlainConvUNet`` / ``ResidualEncoderUNet``
  (:mod:`deepseg_core.nets.nnunet`), one per fold, as a :class:`~deepseg_core.nets.LogitEnsemble`
  whose members average their logits as nnU-Net averages its folds; the weights are copied into
  ``weights.safetensors``, the pickles are never kept;
- the card: labels from dataset.json, inputs, the closest DeepSeg normalisation (used by the domain
  check only), the training-data fingerprint from ``dataset_fingerprint.json``, and the ``nnunetv2``
  pipeline settings (:mod:`deepseg_core.pipelines.nnunet`) that reproduce nnU-Net's preprocessing and
  export; ``source`` records the folder, the SHA-256 of every file read, configuration, trainer,
  plans, folds and checkpoint.

Checkpoints are pickles: they are loaded only with ``torch.load(weights_only=True)``, which refuses
every global outside an allow-list (here the numpy scalar and dtype types nnU-Net's training log
holds) without executing anything; anything else is refused with the name of what it needed.

Not supported yet, each refused with a clear error (never a wrong result): the cascade
(``3d_lowres`` / ``3d_cascade_fullres``), region-based training, custom readers that reorient,
preprocessors, resampling functions or normalisations other than nnU-Net's defaults, networks
other than ``PlainConvUNet`` / ``ResidualEncoderUNet`` with BasicBlockD.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..config import from_dict, to_dict
from ..model_card import (
    Architecture,
    InferenceDefaults,
    Inputs,
    LabelSpec,
    ModelCard,
    ModelError,
    Normalization,
    Preprocessing,
    TerminologyCode,
)
from ..model_store import sha256_file

log = logging.getLogger(__name__)

CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth")
NETWORKS = {"PlainConvUNet": "nnunet_plain_unet", "ResidualEncoderUNet": "nnunet_resenc_unet"}
#: readers that give the voxels in SimpleITK's order (nnU-Net's default; nibabel's transposed to match)
READERS = ("SimpleITKIO", "NibabelIO")
RESAMPLING_FUNCTION = "resample_data_or_seg_to_shape"
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


class NnUNetImportError(ModelError):
    """An nnU-Net folder that cannot be imported (missing file, unsupported feature, unsafe checkpoint)."""


# ------------------------------------------------------------------------------------------------
# reading


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NnUNetImportError(
            "file missing from the nnU-Net model folder",
            subject=path,
            hint="Give the trained model folder <Trainer>__<Plans>__<configuration> itself.",
        ) from None
    except json.JSONDecodeError as exc:
        raise NnUNetImportError(f"not valid JSON ({exc.msg}, line {exc.lineno})", subject=path) from None


def _safe_globals() -> list[Any]:
    """What nnU-Net checkpoints need beyond torch's own allow-list: numpy scalars and dtypes (training log values).

    Older checkpoints were pickled under numpy < 2, whose scalar constructor is named
    ``numpy.core.multiarray.scalar``; it is allowed under that name too.
    """
    scalar = np.dtype(np.float32).type(0).__reduce__()[0]  # numpy._core.multiarray.scalar
    allowed: list[Any] = [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype]
    for name in dir(np.dtypes):
        value = getattr(np.dtypes, name)
        if isinstance(value, type) and issubclass(value, np.dtype):
            allowed.append(value)
    return allowed


def load_checkpoint(path: Path) -> dict[str, Any]:
    """An nnU-Net checkpoint, unpickled with ``torch.load(weights_only=True)`` and the numpy allow-list only.

    Raises:
        NnUNetImportError: the file is missing, is no torch checkpoint, or needs a global outside the
            allow-list (named in the message; nothing of it was executed).
    """
    import pickle

    import torch

    if not path.is_file():
        raise NnUNetImportError("checkpoint missing", subject=path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        needed = re.search(r"(?:Unsupported global|GLOBAL)[: ]+(?:GLOBAL )?([\w.]+)", str(exc))
        raise NnUNetImportError(
            "the checkpoint needs more than plain tensors and numpy scalars to unpickle, so it is refused"
            " (DeepSeg loads checkpoints with torch.load(weights_only=True) only; nothing in it was run)",
            subject=path,
            expected="an nnU-Net checkpoint: tensors, numbers, strings, numpy scalars",
            found=f"a reference to {needed.group(1)}" if needed else str(exc).splitlines()[0][:200],
            hint="Only import checkpoints from a source you trust; re-save it from nnU-Net if it is yours.",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise NnUNetImportError("cannot read the checkpoint", subject=path, found=str(exc).splitlines()[0][:200]) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise NnUNetImportError(
            "not an nnU-Net checkpoint", subject=path, expected="a dict with 'network_weights'", found=type(checkpoint).__name__
        )
    return checkpoint


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


def _legacy_architecture(config: dict[str, Any]) -> dict[str, Any]:
    """The ``architecture`` section old plans (no such key; e.g. older TotalSegmentator models) imply.

    nnU-Net rebuilds it the same way (``ConfigurationManager.__init__``): features
    ``min(base * 2**i, max)``, kernel and pool sizes, convs per stage, conv bias, instance norm
    (eps 1e-5, affine), LeakyReLU.
    """
    class_name = config.get("UNet_class_name")
    if class_name not in NETWORKS:
        raise NnUNetImportError(
            "old plans format with a network DeepSeg does not rebuild",
            expected=f"UNet_class_name one of {sorted(NETWORKS)}",
            found=str(class_name),
        )
    n_stages = len(config["n_conv_per_stage_encoder"])
    dims = len(config["patch_size"])
    blocks = "n_conv_per_stage" if class_name == "PlainConvUNet" else "n_blocks_per_stage"
    return {
        "network_class_name": class_name,
        "arch_kwargs": {
            "n_stages": n_stages,
            "features_per_stage": [
                min(config["UNet_base_num_features"] * 2**i, config["unet_max_num_features"]) for i in range(n_stages)
            ],
            "conv_op": f"torch.nn.modules.conv.Conv{dims}d",
            "kernel_sizes": config["conv_kernel_sizes"],
            "strides": config["pool_op_kernel_sizes"],
            blocks: config["n_conv_per_stage_encoder"],
            "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"],
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
    }


def _per_stage(value: Any, n: int, dims: int | None = None) -> list[Any]:
    """An arch kwarg given as one value for all stages (nnU-Net allows it), expanded to ``n`` entries."""
    if isinstance(value, int):
        return [value if dims is None else [value] * dims for _ in range(n)]
    out = [list(v) if isinstance(v, (list, tuple)) else ([v] * dims if dims else v) for v in value]
    return out


def network_config(
    architecture: dict[str, Any], in_channels: int, num_classes: int, weights: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """``(registry name, config dict)`` of the DeepSeg network for the plans' ``architecture`` section.

    ``weights`` (one fold's ``network_weights``) decides between instance and batch norm when the
    trainer swapped them (``nnUNetTrainerBN`` keeps the plans' instance norm but trains batch norm).
    """
    class_name = str(architecture.get("network_class_name", "")).rsplit(".", 1)[-1]
    if class_name not in NETWORKS:
        raise NnUNetImportError(
            f"network {architecture.get('network_class_name')!r} is not supported yet",
            expected=f"one of {sorted(NETWORKS)} (dynamic_network_architectures)",
            found=str(architecture.get("network_class_name")),
        )
    kwargs = dict(architecture.get("arch_kwargs", {}))

    def leaf(key: str) -> str:
        value = kwargs.get(key)
        return "" if value is None else str(value).rsplit(".", 1)[-1]

    conv = leaf("conv_op")
    if conv not in ("Conv2d", "Conv3d"):
        raise NnUNetImportError("unsupported conv_op in the plans", expected="Conv2d or Conv3d", found=conv or "none")
    dims = 3 if conv == "Conv3d" else 2
    n = int(kwargs["n_stages"])
    norm_name = leaf("norm_op")
    norm = {"": "none", f"InstanceNorm{dims}d": "instance", f"BatchNorm{dims}d": "batch"}.get(norm_name)
    if norm is None:
        raise NnUNetImportError("unsupported norm_op in the plans", expected="InstanceNorm or BatchNorm", found=norm_name)
    if norm == "instance" and any(k.endswith("norm.running_mean") for k in weights):
        log.info("the checkpoint holds batch-norm statistics although the plans say instance norm: using batch norm")
        norm = "batch"
    nonlin = {"LeakyReLU": "leaky_relu", "ReLU": "relu", "": "none"}.get(leaf("nonlin"))
    if nonlin is None:
        raise NnUNetImportError("unsupported non-linearity in the plans", expected="LeakyReLU or ReLU", found=leaf("nonlin"))
    dropout_name = leaf("dropout_op")
    dropout_dims = {"": 0, "Dropout": 0, "Dropout2d": 2, "Dropout3d": 3}.get(dropout_name)
    if dropout_dims is None:
        raise NnUNetImportError(
            "unsupported dropout_op in the plans", expected="Dropout, Dropout2d or Dropout3d", found=dropout_name
        )
    norm_kwargs = kwargs.get("norm_op_kwargs") or {}
    nonlin_kwargs = kwargs.get("nonlin_kwargs") or {}
    config: dict[str, Any] = {
        "spatial_dims": dims,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "features_per_stage": _per_stage(kwargs["features_per_stage"], n),
        "kernel_sizes": _per_stage(kwargs["kernel_sizes"], n, dims),
        "strides": _per_stage(kwargs["strides"], n, dims),
        "n_conv_per_stage_decoder": _per_stage(kwargs["n_conv_per_stage_decoder"], n - 1),
        "conv_bias": bool(kwargs.get("conv_bias", False)),
        "norm": norm,
        "norm_eps": float(norm_kwargs.get("eps", 1e-5)),
        "norm_affine": bool(norm_kwargs.get("affine", norm != "instance")),
        "norm_momentum": float(norm_kwargs.get("momentum", 0.1)),
        "dropout": float((kwargs.get("dropout_op_kwargs") or {}).get("p", 0.5)) if dropout_name else 0.0,
        "dropout_dims": dropout_dims,
        "nonlin": nonlin,
        "negative_slope": float(nonlin_kwargs.get("negative_slope", 0.01)),
        "nonlin_first": bool(kwargs.get("nonlin_first", False)),
        "deep_supervision": True,
    }
    if class_name == "PlainConvUNet":
        config["n_conv_per_stage"] = _per_stage(kwargs["n_conv_per_stage"], n)
    else:
        block = leaf("block") or "BasicBlockD"
        if block != "BasicBlockD" or kwargs.get("bottleneck_channels") is not None:
            raise NnUNetImportError(
                "residual blocks other than BasicBlockD are not supported yet", expected="BasicBlockD", found=block
            )
        config["n_blocks_per_stage"] = _per_stage(kwargs["n_blocks_per_stage"], n)
        config["stem_channels"] = kwargs.get("stem_channels")
    return NETWORKS[class_name], config


# ------------------------------------------------------------------------------------------------
# checks


def _check_labels(dataset: dict[str, Any], folder: Path) -> list[tuple[str, int]]:
    """``(name, value)`` of every output channel in nnU-Net's order (background first); refuses regions."""
    labels = dataset.get("labels")
    if not isinstance(labels, dict) or not labels:
        raise NnUNetImportError("dataset.json has no labels", subject=folder / "dataset.json")
    regions = {k: v for k, v in labels.items() if isinstance(v, (list, tuple)) and len(v) > 1}
    if regions or dataset.get("regions_class_order") is not None:
        raise NnUNetImportError(
            "region-based training is not supported yet (the model predicts overlapping regions with sigmoids, not labels)",
            subject=folder / "dataset.json",
            expected="labels {name: int}",
            found=f"regions {sorted(regions)[:3]}" if regions else "regions_class_order",
        )
    pairs = []
    for name, value in labels.items():
        if name == "ignore":
            continue  # nnU-Net's ignore label has no output channel
        value = value[0] if isinstance(value, (list, tuple)) else value
        pairs.append((str(name), int(value)))
    pairs.sort(key=lambda p: p[1])
    values = [v for _, v in pairs]
    if values != list(range(len(values))):
        raise NnUNetImportError(
            "dataset.json labels are not consecutive from 0 (nnU-Net requires it)",
            subject=folder / "dataset.json",
            expected="0, 1, 2, ...",
            found=str(values),
        )
    return pairs


def _check_configuration(config: dict[str, Any], configuration: str, plans: dict[str, Any], folder: Path) -> None:
    def refuse(what: str, expected: str, found: object, hint: str | None = None) -> NnUNetImportError:
        return NnUNetImportError(
            f"{what} is not supported yet", subject=folder / "plans.json", expected=expected, found=str(found), hint=hint
        )

    if config.get("previous_stage") or config.get("next_stage") or configuration in ("3d_lowres", "3d_cascade_fullres"):
        raise refuse(
            f"the nnU-Net cascade (configuration {configuration!r})",
            "2d or 3d_fullres",
            configuration,
            "Train or download the 3d_fullres configuration of this dataset, and import that folder.",
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
    from ..pipelines.nnunet import NORMALIZATION_SCHEMES

    unknown = [s for s in config.get("normalization_schemes", []) if s not in NORMALIZATION_SCHEMES]
    if unknown:
        raise refuse(f"the normalisation {unknown[0]!r}", f"one of {list(NORMALIZATION_SCHEMES)}", unknown[0])


def _resampling_kwargs(config: dict[str, Any], kind: str, defaults: tuple[int, int]) -> dict[str, Any]:
    kwargs = config.get(f"resampling_fn_{kind}_kwargs", {}) or {}
    return {
        "order": int(kwargs.get("order", defaults[0])),
        "order_z": int(kwargs.get("order_z", defaults[1])),
        "force_separate_z": kwargs.get("force_separate_z"),
    }


# ------------------------------------------------------------------------------------------------
# card parts


def sanitise_name(name: str) -> str:
    """A store name from free text: letters, digits, ``._-`` (others become ``-``), at most 64 characters."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._")
    return cleaned[:64] or "nnunet-model"


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


def _labels(pairs: Sequence[tuple[str, int]]) -> tuple[LabelSpec, ...]:
    specs = []
    for name, value in pairs:
        if value == 0:
            continue
        code, category = _terminology(name)
        specs.append(LabelSpec(value, name, PALETTE[(value - 1) % len(PALETTE)], code, category))
    return tuple(specs)


def _normalization(scheme: str, properties: dict[str, Any]) -> Normalization:
    """The DeepSeg scheme closest to nnU-Net's (for the domain check; inference uses the pipeline's own)."""
    if scheme == "CTNormalization":
        return Normalization(
            "ct",
            window=(float(properties["percentile_00_5"]), float(properties["percentile_99_5"])),
            mean=float(properties["mean"]),
            std=max(float(properties["std"]), 1e-8),
        )
    return Normalization("zscore")


def _to_xyz(values_t: Sequence[float], transpose_backward: Sequence[int]) -> tuple[float, float, float]:
    """Values in nnU-Net's transposed axis order -> (x, y, z) of the input arrays."""
    zyx = [float(values_t[transpose_backward[j]]) for j in range(3)]
    return (zyx[2], zyx[1], zyx[0])


def _fingerprint(folder: Path, modality: str, channels: Sequence[str]) -> dict[str, Any]:
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
    data = _read_json(path)
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


# ------------------------------------------------------------------------------------------------
# the importer


def _fold_folders(folder: Path, folds: Sequence[int | str] | None, checkpoint: str) -> list[Path]:
    if folds:
        chosen = [folder / f"fold_{f}" for f in folds]
        missing = [p.name for p in chosen if not (p / checkpoint).is_file()]
        if missing:
            raise NnUNetImportError(
                f"fold(s) without {checkpoint}: {', '.join(missing)}",
                subject=folder,
                expected=f"fold_N/{checkpoint} for every fold asked for",
                found=", ".join(sorted(p.name for p in folder.glob("fold_*/*.pth"))) or "no checkpoints",
            )
        return chosen
    # nnU-Net's auto-detection: every fold_N with the checkpoint, fold_all left out
    numbered = sorted(
        (p for p in folder.glob("fold_*") if p.name[5:].isdigit() and (p / checkpoint).is_file()), key=lambda p: int(p.name[5:])
    )
    if numbered:
        return numbered
    if (folder / "fold_all" / checkpoint).is_file():
        log.info("%s: no fold_N, using fold_all", folder)
        return [folder / "fold_all"]
    raise NnUNetImportError(
        f"no fold_*/{checkpoint} in the nnU-Net model folder",
        subject=folder,
        expected=f"fold_0/{checkpoint} (and more folds)",
        found=", ".join(sorted(str(p.relative_to(folder)) for p in folder.glob("fold_*/*.pth"))) or "no checkpoints",
        hint="Training writes checkpoint_final.pth at its end; use --checkpoint checkpoint_best.pth for an unfinished run.",
    )


def _configuration_name(folder: Path, checkpoints: dict[str, dict[str, Any]], asked: str | None) -> str:
    from_checkpoints = {str((c.get("init_args") or {}).get("configuration")) for c in checkpoints.values()} - {"None"}
    if len(from_checkpoints) > 1:
        raise NnUNetImportError(
            "the folds were trained with different configurations", subject=folder, found=str(sorted(from_checkpoints))
        )
    parts = folder.name.split("__")
    from_folder = parts[2] if len(parts) == 3 else None
    found = next(iter(from_checkpoints), None) or from_folder
    if asked is not None and found is not None and asked != found:
        raise NnUNetImportError(
            f"--configuration {asked} does not match the checkpoints",
            subject=folder,
            expected=found,
            found=asked,
            hint="The configuration comes from the checkpoint's init_args; leave --configuration out.",
        )
    configuration = asked or found
    if configuration is None:
        raise NnUNetImportError(
            "cannot tell which configuration this folder holds",
            subject=folder,
            expected="checkpoints with init_args, or a folder named <Trainer>__<Plans>__<configuration>",
            hint="Give it with --configuration 2d or --configuration 3d_fullres.",
        )
    return configuration


def _existing_version(store: Any, name: str, source_files: dict[str, str]) -> ModelCard | None:
    """A stored version of ``name`` imported from exactly these source files (same folds and checkpoint), if any.

    A fine-tuned version keeps its parent's ``source`` but has a parent version, so it never matches.
    """
    if name not in store.names():
        return None
    for version in store.versions(name):
        card = store.card(f"{name}:{version}")
        source = card.source or {}
        if source.get("format") == "nnunetv2" and source.get("files") == source_files and card.parent_version is None:
            return card
    return None


def import_nnunet(
    folder: str | Path,
    store: Any,
    name: str | None = None,
    activate: bool = True,
    folds: Sequence[int | str] | None = None,
    configuration: str | None = None,
    checkpoint: str | None = None,
) -> ModelCard:
    """Import an nnU-Net v2 trained model folder into ``store``; returns the stored card.

    Args:
        folder: ``<Trainer>__<Plans>__<configuration>`` (dataset.json, plans.json, fold_*/).
        store: a :class:`~deepseg_core.model_store.ModelStore`.
        name: the model's name in the store (default: the plans' dataset name, e.g.
            ``Dataset501_Liver``, made a valid name).
        activate: make the version active.
        folds: the folds to ensemble (default: every ``fold_N`` holding the checkpoint, as nnU-Net).
        configuration: ``2d`` or ``3d_fullres``; only needed when neither the checkpoints nor the
            folder name tell, and it must agree with them.
        checkpoint: ``checkpoint_final.pth`` (default) or ``checkpoint_best.pth``.

    Re-importing the same source files (and options) under the same name returns the version already
    stored instead of adding a duplicate (and activates it when ``activate``).

    Raises:
        NnUNetImportError: what is missing, unsupported or unsafe, and what to do.
    """
    import torch

    from ..nets import NET_REGISTRY, LogitEnsemble, build_net
    from ..nets.nnunet import canonical_state_dict

    folder = Path(folder).resolve()
    checkpoint = checkpoint or CHECKPOINTS[0]
    if Path(checkpoint).name != checkpoint or not checkpoint.endswith(".pth"):
        raise NnUNetImportError("invalid checkpoint name", expected=" or ".join(CHECKPOINTS), found=checkpoint)
    dataset = _read_json(folder / "dataset.json")
    plans = _read_json(folder / "plans.json")
    label_pairs = _check_labels(dataset, folder)
    fold_dirs = _fold_folders(folder, folds, checkpoint)
    files_read = [folder / "dataset.json", folder / "plans.json", *(p / checkpoint for p in fold_dirs)]
    if (folder / "dataset_fingerprint.json").is_file():
        files_read.append(folder / "dataset_fingerprint.json")
    source_files = {str(p.relative_to(folder)): sha256_file(p) for p in files_read}
    model_name = name or sanitise_name(str(plans.get("dataset_name") or dataset.get("name") or folder.parent.name))
    if not NAME_PATTERN.match(model_name):
        raise NnUNetImportError(
            "invalid model name",
            expected="letters, digits, '.', '_', '-' (at most 64, starting with a letter or digit)",
            found=model_name,
        )
    member_names = [p.name for p in fold_dirs]
    # the files' names carry the folds and checkpoint chosen, their hashes everything else
    existing = _existing_version(store, model_name, source_files)
    if existing is not None and configuration in (None, existing.source.get("configuration")):
        log.info("%s is already stored as %s (same source files)", folder, existing.ref)
        if activate:
            store.activate(existing.ref)
        return existing

    checkpoints = {p.name: _essentials(load_checkpoint(p / checkpoint)) for p in fold_dirs}
    configuration = _configuration_name(folder, checkpoints, configuration)

    config = resolve_configuration(plans, configuration)
    _check_configuration(config, configuration, plans, folder)
    if "architecture" not in config:
        config["architecture"] = _legacy_architecture(config)
    channels = [
        str(v) for _, v in sorted(dataset.get("channel_names", dataset.get("modality", {})).items(), key=lambda kv: int(kv[0]))
    ]
    if not channels:
        raise NnUNetImportError("dataset.json has no channel_names", subject=folder / "dataset.json")
    num_classes = len(label_pairs)
    first = checkpoints[member_names[0]]
    net_name, net_config = network_config(config["architecture"], len(channels), num_classes, _network_weights(first))
    net_config = to_dict(from_dict(NET_REGISTRY[net_name][0], net_config))  # normalised: every field, checked
    members = {}
    for member in member_names:
        net = build_net(net_name, net_config)
        state = canonical_state_dict(_network_weights(checkpoints[member]), net, f"{member}/{checkpoint}")
        net.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}, strict=True)
        members[member] = net.eval()
    ensemble = LogitEnsemble(members)

    transpose_forward = [int(a) for a in plans.get("transpose_forward", [0, 1, 2])]
    transpose_backward = [int(a) for a in plans.get("transpose_backward", [0, 1, 2])]
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
    mirroring = first.get("inference_allowed_mirroring_axes")
    spacing = [float(s) for s in config["spacing"]]
    patch = [int(p) for p in config["patch_size"]]
    modality = "CT" if schemes[0] == "CTNormalization" else "MR"
    if len(spacing) == 3:
        spacing_xyz = _to_xyz(spacing, transpose_backward)
        patch_zyx = tuple(patch)
    else:
        # a 2D model keeps each image's slice spacing; the fingerprint's median stands in for the card
        median = plans.get("original_median_spacing_after_transp") or [spacing[0], *spacing]
        spacing_xyz = _to_xyz([float(median[0]), *spacing], transpose_backward)
        patch_zyx = (1, *patch)
    pipeline_config = {
        "configuration": configuration,
        "transpose_forward": transpose_forward,
        "transpose_backward": transpose_backward,
        "spacing": spacing,
        "patch_size": patch,
        "normalization_schemes": schemes,
        "use_mask_for_norm": [bool(u) for u in config.get("use_mask_for_norm", [False] * len(schemes))],
        "foreground_intensity_properties_per_channel": {
            str(c): {k: float(v) for k, v in properties.get(str(c), {}).items()} for c in range(len(channels))
        },
        "resampling_data": _resampling_kwargs(config, "data", (3, 0)),
        "resampling_seg": _resampling_kwargs(config, "seg", (1, 0)),
        "resampling_probabilities": _resampling_kwargs(config, "probabilities", (1, 0)),
        "anisotropy_threshold": 3.0,
        "tile_step_size": 0.5,
        "allowed_mirroring_axes": [int(a) for a in mirroring] if mirroring is not None else None,
        "label_values": [v for _, v in label_pairs],
    }
    parts = folder.name.split("__")
    trainer = str(first.get("trainer_name") or (parts[0] if len(parts) == 3 else "unknown"))
    plans_name = str(plans.get("plans_name") or (parts[1] if len(parts) == 3 else "unknown"))
    card = ModelCard(
        name=model_name,
        version=1,
        architecture=Architecture(net_name, net_config),
        inputs=Inputs(modality=modality, channels=tuple(channels)),
        labels=_labels(label_pairs),
        preprocessing=Preprocessing(spacing_xyz, _normalization(schemes[0], properties.get("0", {}))),
        inference=InferenceDefaults(patch_size_zyx=patch_zyx, overlap=0.5, batch_size=2),  # type: ignore[arg-type]
        weights_sha256="0" * 64,
        description=f"nnU-Net v2 model {plans.get('dataset_name', model_name)} ({configuration}, {trainer}, {plans_name}, "
        f"{', '.join(member_names)}), imported from {folder}",
        fingerprint=_fingerprint(folder, modality, channels),
        source={
            "format": "nnunetv2",
            "path": str(folder),
            "files": source_files,
            "configuration": configuration,
            "trainer_name": trainer,
            "plans_name": plans_name,
            "folds": member_names,
            "checkpoint": checkpoint,
        },
        pipeline={"name": "nnunetv2", "config": pipeline_config},
        ensemble=tuple(member_names),
    )
    stored = store.add_version(card, ensemble, activate=activate)
    log.info("imported %s from %s (%s, folds %s)", stored.ref, folder, configuration, member_names)
    return stored


def _essentials(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What the import uses of a checkpoint (nnU-Net's predictor uses the same): the network weights, the
    configuration, the trainer's name and the allowed mirroring axes. The optimiser state is let go at once."""
    init_args = checkpoint.get("init_args") or {}
    return {
        "network_weights": checkpoint["network_weights"],
        "init_args": {"configuration": init_args.get("configuration")},
        "trainer_name": checkpoint.get("trainer_name"),
        "inference_allowed_mirroring_axes": checkpoint.get("inference_allowed_mirroring_axes"),
    }


def _network_weights(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``network_weights`` with DDP / compile wrappers' prefixes removed (nnU-Net saves without them)."""
    weights = checkpoint["network_weights"]
    for prefix in ("module.", "_orig_mod."):
        if weights and all(k.startswith(prefix) for k in weights):
            weights = {k[len(prefix) :]: v for k, v in weights.items()}
    return weights


__all__ = ["NnUNetImportError", "import_nnunet", "load_checkpoint", "network_config", "resolve_configuration", "sanitise_name"]
