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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...model_card import Architecture, InferenceDefaults, Inputs, ModelCard, Preprocessing
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
        folder: ``<Trainer>__<Plans>__<configuration>`` (dataset.json, plans.json, fold_*/).
        store: a :class:`~deepseg_core.model_store.ModelStore`.
        name: the model's name in the store (default: the plans' dataset name, e.g.
            ``Dataset501_Liver``, made a valid name).
        activate: make the version active.
        folds: the folds to ensemble (default: every ``fold_N`` holding the checkpoint, as nnU-Net).
        configuration: ``2d``, ``3d_fullres`` or ``3d_lowres``; only needed when neither the checkpoints nor the
            folder name tell, and it must agree with them.
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
    existing = _existing_version(store, stored_name, files, reorient)
    if existing is not None and configuration in (None, existing.source.get("configuration")):
        log.info("%s is already stored as %s (same source files)", folder, existing.ref)
        if activate:
            store.activate(existing.ref)
        return existing

    checkpoints = {p.name: essentials(load_checkpoint(p / checkpoint)) for p in fold_dirs}
    configuration = configuration_name(folder, checkpoints, configuration)
    architecture, ensemble, settings, channels = _network_and_settings(
        folder, plans, dataset, configuration, outputs, checkpoints, checkpoint
    )
    settings["reorient"] = reorient
    source = _source(folder, files, configuration, checkpoints[ensemble.names[0]], plans, ensemble.names, checkpoint)
    card = _card(stored_name, folder, plans, architecture, channels, outputs, settings, source)
    stored = store.add_version(card, ensemble, activate=activate)
    log.info("imported %s from %s (%s, folds %s)", stored.ref, folder, configuration, ensemble.names)
    return stored


def _network_and_settings(
    folder: Path,
    plans: dict[str, Any],
    dataset: dict[str, Any],
    configuration: str,
    outputs: OutputLabels,
    checkpoints: dict[str, dict[str, Any]],
    checkpoint: str,
) -> tuple[Architecture, LogitEnsemble, dict[str, Any], list[str]]:
    """The configuration resolved and checked, the network with every fold's weights, the pipeline settings, the
    input channels' names."""
    config = resolve_configuration(plans, configuration)
    check_configuration(config, configuration, plans, folder)
    if "architecture" not in config:
        config["architecture"] = legacy_architecture(config)
    channels = channel_names(dataset, folder)
    for state in checkpoints.values():
        check_output_channels(network_weights(state), outputs, folder)
    net_name, net_config, ensemble = build_ensemble(
        config["architecture"], len(channels), outputs.channels, checkpoints, checkpoint
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


def _existing_version(store: Any, name: str, files: dict[str, str], reorient: str) -> ModelCard | None:
    """A stored version of ``name`` imported from exactly these source files (same folds and checkpoint) with the
    same reorientation, if any.

    A fine-tuned version keeps its parent's ``source`` but has a parent version, so it never matches.
    """
    if name not in store.names():
        return None
    for version in store.versions(name):
        card = store.card(f"{name}:{version}")
        source = card.source or {}
        same_reorient = ((card.pipeline or {}).get("config") or {}).get("reorient", "none") == reorient
        if source.get("format") == "nnunetv2" and source.get("files") == files and same_reorient and card.parent_version is None:
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
