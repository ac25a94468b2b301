"""Train a new model version from a dataset: fine-tune a base version (or start from scratch),
validate on the dataset's fixed split, checkpoint every epoch, resume after a kill, and store the
result as a new immutable version whose card records its parent and both models' metrics.

Checkpoints (``CHECKPOINT_DIR/last`` and ``/best``) hold the weights and the optimiser tensors as
safetensors and everything else (epoch, scheduler, history, world size) as JSON, plus one
``ranks/rank-R.json`` per process with that process's random state (numpy generator of the patch
sampler and augmentation, torch CPU / CUDA generators of dropout, Python ``random``). Rank 0
gathers the states and writes them inside the same atomic checkpoint swap, and each rank restores
its own on resume, so resuming replays exactly the run that was interrupted, also under
``torchrun``: the epoch in flight at the kill is recomputed from the same random state and the
result equals an uninterrupted run (bit for bit on the CPU; on CUDA, cuDNN's backward passes are
not deterministic).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import random
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import distributed, domain_shift, metrics
from ..config import to_dict
from ..datasets import Dataset, DatasetError
from ..errors import ConfigError, DeepSegError
from ..fileutil import LockHeld, cancel_deferred, exclusive_lock
from ..inference import Segmenter, SegmentOptions
from ..inference.pipelines import Pipeline, pipeline_for
from ..io import Volume
from ..losses import COMPOUND_LOSSES, DEFAULT_LOSS, DeepSupervisionLoss, RegionDiceBCELoss, build_loss
from ..model_card import (
    Architecture,
    InferenceDefaults,
    Inputs,
    ModelCard,
    Normalization,
    Preprocessing,
    Region,
    created_now,
)
from ..model_store import ModelStore, load_network, resolve_model
from ..nets import UNetConfig, build_net
from ..preprocessing import ct_normalization, intensity_fingerprint
from .augment import AugmentConfig
from .checkpoints import (
    any_rank,
    check_resumable,
    check_same_network,
    check_same_run,
    forget_best,
    forget_staged,
    gather_random_states,
    load_checkpoint,
    mark_stored,
    network_description,
    random_state,
    restore_random_state,
    run_id_of,
    save_checkpoint,
    stage_checkpoint,
    swap_in_checkpoint,
)
from .loop import network_batch, optimisation_step
from .patches import PatchSampler, TrainingCase

log = logging.getLogger(__name__)
EventCallback = Callable[[dict[str, Any]], None]


class Stopped(Exception):
    """The caller's stop callback asked to stop; the last checkpoint is kept for ``resume``."""


@dataclass(frozen=True)
class RetrainConfig:
    """A training run on a dataset.

    Attributes:
        epochs: epochs of ``steps_per_epoch`` optimiser steps.
        batch_size: patches per step.
        learning_rate: AdamW learning rate, cosine-decayed to 5 % (fine-tuning wants it lower).
        loss: loss registry name; the dataset's ignore value is passed as ``ignore_index``.
        arch: ``3d``, ``2.5d`` or ``2d`` for a model from scratch (ignored when fine-tuning).
        freeze_encoder_epochs: keep the encoder fixed for the first epochs of a fine-tune.
        validate_every: validate on the fixed split every N epochs (and after the last).
        foreground_fraction: share of patches centred on foreground.
        augment: augmentation settings.
        seed: everything random derives from it.
        label_mapping: dataset label name -> base model label name, for a fine-tune whose dataset
            names its labels differently (labels with equal names need no entry).
        dropout: dropout probability after every conv of the U-Net (``mc_dropout`` uncertainty
            needs > 0). None keeps the base's (0 from scratch). On a fine-tune a different value
            rebuilds the base with (or without) the dropout layers: they hold no weights, so every
            weight of the base is carried over.
    """

    epochs: int = 10
    steps_per_epoch: int = 20
    batch_size: int = 2
    learning_rate: float = 5e-4
    weight_decay: float = 1e-4
    loss: str = "dice_ce"
    arch: str = "3d"
    freeze_encoder_epochs: int = 0
    validate_every: int = 1
    foreground_fraction: float = 0.6
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    seed: int = 0
    label_mapping: dict[str, str] = field(default_factory=dict)
    dropout: float | None = None

    def __post_init__(self) -> None:
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError("invalid dropout", expected="a probability in [0, 1)", found=repr(self.dropout))


def match_labels(dataset: Dataset, card: ModelCard, mapping: dict[str, str] | None = None) -> dict[int, int]:
    """Dataset label value -> model output value, by name (case-insensitive) after ``mapping``.

    Raises :class:`ConfigError` saying how the label sets differ and which ``--map-label`` entries
    would match them (same terminology code, else same value), when a dataset label has no model
    label. Model labels the dataset lacks are allowed: their voxels count as background there.
    """
    mapping = mapping or {}
    by_name = {label.name.lower(): label for label in card.labels}
    unknown_keys = sorted(set(mapping) - {label.name for label in dataset.labels})
    if unknown_keys:
        raise ConfigError(
            "label mapping names labels the dataset does not have",
            expected=f"dataset labels {[x.name for x in dataset.labels]}",
            found=str(unknown_keys),
        )
    values: dict[int, int] = {}
    unmatched = []
    for label in dataset.labels:
        target = by_name.get(mapping.get(label.name, label.name).lower())
        if target is None:
            unmatched.append(label)
        else:
            values[label.value] = target.value
    if unmatched:
        suggestions = []
        for label in unmatched:
            same_code = [x for x in card.labels if label.code is not None and x.code == label.code]
            same_value = [x for x in card.labels if x.value == label.value]
            guess = (same_code or same_value or [None])[0]
            if guess is not None:
                suggestions.append(f"--map-label '{label.name}={guess.name}'")
        raise ConfigError(
            f"the dataset's labels {[x.name for x in unmatched]} are not labels of the base model {card.ref}",
            expected=f"model labels {[x.name for x in card.labels]}",
            found=f"dataset labels {[x.name for x in dataset.labels]}",
            hint=(
                "Map them onto the model's labels: " + " ".join(suggestions) + "."
                if suggestions
                else "Map each one with --map-label 'DATASET NAME=MODEL NAME', or train from scratch (omit --base)"
                " for new classes."
            ),
        )
    if len(set(values.values())) != len(values):
        raise ConfigError("two dataset labels map onto the same model label", found=str(mapping))
    return values


def _label_lut(value_map: dict[int, int] | None, ignore_value: int | None) -> np.ndarray | None:
    """Lookup table dataset value -> model value (unmapped values -> 0, the ignore value kept), or None for identity."""
    if value_map is None or all(k == v for k, v in value_map.items()):
        return None
    lut = np.zeros(256, dtype=np.uint8)
    for dataset_value, model_value in value_map.items():
        lut[dataset_value] = model_value
    if ignore_value is not None:
        lut[ignore_value] = ignore_value
    return lut


LoadedCase = tuple[list[Volume], Volume]


def _card_pipeline(card: ModelCard) -> Pipeline:
    """The card's pipeline (DeepSeg's own, or the imported model's tool's), for its network's dimensions."""
    config = card.architecture.config
    return pipeline_for(card, int(config.get("spatial_dims", 3)), int(config.get("context_slices", 1)))


def _prepare_cases(
    loaded: dict[str, LoadedCase], card: ModelCard, ignore_value: int | None, value_map: dict[int, int] | None = None
) -> list[TrainingCase]:
    """Cases as the card's pipeline prepares them (DeepSeg's own: resampled to the card's spacing and
    normalised as the card says; an imported model's: as its original tool does); labels in model values."""
    pipeline = _card_pipeline(card)
    out = []
    lut = _label_lut(value_map, ignore_value)
    for case_id, (images, label) in loaded.items():
        image, labels = pipeline.prepare_training_case(images, label)
        labels = labels.astype(np.uint8)
        if lut is not None:
            labels = lut[labels]
        out.append(TrainingCase(image.astype(np.float32), labels, name=case_id, ignore_value=ignore_value))
    return out


def training_objective(
    card: ModelCard,
    config: RetrainConfig,
    ignore_value: int | None,
    *,
    across_ranks: bool = False,
    class_weights: Sequence[float] | None = None,
) -> DeepSupervisionLoss:
    """What a run of ``config`` on ``card`` minimises: its loss on every deep-supervision output.

    The loss is ``config.loss`` with the dataset's ignore value. The card's pipeline says how it is
    weighed (:class:`~deepseg_core.inference.pipelines.TrainingScheme`): DeepSeg's own models weigh
    outputs ``1, 1/2, 1/4, ...``; an imported nnU-Net model trains as nnU-Net's trainer trains it, with
    Dice terms per batch or per sample as its plans say, the lowest-resolution output weighted 0 and
    targets down-sampled ``nearest-exact``. A region-based nnU-Net model trains with nnU-Net's region
    loss (:class:`~deepseg_core.losses.sigmoid_regions.RegionDiceBCELoss`), as its sigmoid channels
    need: softmax losses would train them as exclusive labels. ``across_ranks`` (a DDP run): Dice and
    Tversky terms counted per batch count the global batch, all ranks' (nnU-Net's trainer does so).
    ``class_weights``: one per output channel, for the weighted cross-entropy terms (``wce``, ``dice_wce``);
    a run computes them from its training labels (:func:`class_weights_from_labels`).

    Raises:
        ConfigError: a loss the model cannot train (before anything is written).
    """
    pipeline = _card_pipeline(card)
    scheme = pipeline.training_scheme
    batch_dice = scheme.dice_reduction != "sample"
    loss = (
        _region_loss(card, pipeline, config, ignore_value, batch_dice=batch_dice, across_ranks=across_ranks)
        if pipeline.region_values
        else build_loss(
            config.loss, **_loss_options(config.loss, scheme.dice_reduction, ignore_value, across_ranks, class_weights)
        )
    )
    return DeepSupervisionLoss(loss, drop_lowest=scheme.drop_lowest_output, target_sampling=scheme.target_sampling)


#: losses whose terms count overlap (and take ``reduction``: batch or sample)
_OVERLAP_TERMS = ("dice", "tversky")


def _loss_options(
    name: str,
    dice_reduction: str | None,
    ignore_value: int | None,
    across_ranks: bool = False,
    class_weights: Sequence[float] | None = None,
) -> dict[str, Any]:
    """``build_loss`` options: the ignore value, the weighted cross-entropy's class weights, and the Dice /
    Tversky terms' reduction when the scheme sets one and whether they count all ranks' batches."""
    options: dict[str, Any] = {"ignore_index": ignore_value} if ignore_value is not None else {}
    if _weighs_classes(name):
        if class_weights is None:
            raise ConfigError(
                f"loss {name!r} weighs the cross-entropy per class, and no class weights were given",
                expected="one weight per output channel (a training run computes them from its labels)",
            )
        if name == "wce":
            options["class_weights"] = list(class_weights)
        else:
            options["wce"] = {"class_weights": list(class_weights)}
    overlap: dict[str, Any] = {"reduction": dice_reduction} if dice_reduction is not None else {}
    if across_ranks:
        overlap["across_ranks"] = True
    if not overlap:
        return options
    if name in _OVERLAP_TERMS:
        options.update(overlap)
    for term in COMPOUND_LOSSES.get(name, ()):
        if term in _OVERLAP_TERMS:
            options[term] = dict(overlap)
    return options


def _weighs_classes(loss: str) -> bool:
    """Whether ``loss`` (a registry name) is or holds the weighted cross-entropy, which needs class weights."""
    return "wce" in (loss, *COMPOUND_LOSSES.get(loss, ()))


#: the largest weight :func:`class_weights_from_labels` gives a class (the median class weighs 1)
MAX_CLASS_WEIGHT = 100.0


def class_weights_from_labels(labels: Iterable[np.ndarray], channels: int, ignore_value: int | None = None) -> list[float]:
    """Median-frequency class weights for the weighted cross-entropy: ``median(f) / f_c`` for each of the
    ``channels`` model label values ``0 .. channels - 1``, ``f_c`` its share of the labelled voxels of
    ``labels`` (``(Z, Y, X)`` arrays in model values; the ignore value left out), at most ``MAX_CLASS_WEIGHT``.
    A rare lesion thus weighs far more than the background; a class absent from every case gets the largest
    weight of those present."""
    counts = np.zeros(channels, np.float64)
    for label in labels:
        values = np.bincount(np.asarray(label, np.int64).ravel(), minlength=max(channels, 256))
        if ignore_value is not None and ignore_value < len(values):
            values[ignore_value] = 0
        counts += values[:channels]
    present = counts > 0
    if not present.any():
        return [1.0] * channels
    frequency = counts / counts.sum()
    weights = np.where(present, np.median(frequency[present]) / np.where(present, frequency, 1.0), 0.0)
    # a class of a few voxels would weigh 1e5 and its steps swamp every other's: capped at MAX_CLASS_WEIGHT
    weights = np.minimum(weights, MAX_CLASS_WEIGHT)
    weights[~present] = weights[present].max()
    return [float(w) for w in weights]


def _region_loss(
    card: ModelCard, pipeline: Pipeline, config: RetrainConfig, ignore_value: int | None, batch_dice: bool, across_ranks: bool
) -> RegionDiceBCELoss:
    if config.loss != DEFAULT_LOSS:
        raise ConfigError(
            f"{card.ref} is a region-based nnU-Net model: it trains with nnU-Net's Dice + BCE over its regions",
            expected=f"the default loss ({DEFAULT_LOSS}), which such a model replaces with nnU-Net's region loss",
            found=f"--loss {config.loss}",
            hint="Leave --loss out: softmax losses cannot train sigmoid regions.",
        )
    problems = pipeline.region_training_problems()
    if problems:
        raise ConfigError(
            f"{card.ref}: its label values cannot train its regions ({'; '.join(problems)})",
            expected="regions_class_order values that are each their own region's value and no later region's",
            found=str(pipeline.config.get("label_values")),
            hint="Segmenting with the model is unaffected; fine-tune it with nnU-Net itself.",
        )
    log.info(
        "%s is region-based: training with nnU-Net's Dice + BCE over regions %s (batch Dice: %s, as its plans say)",
        card.ref,
        list(pipeline.region_values),
        batch_dice,
    )
    return RegionDiceBCELoss(pipeline.region_values, ignore_index=ignore_value, batch_dice=batch_dice, across_ranks=across_ranks)


def _dataset_fingerprint(dataset_name: str, loaded: dict[str, LoadedCase], card: ModelCard, parent: ModelCard | None) -> dict:
    """The new version's training-data fingerprint; a fine-tune also keeps its parent's domains."""
    own = domain_shift.training_fingerprint(
        [images for images, _ in loaded.values()],
        [label.array_zyx for _, label in loaded.values()],
        card.inputs.modality,
        card.inputs.channels,
        card.preprocessing.normalization,
        profiles=[dataset_name],
    )
    return domain_shift.merge_with_parent(own, parent.fingerprint) if parent is not None else own


#: patch ``(Z, Y, X)`` of DeepSeg's default 3D network (the bundled model's).
DEFAULT_PATCH_3D = (32, 64, 64)


def default_unet_3d(in_channels: int, num_classes: int, deep_supervision: bool = True, dropout: float = 0.0) -> UNetConfig:
    """DeepSeg's default 3D U-Net (the bundled model's): 12-24-48-96 features, in-plane-only first stride.

    ``dropout``: probability after every conv (the bundled model has none).
    """
    return UNetConfig(
        spatial_dims=3,
        in_channels=in_channels,
        num_classes=num_classes,
        features=(12, 24, 48, 96),
        strides=((1, 2, 2), (2, 2, 2), (2, 2, 2)),
        dropout=dropout,
        deep_supervision=deep_supervision,
    )


def _scratch_card(
    dataset: Dataset, name: str, config: RetrainConfig, training_cases: dict[str, LoadedCase]
) -> tuple[ModelCard, nn.Module]:
    """A card and an initialised U-Net for a model trained from scratch on ``dataset``'s training cases."""
    loaded = list(training_cases.values())
    spacing = tuple(float(v) for v in np.median([imgs[0].spacing_xyz_mm for imgs, _ in loaded], axis=0))
    modality = dataset.channel_names[0].upper()
    if modality == "CT":
        fp = intensity_fingerprint([imgs[0].array_zyx for imgs, _ in loaded], [lab.array_zyx > 0 for _, lab in loaded])
        norm = ct_normalization(fp)
    else:
        norm = Normalization(scheme="zscore")
    if config.arch not in ("3d", "2.5d", "2d"):
        raise ConfigError("unknown architecture", expected="3d, 2.5d or 2d", found=config.arch)
    num_classes = max(label.value for label in dataset.labels) + 1
    channels = len(dataset.channel_names)
    dropout = config.dropout or 0.0
    if config.arch == "3d":
        net_config = default_unet_3d(channels, num_classes, dropout=dropout)
        patch = DEFAULT_PATCH_3D
    else:
        k = 3 if config.arch == "2.5d" else 1
        net_config = UNetConfig(
            spatial_dims=2,
            in_channels=channels,
            num_classes=num_classes,
            features=(16, 32, 64, 128),
            context_slices=k,
            dropout=dropout,
            deep_supervision=True,
        )
        patch = (1, 96, 96)
    card = ModelCard(
        name=name,
        version=1,
        architecture=Architecture("unet", to_dict(net_config)),
        inputs=Inputs(modality if modality in ("CT", "MR") else "MR", tuple(dataset.channel_names)),
        labels=dataset.labels,
        preprocessing=Preprocessing(target_spacing_xyz_mm=spacing, normalization=norm),
        inference=InferenceDefaults(patch_size_zyx=patch, overlap=0.5, batch_size=2),
        weights_sha256="0" * 64,
    )
    return card, build_net("unet", net_config, seed=config.seed)


def with_dropout(card: ModelCard, net: nn.Module, dropout: float, seed: int = 0) -> tuple[ModelCard, nn.Module]:
    """``card``'s U-Net rebuilt with dropout probability ``dropout`` after every conv, weights kept.

    Dropout layers hold no weights, but adding (or removing) them shifts the layer indices inside
    each conv block and so the state-dict keys; the weights are therefore copied layer by layer in
    network order (:func:`copy_weights_by_layer`), and every weight of ``net`` is carried over.
    In eval mode the new network computes exactly what ``net`` does. ``seed`` only seeds the
    throw-away initialisation (the global torch random state is not touched).

    Raises:
        ConfigError: the architecture has no dropout setting (not a DeepSeg U-Net).
    """
    config = card.architecture.config
    if card.architecture.name != "unet" or "dropout" not in config:
        raise ConfigError(
            f"dropout cannot be set for model {card.ref}",
            expected="a DeepSeg U-Net (architecture 'unet')",
            found=f"architecture {card.architecture.name!r}",
            hint="Leave --dropout out (in the DeepSegTraining panel: untick Dropout) to fine-tune it as it is.",
        )
    if float(config["dropout"]) == dropout:
        return card, net
    new_config = {**config, "dropout": dropout}
    rebuilt = build_net("unet", new_config, seed=seed)
    copy_weights_by_layer(net, rebuilt)
    return dataclasses.replace(card, architecture=dataclasses.replace(card.architecture, config=new_config)), rebuilt


def copy_weights_by_layer(source: nn.Module, target: nn.Module) -> None:
    """Copy every weight and buffer of ``source`` into ``target``, matching layers by their order.

    Both networks must have the same layers with state (convs, norms, ...) in the same order; layers
    without state (dropout, activations, pooling) may differ. Raises :class:`ConfigError` otherwise.
    """

    def stateful(net: nn.Module) -> list[nn.Module]:
        return [m for m in net.modules() if not list(m.children()) and m.state_dict()]

    src, dst = stateful(source), stateful(target)
    if len(src) != len(dst) or any(type(a) is not type(b) for a, b in zip(src, dst, strict=False)):
        raise ConfigError(
            "the two networks' layers with weights differ",
            expected=str([type(m).__name__ for m in src][:6]),
            found=str([type(m).__name__ for m in dst][:6]),
        )
    for a, b in zip(src, dst, strict=True):
        b.load_state_dict(a.state_dict(), strict=True)


def evaluate_model(
    segmenter: Segmenter,
    dataset: Dataset,
    case_ids: list[str],
    hd95: bool = True,
    value_map: dict[int, int] | None = None,
    backend: str = "torch",
) -> dict[str, Any]:
    """Per-case and mean Dice (and HD95, mm) per dataset label of ``segmenter`` on ``case_ids``, over the voxels
    that do not carry the dataset's ignore label.

    ``value_map``: dataset label value -> model output value (:func:`match_labels`); default: by
    name, i.e. ``match_labels(dataset, segmenter.card)``. ``backend``: torch by default, so that
    validation during training (whose weights change every epoch: nothing to export) and a later
    ``deepseg evaluate`` compute the same numbers.

    A region-based nnU-Net model is also scored per region, as nnU-Net evaluates it: a region of several
    values (BraTS' "whole tumor") is the union of its values in both label maps, a row of its own
    (``"region": true``, its model ``values``); a one-value region is its label's row. ``regions`` lists
    the row of every region (empty for other models), and :func:`validation_score` averages those.
    """
    value_map = match_labels(dataset, segmenter.card) if value_map is None else value_map
    region_rows = _region_rows(segmenter.card, dataset, value_map)
    rows = [(spec.name, [spec.value], [value_map.get(spec.value, -1)], False) for spec in dataset.labels]
    rows += [(row, dataset_values, list(model_values), True) for row, dataset_values, model_values in region_rows.values()]
    per_case = {}
    for case_id in case_ids:
        images, label = dataset.load_case(case_id)
        result = segmenter.segment(images, SegmentOptions(check_modality=False, backend=backend))
        # voxels nobody reviewed (the dataset's ignore label) are left out of both masks, as `deepseg compare`
        # and nnU-Net's evaluation leave them out: a model is neither rewarded nor penalised there
        scored = None if dataset.ignore_value is None else label.array_zyx != dataset.ignore_value
        scores = {}
        for name, dataset_values, model_values, _ in rows:
            pred, ref = np.isin(result.labels.array_zyx, model_values), np.isin(label.array_zyx, dataset_values)
            if scored is not None:
                pred, ref = pred & scored, ref & scored
            entry = {"dice": metrics.dice(pred, ref)}
            if hd95:
                entry["hd95_mm"] = metrics.hausdorff95(pred, ref, label.spacing_zyx_mm)
            scores[name] = entry
        per_case[case_id] = scores
    mean = {}
    for name, _, model_values, is_region in rows:
        dice = [per_case[c][name]["dice"] for c in case_ids]
        mean[name] = {"dice": float(np.mean(dice)) if dice else float("nan")}
        if hd95:
            finite = [per_case[c][name]["hd95_mm"] for c in case_ids if np.isfinite(per_case[c][name]["hd95_mm"])]
            mean[name]["hd95_mm"] = float(np.mean(finite)) if finite else float("inf")
            # HD95 is undefined (inf) where one mask is empty and the other not, a missed lesion among them: the
            # mean leaves those cases out, so it says over how many cases it is taken
            mean[name]["hd95_cases"] = len(finite)
        if is_region:
            mean[name].update(region=True, values=model_values)
    regions = [
        region_rows[region.name][0] if region.name in region_rows else _label_row(region, dataset, value_map)
        for region in segmenter.card.regions
    ]
    return {"cases": per_case, "mean": mean, "case_ids": case_ids, "regions": regions}


def _label_row(region: Region, dataset: Dataset, value_map: dict[int, int]) -> str:
    """The dataset label row of a one-value region (its label's)."""
    return next(spec.name for spec in dataset.labels if value_map.get(spec.value) == region.values[0])


RegionRow = tuple[str, list[int], tuple[int, ...]]


def _region_rows(card: ModelCard, dataset: Dataset, value_map: dict[int, int]) -> dict[str, RegionRow]:
    """Region name -> (row name, dataset values, model values) for each region that needs a row of its own:
    several values, or one value no dataset label maps onto."""
    names = {spec.name for spec in dataset.labels}
    mapped = set(value_map.values())
    rows = {}
    for region in card.regions:
        if len(region.values) == 1 and region.values[0] in mapped:
            continue
        row = region.row_name if region.row_name not in names else f"{region.name} (region)"
        dataset_values = [value for value, model_value in value_map.items() if model_value in region.values]
        rows[region.name] = (row, dataset_values, region.values)
    return rows


def validation_score(result: dict[str, Any]) -> float:
    """The number a run keeps its best checkpoint by: mean Dice over the model's regions (region-based
    nnU-Net models, as nnU-Net's trainer does), else over the dataset's labels."""
    rows = result.get("regions") or list(result["mean"])
    return float(np.mean([result["mean"][row]["dice"] for row in rows]))


def _encoder_parameters(net: nn.Module) -> list[nn.Parameter]:
    encoder = getattr(net, "encoder", None)
    return list(encoder.parameters()) if isinstance(encoder, nn.Module) else []


@dataclass
class RetrainOutcome:
    """What a run produced."""

    card: ModelCard | None
    history: list[dict[str, Any]]
    validation: dict[str, Any]
    parent_validation: dict[str, Any] | None


def _one_run_per_checkpoint_folder(train: Callable[..., RetrainOutcome]) -> Callable[..., RetrainOutcome]:
    """Refuse a run whose checkpoint folder another run is writing: two trainings of one name (two Slicer
    sessions; the default folder is named after the model) deleted each other's half-written checkpoints.
    Held by the process that writes the checkpoints (rank 0 under ``torchrun``) in a lock file beside the folder;
    the OS drops a killed run's lock."""

    @functools.wraps(train)
    def locked(
        dataset_dir: str | Path, name: str, config: RetrainConfig, checkpoint_dir: str | Path, **kwargs: Any
    ) -> RetrainOutcome:
        if int(os.environ.get("RANK", "0")) != 0:
            return train(dataset_dir, name, config, checkpoint_dir, **kwargs)
        folder = Path(checkpoint_dir).resolve()
        folder.parent.mkdir(parents=True, exist_ok=True)

        with contextlib.ExitStack() as held:
            try:
                held.enter_context(exclusive_lock(folder.with_name(folder.name + ".lock"), wait=False))
            except LockHeld:
                raise ConfigError(
                    "another training is writing its checkpoints to this folder",
                    subject=folder,
                    hint="Wait for it to end, or give this run another checkpoint folder (--checkpoints).",
                ) from None
            return train(dataset_dir, name, config, checkpoint_dir, **kwargs)

    return locked


@_one_run_per_checkpoint_folder
def retrain(
    dataset_dir: str | Path,
    name: str,
    config: RetrainConfig,
    checkpoint_dir: str | Path,
    *,
    base: str | Path | None = None,
    store: ModelStore | None = None,
    resume: bool = False,
    device: str = "cpu",
    on_event: EventCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    stop_after_epoch: int | None = None,
    activate: bool = True,
) -> RetrainOutcome:
    """Train a new version of ``name`` on ``dataset_dir`` and add it to ``store``.

    Args:
        dataset_dir: a DeepSeg dataset; its validation split is fixed on first use.
        name: model name of the new version (the base's name continues its version line).
        config: the run's settings.
        checkpoint_dir: where ``last/`` and ``best/`` checkpoints go.
        base: ``NAME[:VERSION]`` or folder to fine-tune; None trains from scratch (``config.arch``).
        store: model store (default: ``$DEEPSEG_MODELS`` or ``~/.deepseg/models``).
        resume: continue from ``checkpoint_dir/last`` (same dataset and config).
        device: ``cpu``, ``cuda`` ... (AMP is used on CUDA).
        on_event: receives ``epoch_end`` / ``validation`` / ``done`` event dicts.
        should_stop: checked after every epoch; True stops after checkpointing (raises
            :class:`Stopped`; call again with ``resume=True`` to continue). Under ``torchrun``
            all ranks stop after the same epoch when any rank's callback says so.
        stop_after_epoch: stop like ``should_stop`` once this epoch is finished (tests, and jobs
            cut into time slices).
        activate: make the new version the active one (``deepseg models rollback`` undoes it).
    """
    store = store or ModelStore()
    emit = on_event or (lambda event: None)
    dataset = Dataset.open(dataset_dir)
    split = dataset.ensure_split()
    if not split["train"]:
        raise DatasetError("no training cases", subject=dataset.root)
    torch.manual_seed(config.seed)
    random.seed(config.seed)  # unused by DeepSeg today; seeded so that checkpoints and resumes replay it too
    loaded = {case_id: dataset.load_case(case_id) for case_id in split["train"]}
    parent_card = None
    # resolved once: an unversioned base names the active version, which may change while this run trains
    base_folder = resolve_model(base, store) if base is not None else None
    if base_folder is not None:
        parent_card, net = load_network(base_folder)
        if parent_card.previous_stage is not None:
            stages = f"{parent_card.source.get('configuration')} after {parent_card.source['previous_stage']['configuration']}"
            raise ConfigError(
                f"{parent_card.ref} is nnU-Net's cascade ({stages}): fine-tuning its second stage would need its first"
                " stage's segmentation of every training case",
                expected="a model of one stage (nnU-Net's 3d_fullres, 3d_lowres or 2d)",
                found=stages,
                hint="Import the dataset's 3d_fullres (or 3d_lowres) folder and fine-tune that.",
            )
        if len(parent_card.ensemble) > 1:
            raise ConfigError(
                f"{parent_card.ref} is an ensemble of {len(parent_card.ensemble)} networks {list(parent_card.ensemble)}; "
                "fine-tuning trains one network",
                expected="a single network (one nnU-Net fold)",
                found=f"{len(parent_card.ensemble)} members",
                hint="Import one fold (deepseg models import FOLDER --folds 0 --name NAME) and fine-tune that; "
                "nnU-Net trains each fold on its own too.",
            )
        if len(parent_card.inputs.channels) != len(dataset.channel_names):
            raise ConfigError(
                "the dataset's channels do not match the base model's",
                expected=f"{len(parent_card.inputs.channels)} channel(s) {list(parent_card.inputs.channels)}",
                found=f"{len(dataset.channel_names)} channel(s) {list(dataset.channel_names)}",
            )
        value_map = match_labels(dataset, parent_card, config.label_mapping)
        absent = [x.name for x in parent_card.labels if x.value not in value_map.values()]
        if absent:
            log.warning("labels of %s missing from the dataset count as background there: %s", parent_card.ref, absent)
        card = parent_card
        if config.dropout is not None:
            card, net = with_dropout(parent_card, net, config.dropout, seed=config.seed)
        card = dataclasses.replace(card, name=name, parent_version=parent_card.version if parent_card.name == name else None)
        if parent_card.name == name:
            store.keep_parent(base_folder, check_only=True)
    else:
        card, net = _scratch_card(dataset, name, config, loaded)
        value_map = {label.value: label.value for label in dataset.labels}
    if parent_card is not None and config.freeze_encoder_epochs > 0 and not _encoder_parameters(net):
        raise ConfigError(
            f"{parent_card.ref}'s network has no encoder DeepSeg can tell apart from its decoder"
            f" ({card.architecture.name}), so nothing would be frozen",
            expected="--freeze-encoder-epochs 0 for this model",
            found=f"--freeze-encoder-epochs {config.freeze_encoder_epochs}",
            hint="Leave it out (the panel: Frozen encoder epochs 0); a lower --learning-rate keeps more of the base instead.",
        )
    class_weights = None
    if _weighs_classes(config.loss):
        lut = _label_lut(value_map, dataset.ignore_value)
        labels = (label.array_zyx if lut is None else lut[label.array_zyx] for _, label in loaded.values())
        class_weights = class_weights_from_labels(labels, _card_pipeline(card).output_channels, dataset.ignore_value)
        log.info("weighted cross-entropy class weights (median frequency, from the training labels): %s", class_weights)
    # a loss the model cannot train fails here, before a process group is started
    loss_fn = training_objective(
        card, config, dataset.ignore_value, across_ranks=distributed.launched_world_size() > 1, class_weights=class_weights
    )
    rank, world = distributed.rank_world()
    checkpoint_dir = Path(checkpoint_dir)
    if resume:
        check_resumable(checkpoint_dir / "last", rank, world)
    device_t = torch.device(device)
    if world > 1 and device_t.type == "cuda":
        device_t = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    net = net.to(device_t)
    model: nn.Module = net
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # Frozen encoder epochs leave parameters without gradients, which DDP must be told about.
        model = DistributedDataParallel(
            net,
            device_ids=[device_t.index] if device_t.type == "cuda" else None,
            find_unused_parameters=config.freeze_encoder_epochs > 0 and base is not None,
        )
        # Each rank its own dropout masks (torch's global generator); the weights are already equal.
        rank_seed = int(np.random.SeedSequence([config.seed, rank]).generate_state(1)[0])
        torch.manual_seed(rank_seed)
        random.seed(rank_seed)
    if rank != 0:
        emit = lambda event: None  # noqa: E731  (one event stream: rank 0's)
    spatial_dims = int(card.architecture.config.get("spatial_dims", 3))
    context = int(card.architecture.config.get("context_slices", 1))
    train_cases = _prepare_cases(loaded, card, dataset.ignore_value, value_map)
    fingerprint = _dataset_fingerprint(dataset.name, loaded, card, parent_card)
    case_digests = {case_id: _case_digest(case) for case_id, case in loaded.items()}
    del loaded  # the raw volumes are not needed once resampled, normalised and fingerprinted
    patch = tuple(card.inference.patch_size_zyx)
    if spatial_dims == 2:
        patch = (context, patch[-2], patch[-1])
    sampler = PatchSampler(train_cases, patch, foreground_fraction=config.foreground_fraction, augment=config.augment)
    optimiser = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    total = max(1, config.epochs * config.steps_per_epoch)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=total, eta_min=0.05 * config.learning_rate)
    # Each rank draws its own patches; with one process the stream is the plain seed's.
    rng = np.random.default_rng(config.seed if world == 1 else [config.seed, rank])
    history: list[dict[str, Any]] = []
    start_epoch, best_score = 1, -1.0
    # what a resume must continue besides the settings (the checkpoint's config): the same base version, dataset
    # cases (also their contents: a case corrected again since the stop is another case), validation cases (the
    # best checkpoint and the curves compare scores across epochs), device type (float16 AMP and its loss scale on
    # CUDA only) and new model name
    run = {
        "base": parent_card.ref if parent_card is not None else None,
        "dataset": dataset.name,  # its name, not its path: nodes of a multi-node run may mount it elsewhere
        "training_cases": list(split["train"]),
        "training_case_digests": case_digests,
        "validation_cases": list(split["validation"]),
        "validation_case_digests": {case_id: _case_digest(dataset.load_case(case_id)) for case_id in split["validation"]},
        "device": device_t.type,
        "name": name,
    }
    # The stored version's card records this id, so a resume finds the version even when a kill came between
    # storing it and marking the checkpoint (mark_stored).
    run_id = (run_id_of(checkpoint_dir / "last") if resume else None) or uuid.uuid4().hex
    scaler = _grad_scaler(device_t)
    if resume:
        check_same_network(checkpoint_dir / "last", card.architecture.name, card.architecture.config)
        check_same_run(checkpoint_dir / "last", run, to_dict(config), stored_as=store.version_trained_by(name, run_id))
        state = load_checkpoint(checkpoint_dir / "last", net, optimiser)
        schedule.load_state_dict(state["scheduler"])
        restore_random_state(checkpoint_dir / "last", state, rank, rng, device_t)
        if scaler.is_enabled() and state.get("grad_scaler"):
            # without it the float16 loss scale restarts at 65536 and the first steps after a resume are skipped
            scaler.load_state_dict(state["grad_scaler"])
        start_epoch, history, best_score = state["epoch"] + 1, state["history"], state["best_score"]
        emit({"event": "resumed", "epoch": state["epoch"]})
    encoder_params = _encoder_parameters(net)
    started = time.perf_counter()

    def validate() -> dict[str, Any]:
        segmenter = Segmenter(card, net, device_t)
        result = evaluate_model(segmenter, dataset, split["validation"], hd95=True, value_map=value_map)
        net.train()
        return result

    if not resume and rank == 0:
        forget_best(checkpoint_dir / "best")  # an earlier run's best epoch in this folder is not this run's
    for epoch in range(start_epoch, config.epochs + 1):
        frozen = base is not None and epoch <= config.freeze_encoder_epochs
        for param in encoder_params:
            param.requires_grad_(not frozen)
        net.train()
        losses = []
        best_staged = False
        epoch_start = time.perf_counter()
        for _ in range(config.steps_per_epoch):
            x, y = network_batch(*sampler.batch(rng, config.batch_size), spatial_dims, device_t)
            losses.append(optimisation_step(model, net, x, y, loss_fn, optimiser, schedule, scaler))
        record: dict[str, Any] = {
            "event": "epoch_end",
            "epoch": epoch,
            "epochs": config.epochs,
            "loss": float(np.mean(losses)),
            "seconds": time.perf_counter() - epoch_start,
            "encoder_frozen": frozen,
        }
        if rank == 0 and (epoch % config.validate_every == 0 or epoch == config.epochs):
            result = validate()
            record["validation"] = result["mean"]
            score = validation_score(result)
            record["mean_dice"] = score
            if score > best_score:
                best_score = score
                # swapped in only once last/ holds this epoch: a resume replays an epoch last/ lacks, and on CUDA
                # the replay may score otherwise, so best/ must not hold the epoch before the replay
                stage_checkpoint(checkpoint_dir / "best", net, optimiser, {"epoch": epoch, "score": score, "run_id": run_id})
                best_staged = True
        elapsed = time.perf_counter() - started
        record["eta_s"] = elapsed / (epoch - start_epoch + 1) * (config.epochs - epoch)
        history.append(record)
        state = {
            "epoch": epoch,
            "history": history,
            "best_score": best_score,
            "scheduler": schedule.state_dict(),
            "world_size": world,
            "config": to_dict(config),
            "network": network_description(card.architecture.name, card.architecture.config),
            "run": run,
            "run_id": run_id,
            "grad_scaler": scaler.state_dict() if scaler.is_enabled() else None,
        }
        rank_states = gather_random_states(rng, device_t, rank, world)
        if rank == 0:
            try:
                save_checkpoint(checkpoint_dir / "last", net, optimiser, state, rank_states)
            except DeepSegError:
                forget_staged(checkpoint_dir / "best")  # never swapped in without its last/; frees its disk space
                raise
            if best_staged:
                swap_in_checkpoint(checkpoint_dir / "best")
                best_staged = False
        emit(record)
        stop = (should_stop is not None and should_stop()) or (stop_after_epoch is not None and epoch >= stop_after_epoch)
        # The agreement is also a barrier: no rank exits before rank 0's checkpoint is complete.
        if any_rank(stop, device_t, world) and epoch < config.epochs:
            if world > 1:
                torch.distributed.destroy_process_group()
            raise Stopped(f"stopped after epoch {epoch}; resume with the same checkpoint folder")
    net.eval()
    if world > 1:
        if on_event is not None:
            own_state = json.dumps(random_state(rng, device_t), sort_keys=True).encode()
            on_event(
                {
                    "event": "rank_done",
                    "rank": rank,
                    "weights_sha256": _weights_digest(net),
                    "random_state_sha256": hashlib.sha256(own_state).hexdigest(),
                }
            )
        if rank != 0:
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
            return RetrainOutcome(None, history, {}, None)
    validation = evaluate_model(Segmenter(card, net, device_t), dataset, split["validation"], value_map=value_map)
    parent_validation = None
    if parent_card is not None:
        parent_validation = evaluate_model(
            Segmenter.load(base_folder, device=device), dataset, split["validation"], value_map=value_map
        )
    train_ids = split["train"]
    card = dataclasses.replace(
        card,
        created=created_now(),  # the new version's, not the parent's it was copied from
        fingerprint=fingerprint,
        description=(card.description + f" Fine-tuned on {dataset.name}.").strip() if base is not None else card.description,
        metrics={
            "validation": {
                "dice": {k: v["dice"] for k, v in validation["mean"].items()},
                "cases": split["validation"],
                "dataset": str(dataset.root),
            },
            "parent_validation": {"dice": {k: v["dice"] for k, v in parent_validation["mean"].items()}}
            if parent_validation
            else None,
            "training": {
                "epochs": config.epochs,
                "final_loss": history[-1]["loss"] if history else None,
                "dropout": float(card.architecture.config.get("dropout", 0.0)),
                "cases": train_ids,
                "base": str(base) if base is not None else None,
                "run_id": run_id,
            },
        },
    )
    if parent_card is not None and parent_card.name == name:
        store.keep_parent(base_folder)  # a bundled base becomes the version rollback returns to
    # A Stop between storing and saying so would leave a stored version that the panel takes for a stopped
    # run (Resume ticked, no comparison): it is delivered once the done event is out.
    with cancel_deferred():
        stored = store.add_version(card, net.cpu(), activate=activate)
        mark_stored(checkpoint_dir / "last", stored.ref)
        emit(
            {
                "event": "done",
                "model": stored.ref,
                "parent": parent_card.ref if parent_card else None,
                "validation": validation["mean"],
                "parent_validation": parent_validation["mean"] if parent_validation else None,
                "validation_cases": len(split["validation"]),
            }
        )
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return RetrainOutcome(stored, history, validation, parent_validation)


def _grad_scaler(device: torch.device) -> torch.amp.GradScaler:
    """float16 loss scaling for CUDA's mixed precision; disabled elsewhere (CPU training runs in float32)."""
    return torch.amp.GradScaler("cuda", enabled=device.type == "cuda")


def _case_digest(case: LoadedCase) -> str:
    """SHA-256 of a training case's voxels and grids (its images, then its labels), first 16 hex digits."""
    digest = hashlib.sha256()
    images, label = case
    for volume in (*images, label):
        voxels = np.ascontiguousarray(volume.array_zyx)
        grid = [str(voxels.dtype), voxels.shape, volume.spacing_xyz_mm, volume.origin_lps, volume.direction_lps.tolist()]
        digest.update(json.dumps(grid).encode())
        digest.update(memoryview(voxels).cast("B"))
    return digest.hexdigest()[:16]


def _weights_digest(net: nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(net.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
