"""nnU-Net's loss for region-based models: binary cross-entropy plus soft Dice on each region's sigmoid.

A region (BraTS' "tumor core": label values 2 and 3) is the union of its label values, and the
network has one logit per region (no background channel). nnU-Net trains such models with
``DC_and_BCE_loss`` (``BCEWithLogitsLoss`` plus ``MemoryEfficientSoftDiceLoss`` on sigmoids, background
included, smoothing 1e-5); :class:`RegionDiceBCELoss` computes the same terms:

* BCE: averaged over voxels and regions. With an ignore value, nnU-Net sums the per-voxel BCE over
  the regions and divides by the number of valid voxels (not voxels times regions); that is kept,
  so a run with an ignore value weighs BCE against Dice as nnU-Net's does.
* Dice: per region ``(2 TP + s) / (|pred| + |ref| + s)`` over valid voxels, counts summed over the
  batch (``batch_dice``) or per sample, then averaged; nnU-Net takes the choice from the plans
  (its planner sets it per configuration). Under DDP nnU-Net gathers the batch counts of all ranks,
  and so does this with ``across_ranks``.

nnU-Net returns ``BCE - Dice``; this returns ``BCE + (1 - Dice)``, which differs by the constant 1
only (same gradients), so that the loss stays non-negative like DeepSeg's other losses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ShapeError
from .base import sum_over_ranks


class RegionDiceBCELoss(nn.Module):
    """``BCE + (1 - soft Dice)`` over sigmoid regions (see the module docstring).

    Args:
        regions: each output channel's label values, e.g. ``[(1, 2, 3), (2, 3), (3,)]``.
        ignore_index: label value that counts in neither term (nnU-Net's ``ignore`` label).
        batch_dice: sum Dice counts over the batch before the ratio (else one Dice per sample).
        smooth: added to the Dice numerator and denominator.
        across_ranks: with ``batch_dice`` in a DDP run, sum the counts over all ranks' batches.

    ``forward(logits, target)``: logits ``(B, R, *spatial)``, integer label values ``(B, *spatial)``
    or ``(B, 1, *spatial)``; returns a scalar.
    """

    def __init__(
        self,
        regions: Sequence[Sequence[int]],
        ignore_index: int | None = None,
        batch_dice: bool = True,
        smooth: float = 1e-5,
        across_ranks: bool = False,
    ) -> None:
        super().__init__()
        self.across_ranks = across_ranks
        self.regions = [tuple(int(v) for v in values) for values in regions]
        if not self.regions or any(not values for values in self.regions):
            raise ConfigError("a region loss needs at least one region, each with label values", found=str(regions))
        self.ignore_index = ignore_index
        self.batch_dice = batch_dice
        self.smooth = float(smooth)

    def region_masks(self, target: torch.Tensor) -> torch.Tensor:
        """``(B, R, *spatial)`` 0/1 masks: voxel in region ``r`` when its label value is one of the region's."""
        return torch.stack(
            [torch.isin(target, torch.tensor(values, dtype=target.dtype, device=target.device)) for values in self.regions],
            dim=1,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.ndim == logits.ndim and target.shape[1] == 1:
            target = target[:, 0]
        if logits.ndim < 3 or logits.shape[1] != len(self.regions) or tuple(target.shape) != (logits.shape[0], *logits.shape[2:]):
            raise ShapeError(
                "region loss inputs do not fit",
                expected=f"logits (B, {len(self.regions)}, *spatial) and label values (B, *spatial)",
                found=f"logits {tuple(logits.shape)}, target {tuple(target.shape)}",
            )
        if target.is_floating_point():
            raise ShapeError("target must hold integer label values", expected="an integer tensor", found=str(target.dtype))
        masks = self.region_masks(target).to(logits.dtype)
        probabilities = torch.sigmoid(logits)
        bce = F.binary_cross_entropy_with_logits(logits, masks, reduction="none")
        axes = tuple(range(2, logits.ndim))
        if self.ignore_index is None:
            bce_term = bce.mean()
            intersect, predicted, reference = (probabilities * masks).sum(axes), probabilities.sum(axes), masks.sum(axes)
        else:
            valid = (target != self.ignore_index).unsqueeze(1).to(logits.dtype)
            bce_term = (bce * valid).sum() / valid.sum().clamp_min(1e-8)
            intersect = (probabilities * masks * valid).sum(axes)
            predicted, reference = (probabilities * valid).sum(axes), (masks * valid).sum(axes)
        if self.batch_dice:
            intersect, predicted, reference = intersect.sum(0), predicted.sum(0), reference.sum(0)
            if self.across_ranks:
                intersect, predicted, reference = sum_over_ranks(intersect, predicted, reference)
        dice = (2.0 * intersect + self.smooth) / (reference + predicted + self.smooth).clamp_min(1e-8)
        return bce_term + (1.0 - dice.mean())
