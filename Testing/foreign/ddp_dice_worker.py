"""One rank of ``test_ddp_batch_dice.py`` (run under ``torch.distributed.run``, two CPU processes, gloo).

Each rank takes its half of one seeded global batch and computes, with gradients with respect to its
logits, DeepSeg's batch-Dice losses counted over all ranks and nnU-Net's own losses as its trainer
builds them under DDP (``ddp=True``: ``AllGatherGrad``), then DeepSeg's Dice counted on the rank's half
alone. Writes ``rank<r>.npz`` to the folder given as the first argument.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepSeg"))

from deepseg_core.losses import RegionDiceBCELoss, SoftDiceLoss, build_loss

#: the global batch: 4 cases of 3 classes on 6 x 8 x 8 voxels, 2 per rank
BATCH, CLASSES, SPATIAL = 4, 3, (6, 8, 8)
#: the region model's regions (label values per sigmoid channel), as nnU-Net's ``regions_class_order`` tests
REGIONS = [(1, 2), (2,)]


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``(4, 3, 6, 8, 8)`` and labels ``(4, 6, 8, 8)``; the second half has much more foreground,
    so a rank's own Dice differs from the global batch's."""
    rng = np.random.default_rng(7)
    logits = torch.from_numpy(rng.normal(size=(BATCH, CLASSES, *SPATIAL)).astype(np.float32))
    labels = torch.from_numpy(rng.choice(CLASSES, size=(BATCH, *SPATIAL), p=[0.9, 0.07, 0.03]))
    labels[BATCH // 2 :] = torch.from_numpy(rng.choice(CLASSES, size=(BATCH // 2, *SPATIAL), p=[0.4, 0.3, 0.3]))
    return logits, labels


def value_and_grad(loss, logits: torch.Tensor, target: torch.Tensor) -> tuple[float, np.ndarray]:
    logits = logits.clone().requires_grad_(True)
    value = loss(logits, target)
    value.backward()
    return float(value), logits.grad.numpy()


def main() -> None:
    from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
    from nnunetv2.utilities.helpers import softmax_helper_dim1

    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    logits, labels = global_batch()
    share = BATCH // world
    logits, labels = logits[rank * share : (rank + 1) * share], labels[rank * share : (rank + 1) * share]
    regions = torch.stack([torch.isin(labels, torch.tensor(values)) for values in REGIONS], 1).float()
    dice_options = {"batch_dice": True, "smooth": 1e-5, "ddp": True}
    nnunet_dice = MemoryEfficientSoftDiceLoss
    losses = {
        "dice": (SoftDiceLoss(across_ranks=True), labels),
        "nnunet_dice": (nnunet_dice(apply_nonlin=softmax_helper_dim1, do_bg=False, **dice_options), labels[:, None]),
        "dice_ce": (build_loss("dice_ce", dice={"across_ranks": True}), labels),
        "nnunet_dice_ce": (
            DC_and_CE_loss({**dice_options, "do_bg": False}, {}, weight_ce=1, weight_dice=1, dice_class=nnunet_dice),
            labels[:, None],
        ),
        "regions": (RegionDiceBCELoss(REGIONS, batch_dice=True, across_ranks=True), labels),
        "nnunet_regions": (
            DC_and_BCE_loss({}, {**dice_options, "do_bg": True}, use_ignore_label=False, dice_class=nnunet_dice),
            regions,
        ),
        "dice_own_rank": (SoftDiceLoss(across_ranks=False), labels),
    }
    results = {}
    for name, (loss, target) in losses.items():
        region_logits = logits[:, : len(REGIONS)] if "regions" in name else logits
        results[f"{name}_value"], results[f"{name}_grad"] = value_and_grad(loss, region_logits, target)
    np.savez(Path(sys.argv[1]) / f"rank{rank}.npz", **results)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
