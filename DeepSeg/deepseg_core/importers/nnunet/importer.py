"""The importer: an nnU-Net v2 trained model folder -> a new model version in the store.

Read the folder (:mod:`.source`), load the folds' checkpoints safely (:mod:`.checkpoint`), resolve
and check the configuration and derive the pipeline settings (:mod:`.plans`), rebuild the network
with every fold's weights (:mod:`.network`), then store a card (:mod:`.card`) whose ``source``
records the folder, the SHA-256 of every file read, configuration, trainer, plans, folds and
checkpoint. Importing the same files again returns the version already stored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...model_card import Architecture, InferenceDefaults, Inputs, ModelCard, Preprocessing
from ...model_store import sha256_file
from .card import (
    OutputLabels,
    channel_names,
    check_labels,
    check_output_channels,
    fingerprint,
    grid_defaults,
    label_specs,
    model_name,
    normalization,
)
from .checkpoint import essentials, load_checkpoint, network_weights
from .network import build_ensemble, legacy_architecture
from .plans import check_configuration, pipeline_config, resolve_configuration
from .source import NnUNetImportError, checkpoint_name, configuration_name, fold_folders, name_parts, read_json, source_files

if TYPE_CHECKING:
    from torch import nn

    from ...nets import LogitEnsemble

# the package's name, not this module's: log lines keep the name they had before the package was split
log = logging.getLogger(__package__)


def import_nnunet(
    folder: str | Path,
    store: Any,
    name: str | None = None,
    activate: bool = True,
    folds: Sequence[int | str] | None = None,
    configuration: str | None = None,
    checkpoint: str | None = None,
    reorient: str | None = None,
) -> ModelCard:
    """Import an nnU-Net v2 trained model folder into ``store``; returns the stored card.

    Args:
        folder: ``<Trainer>__<Plans>__<configuration>`` (dataset.json, plans.json, fold_*/). For the cascade's
            ``3d_cascade_fullres``, its first stage ``<Trainer>__<Plans>__3d_lowres`` must lie beside it.
        store: a :class:`~deepseg_core.model_store.ModelStore`.
        name: the model's name in the store (default: the plans' dataset name, e.g.
            ``Dataset501_Liver``, made a valid name).
        activate: make the version active.
        folds: the folds to ensemble (default: every ``fold_N`` holding the checkpoint, as nnU-Net).
        configuration: ``2d``, ``3d_fullres``, ``3d_lowres`` or ``3d_cascade_fullres``; only needed when
            neither the checkpoints nor the folder name tell, and it must agree with them.
        checkpoint: ``checkpoint_final.pth`` (default) or ``checkpoint_best.pth``.
        reorient: ``none`` (default: the voxels as read, as ``nnUNetPredictor``) or ``ras``: the voxel
            axes permuted and flipped to the closest RAS orientation before nnU-Net's preprocessing
            and back after its export, as TotalSegmentator does (its models are trained so).

    Re-importing the same source files (and options) under the same name returns the version already
    stored instead of adding a duplicate (and activates it when ``activate``).

    Raises:
        NnUNetImportError: what is missing, unsupported or unsafe, and what to do.
    """
    folder = Path(folder).resolve()
    checkpoint = checkpoint_name(checkpoint)
    reorient = _reorient_option(reorient)
    dataset = read_json(folder / "dataset.json")
    plans = read_json(folder / "plans.json")
    outputs = check_labels(dataset, folder)
    fold_dirs = fold_folders(folder, folds, checkpoint)
    files = source_files(folder, fold_dirs, checkpoint)
    stored_name = model_name(name, plans, dataset, folder)
    # the files' names carry the folds and checkpoint chosen, their hashes everything else
    existing = _existing_version(store, stored_name, folder, files, reorient)
    if existing is not None and configuration in (None, existing.source.get("configuration")):
        log.info("%s is already stored as %s (same source files)", folder, existing.ref)
        if activate:
            store.activate(existing.ref)
        return existing

    checkpoints = {p.name: essentials(load_checkpoint(p / checkpoint)) for p in fold_dirs}
    configuration = configuration_name(folder, checkpoints, configuration)
    first_stage = _first_stage(folder, plans, dataset, configuration, outputs, [p.name for p in fold_dirs], checkpoint)
    architecture, ensemble, settings, channels = _network_and_settings(
        folder, plans, dataset, configuration, outputs, checkpoints, checkpoint, first_stage is not None
    )
    settings["reorient"] = reorient
    net: nn.Module = ensemble
    if first_stage is not None:
        from ...nets import CascadeNetwork

        first_stage.settings["pipeline"]["config"]["reorient"] = reorient
        settings["previous_stage"] = first_stage.settings
        files.update(first_stage.files)
        net = CascadeNetwork(ensemble, first_stage.ensemble)
    source = _source(folder, files, configuration, checkpoints[ensemble.names[0]], plans, ensemble.names, checkpoint)
    if first_stage is not None:
        source["previous_stage"] = {"path": str(first_stage.folder), "configuration": first_stage.configuration}
    card = _card(stored_name, folder, plans, architecture, channels, outputs, settings, source)
    stored = store.add_version(card, net, activate=activate)
    log.info("imported %s from %s (%s, folds %s)", stored.ref, folder, configuration, ensemble.names)
    return stored


@dataclass
class _FirstStage:
    """A cascade's first stage: where it came from, its network and what the card keeps of it."""

    folder: Path
    configuration: str
    ensemble: LogitEnsemble
    settings: dict[str, Any]
    files: dict[str, str]


def _first_stage(
    folder: Path,
    plans: dict[str, Any],
    dataset: dict[str, Any],
    configuration: str,
    outputs: OutputLabels,
    fold_names: list[str],
    checkpoint: str,
) -> _FirstStage | None:
    """The first stage of a cascade's second stage (nnU-Net's ``3d_cascade_fullres``), None for other configurations.

    nnU-Net keeps it beside the second stage, in ``<Trainer>__<Plans>__<previous_stage>``; the same folds are
    ensembled (each of the second stage's folds was trained on its own fold's first-stage predictions).
    """
    config = resolve_configuration(plans, configuration)
    previous = config.get("previous_stage")
    if previous is None:
        return None
    check_configuration(config, configuration, plans, folder)  # what the plans ask for, before the folder beside
    parts = name_parts(folder)
    first_folder = folder.parent / f"{parts[0]}__{parts[1]}__{previous}" if parts else None
    if first_folder is None or not first_folder.is_dir():
        raise NnUNetImportError(
            f"{configuration} is the second stage of nnU-Net's cascade: it needs its first stage ({previous}) beside it",
            subject=folder,
            expected=str(first_folder or f"<Trainer>__<Plans>__{previous} next to <Trainer>__<Plans>__{configuration}"),
            found="no such folder",
            hint=f"Put the {previous} results folder of the same trainer and plans next to this one (as nnU-Net "
            "writes them), or import the 3d_fullres folder instead.",
        )
    if outputs.regions:
        raise NnUNetImportError(
            "a region-based cascade is not supported yet",
            subject=folder,
            expected="a cascade of plain labels, or a region-based 3d_fullres or 3d_lowres folder",
            found=str([name for name, _ in outputs.regions]),
        )
    first_dataset = read_json(first_folder / "dataset.json")
    first_outputs = check_labels(first_dataset, first_folder)
    for what, ours, theirs in (
        ("has other labels", outputs, first_outputs),
        ("reads other input channels", channel_names(dataset, folder), channel_names(first_dataset, first_folder)),
    ):
        if ours != theirs:
            raise NnUNetImportError(
                f"the cascade's first stage {what} than its second stage",
                subject=first_folder / "dataset.json",
                expected=str(ours),
                found=str(theirs),
            )
    try:
        first_dirs = fold_folders(first_folder, [name.removeprefix("fold_") for name in fold_names], checkpoint)
    except NnUNetImportError as exc:
        raise NnUNetImportError(
            f"the cascade's first stage ({previous}) lacks the second stage's folds: {exc}",
            subject=first_folder,
            hint="Each fold of the second stage runs after the same fold of the first; import the folds both have (--folds).",
        ) from None
    first_checkpoints = {p.name: essentials(load_checkpoint(p / checkpoint)) for p in first_dirs}
    first_configuration = configuration_name(first_folder, first_checkpoints, None)
    if first_configuration != previous:
        raise NnUNetImportError(
            f"the first stage's checkpoints are not of configuration {previous}",
            subject=first_folder,
            expected=str(previous),
            found=first_configuration,
        )
    first_plans = read_json(first_folder / "plans.json")
    architecture, ensemble, settings, _ = _network_and_settings(
        first_folder, first_plans, first_dataset, str(previous), outputs, first_checkpoints, checkpoint
    )
    files = {
        f"../{first_folder.name}/{path}": digest for path, digest in source_files(first_folder, first_dirs, checkpoint).items()
    }
    description = {
        "architecture": {"name": architecture.name, "config": architecture.config},
        "ensemble": list(ensemble.names),
        "pipeline": {"name": "nnunetv2", "config": settings},
        "patch_size_zyx": list(grid_defaults(settings, first_plans)[1]),
    }
    return _FirstStage(first_folder, str(previous), ensemble, description, files)


def _network_and_settings(
    folder: Path,
    plans: dict[str, Any],
    dataset: dict[str, Any],
    configuration: str,
    outputs: OutputLabels,
    checkpoints: dict[str, dict[str, Any]],
    checkpoint: str,
    second_stage: bool = False,
) -> tuple[Architecture, LogitEnsemble, dict[str, Any], list[str]]:
    """The configuration resolved and checked, the network with every fold's weights, the pipeline settings, the
    input channels' names. A cascade's ``second_stage`` network reads one more channel per foreground label."""
    config = resolve_configuration(plans, configuration)
    check_configuration(config, configuration, plans, folder)
    if "architecture" not in config:
        config["architecture"] = legacy_architecture(config)
    channels = channel_names(dataset, folder)
    for state in checkpoints.values():
        check_output_channels(network_weights(state), outputs, folder)
    # nnU-Net's determine_num_input_channels: the image's channels, and for a cascade's second stage one per
    # foreground label of the first stage's segmentation
    in_channels = len(channels) + (len(outputs.pairs) if second_stage else 0)
    net_name, net_config, ensemble = build_ensemble(
        config["architecture"], in_channels, outputs.channels, checkpoints, checkpoint
    )
    mirroring = checkpoints[ensemble.names[0]].get("inference_allowed_mirroring_axes")
    settings = pipeline_config(plans, config, configuration, channels, outputs, mirroring, folder)
    return Architecture(net_name, net_config), ensemble, settings, channels


def _reorient_option(reorient: str | None) -> str:
    """The ``reorient`` option (``none`` when not given), checked before anything is read."""
    from ...pipelines.nnunet.orientation import REORIENTATIONS

    value = "none" if reorient is None else str(reorient).lower()
    if value not in REORIENTATIONS:
        raise NnUNetImportError(
            "unknown --reorient value",
            expected=" or ".join(REORIENTATIONS),
            found=str(reorient),
            hint="'ras' reorients the image to the closest RAS orientation before nnU-Net and back after it, as "
            "TotalSegmentator does (use it for TotalSegmentator's models); 'none' keeps nnU-Net's own behaviour.",
        )
    return value


def _existing_version(store: Any, name: str, folder: Path, files: dict[str, str], reorient: str) -> ModelCard | None:
    """A stored version of ``name`` imported from exactly these source files (same folds and checkpoint) with the
    same reorientation, if any. A cascade's first-stage files (``../<folder>/...``) must be unchanged too.

    A fine-tuned version keeps its parent's ``source`` but has a parent version, so it never matches.
    """
    if name not in store.names():
        return None
    for version in store.versions(name):
        card = store.card(f"{name}:{version}")
        source = card.source or {}
        same_reorient = ((card.pipeline or {}).get("config") or {}).get("reorient", "none") == reorient
        if source.get("format") != "nnunetv2" or not same_reorient or card.parent_version is not None:
            continue
        stored = dict(source.get("files") or {})
        beside = {path: stored.pop(path) for path in [p for p in stored if p.startswith("../")]}
        if stored == files and all((folder / path).is_file() and sha256_file(folder / path) == h for path, h in beside.items()):
            return card
    return None


def _source(
    folder: Path,
    files: dict[str, str],
    configuration: str,
    first: dict[str, Any],
    plans: dict[str, Any],
    members: Sequence[str],
    checkpoint: str,
) -> dict[str, Any]:
    """The card's ``source``: where the model came from, every file read with its SHA-256, and the choices made."""
    parts = name_parts(folder)
    return {
        "format": "nnunetv2",
        "path": str(folder),
        "files": files,
        "configuration": configuration,
        "trainer_name": str(first.get("trainer_name") or (parts[0] if parts else "unknown")),
        "plans_name": str(plans.get("plans_name") or (parts[1] if parts else "unknown")),
        "folds": list(members),
        "checkpoint": checkpoint,
    }


def _card(
    name: str,
    folder: Path,
    plans: dict[str, Any],
    architecture: Architecture,
    channels: Sequence[str],
    outputs: OutputLabels,
    settings: dict[str, Any],
    source: dict[str, Any],
) -> ModelCard:
    """The card of the imported model (version 1 until the store numbers it; the store fills in the weights' hash)."""
    schemes = settings["normalization_schemes"]
    modality = "CT" if schemes[0] == "CTNormalization" else "MR"
    spacing_xyz, patch_zyx = grid_defaults(settings, plans)
    members = source["folds"]
    what = f"{source['configuration']}, {source['trainer_name']}, {source['plans_name']}, {', '.join(members)}"
    if outputs.regions:
        what += ", regions " + ", ".join(f"{name} {list(values)}" for name, values in outputs.regions)
    if source.get("previous_stage"):
        what += f", the second stage of a cascade after {source['previous_stage']['configuration']}"
    if settings.get("reorient") == "ras":
        what += ", reoriented to the closest RAS orientation"
    return ModelCard(
        name=name,
        version=1,
        architecture=architecture,
        inputs=Inputs(modality=modality, channels=tuple(channels)),
        labels=label_specs(outputs.pairs),
        preprocessing=Preprocessing(
            spacing_xyz, normalization(schemes[0], settings["foreground_intensity_properties_per_channel"]["0"])
        ),
        # one tile at a time, as nnU-Net's predictor runs them: a second 128^3 tile costs ~1.5 GB for
        # little speed on a CPU (`--batch-size` overrides it at segment time)
        inference=InferenceDefaults(patch_size_zyx=patch_zyx, overlap=0.5, batch_size=1),  # type: ignore[arg-type]
        weights_sha256="0" * 64,
        description=f"nnU-Net v2 model {plans.get('dataset_name', name)} ({what}), imported from {folder}",
        fingerprint=fingerprint(folder, modality, channels),
        source=source,
        pipeline={"name": "nnunetv2", "config": settings},
        ensemble=tuple(members),
    )
