"""Fine-tuning an imported nnU-Net model minimises what nnU-Net's own trainer minimises.

nnU-Net's side is its code, run here: an ``nnUNetTrainer`` built from the model folder's own
``plans.json`` and ``dataset.json`` gives the loss (``_build_loss``: ``DC_and_CE_loss`` or, for regions,
``DC_and_BCE_loss``, in ``DeepSupervisionWrapper`` with its weights) and the deep-supervision scales;
batchgeneratorsv2's ``ConvertSegmentationToRegionsTransform`` and ``DownsampleSegForDSTransform`` make
the targets, as its training transforms do. DeepSeg's side is
:func:`~deepseg_core.training.engine.training_objective` for the imported card. Both get the same
outputs: the imported network's own in training mode, or logits of the shapes a deeper plan gives
(nnU-Net's real 3d_fullres plans have 5 or 6 stages; the tiny models 3, whose one low-resolution
output nnU-Net weighs 0).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from deepseg_core.importers import import_model
from deepseg_core.model_store import ModelStore
from deepseg_core.nets import build_net
from deepseg_core.training.engine import RetrainConfig, training_objective

pytestmark = pytest.mark.needs_torch

#: the tiny 3d_fullres plan made deeper: five stages, so four outputs of which nnU-Net trains three
FIVE_STAGE_STRIDES = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]


@pytest.fixture(scope="module")
def cards(tiny_folders, tiny_region_folder, tmp_path_factory) -> dict:
    store = ModelStore(tmp_path_factory.mktemp("store"))
    folders = {"3d": tiny_folders["3d"], "2d": tiny_folders["2d"], "regions": tiny_region_folder}
    return {
        name: (import_model(folder, store, name=f"tiny-{name}", **({"folds": [0]} if name == "3d" else {})), folder)
        for name, folder in folders.items()
    }


def _configuration(folder: Path) -> str:
    return folder.name.split("__")[-1]


def nnunet_loss_and_scales(folder: Path, plans_edit, ignore: int | None, monkeypatch, tmp_path):
    """nnU-Net's trainer's loss and deep-supervision scales for ``folder``'s plans (edited) and dataset.json."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    for variable in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(variable, str(tmp_path / variable))
    plans = json.loads((folder / "plans.json").read_text())
    dataset_json = json.loads((folder / "dataset.json").read_text())
    if ignore is not None:
        dataset_json["labels"]["ignore"] = ignore
    plans_edit(plans["configurations"][_configuration(folder)])
    plans["continue_training"] = False  # nnU-Net's run_training sets it before building the trainer
    trainer = nnUNetTrainer(plans, _configuration(folder), 0, dataset_json, device=torch.device("cpu"))
    return trainer._build_loss(), trainer._get_deep_supervision_scales(), trainer.label_manager


def nnunet_targets(labels: torch.Tensor, scales, label_manager) -> list[torch.Tensor]:
    """``labels`` ``(B, *spatial)`` as nnU-Net's training transforms hand them to the loss: regions (and the
    ignore label as a last channel) then one target per scale, ``(B, C, *spatial_s)``."""
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
    from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform

    per_case = []
    for case in labels:
        seg = case[None]
        if label_manager.has_regions:
            ignore = [label_manager.ignore_label] if label_manager.ignore_label is not None else []
            seg = ConvertSegmentationToRegionsTransform([*label_manager.foreground_regions, *ignore])._apply_to_segmentation(seg)
        per_case.append(DownsampleSegForDSTransform(scales)._apply_to_segmentation(seg))
    return [torch.stack([case[s] for case in per_case]) for s in range(len(scales))]


def _with_batch_dice(card, batch_dice: bool):
    pipeline = {**card.pipeline, "config": {**card.pipeline["config"], "batch_dice": batch_dice}}
    return dataclasses.replace(card, pipeline=pipeline)


CASES = {
    # model, plans: as trained or five stages, batch Dice, ignore label, the network's own outputs
    "3d-as-trained": ("3d", False, None, None, True),
    "2d-as-trained": ("2d", False, None, None, True),
    "3d-five-stages-sample-dice": ("3d", True, False, None, False),
    "3d-five-stages-batch-dice-ignore": ("3d", True, True, 3, False),
    "regions-as-trained": ("regions", False, None, None, True),
    "regions-five-stages-batch-dice": ("regions", True, True, None, False),
    "regions-five-stages-sample-dice-ignore": ("regions", True, False, 3, False),
}


@pytest.mark.parametrize("case", list(CASES))
def test_deepseg_minimises_what_nnunets_trainer_minimises(case, cards, monkeypatch, tmp_path):
    model, five_stages, batch_dice, ignore, own_outputs = CASES[case]
    card, folder = cards[model]
    if batch_dice is not None:
        card = _with_batch_dice(card, batch_dice)

    def plans_edit(configuration: dict) -> None:
        if batch_dice is not None:
            configuration["batch_dice"] = batch_dice
        if five_stages:
            configuration["architecture"]["arch_kwargs"]["strides"] = FIVE_STAGE_STRIDES

    theirs_fn, scales, label_manager = nnunet_loss_and_scales(folder, plans_edit, ignore, monkeypatch, tmp_path)
    ours_fn = training_objective(card, RetrainConfig(), ignore)

    patch = tuple(card.inference.patch_size_zyx)
    channels = card.architecture.config["num_classes"]
    generator = torch.Generator().manual_seed(len(case))
    if own_outputs:
        net = build_net(card.architecture.name, card.architecture.config).train()
        channels_in = card.architecture.config["in_channels"]
        outputs = [o.detach() for o in net(torch.randn(2, channels_in, *patch[-len(scales[0]) :], generator=generator))]
    else:
        outputs = [
            torch.randn(2, channels, *(round(p * s) for p, s in zip(patch, scale, strict=True)), generator=generator) * 2
            for scale in scales
        ]
    assert [tuple(o.shape[2:]) for o in outputs] == [
        tuple(round(p * s) for p, s in zip(outputs[0].shape[2:], scale, strict=True)) for scale in scales
    ]
    outputs = [o.requires_grad_() for o in outputs]
    top = 3 if model == "regions" else channels
    labels = torch.randint(0, top + (1 if ignore is not None else 0), (2, *outputs[0].shape[2:]), generator=generator)
    if ignore is not None:
        labels[labels == top] = ignore

    ours = ours_fn(outputs, labels)
    theirs = theirs_fn(outputs, nnunet_targets(labels, scales, label_manager))
    # nnU-Net's Dice term is -Dice, DeepSeg's 1 - Dice: with weights summing to 1 the totals differ by 1
    assert ours.item() == pytest.approx(theirs.item() + 1.0, abs=2e-6)
    grads_ours = torch.autograd.grad(ours, outputs)
    grads_theirs = torch.autograd.grad(theirs, outputs, allow_unused=True)
    assert grads_theirs[-1] is None  # nnU-Net trains no lowest-resolution head ...
    assert float(grads_ours[-1].abs().max()) == 0.0  # ... DeepSeg's gets a zero gradient (DDP sees it used)
    for mine, reference in zip(grads_ours[:-1], grads_theirs[:-1], strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-9)
    assert float(grads_ours[0].abs().max()) > 0


def test_deepseg_models_keep_their_own_deep_supervision():
    # DeepSeg's own nets: every output counts, 1, 1/2, 1/4 normalised, targets by torch's nearest
    from deepseg_core.losses import DeepSupervisionLoss, build_loss

    loss = DeepSupervisionLoss(build_loss("dice_ce"))
    assert loss.output_weights(3) == pytest.approx((4 / 7, 2 / 7, 1 / 7))
    assert DeepSupervisionLoss(build_loss("dice_ce"), drop_lowest=True).output_weights(3) == pytest.approx((2 / 3, 1 / 3, 0))
    assert np.isclose(sum(loss.output_weights(5)), 1.0)
