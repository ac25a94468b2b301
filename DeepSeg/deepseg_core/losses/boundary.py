"""Boundary loss (Kervadec et al. 2019): probabilities weighted by the signed distance to the truth.

For each foreground class ``c``: ``mean over valid voxels of p_c(v) * phi_c(v)``, where ``phi_c``
is the signed distance to the boundary of the true region of ``c``: positive outside (growing with
distance), ``<= 0`` inside (``0`` on the boundary voxels, negative deeper in). Predicting far from
the truth costs in proportion to the distance, which plain overlap losses do not see. A class
absent from a sample gets ``phi = 1`` everywhere, so any prediction of it costs.

Distance maps are computed from the target on the CPU (scipy) in voxel units, or in mm when
``spacing_mm`` is given. The loss can be negative; combine it with a region loss (``dice_boundary``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import nn

from .base import masked_mean, prepare


def signed_distance_map(mask: np.ndarray, spacing_mm: Sequence[float] | None = None) -> np.ndarray:
    """Signed distance (float32, same shape as ``mask``): > 0 outside, <= 0 inside, 0 on the border.

    An empty mask gives ones; a full mask gives minus the distance to the array edge.
    """
    mask = mask.astype(bool)
    if not mask.any():
        return np.ones(mask.shape, dtype=np.float32)
    sampling = None if spacing_mm is None else tuple(float(s) for s in spacing_mm)
    if mask.all():
        padded = np.pad(mask, 1, constant_values=False)
        inside = ndimage.distance_transform_edt(padded, sampling=sampling)[(slice(1, -1),) * mask.ndim]
        return (-(inside - inside.min())).astype(np.float32)
    outside = ndimage.distance_transform_edt(~mask, sampling=sampling)
    inside = ndimage.distance_transform_edt(mask, sampling=sampling)
    step = min(sampling) if sampling else 1.0
    return np.where(mask, -(inside - step), outside).astype(np.float32)


class BoundaryLoss(nn.Module):
    """Boundary loss averaged over foreground classes (see module docstring).

    Args:
        spacing_mm: voxel size per spatial axis of the target (distances in mm), or None (voxels).
        ignore_index: target value whose voxels are skipped.
    """

    def __init__(self, spacing_mm: Sequence[float] | None = None, ignore_index: int | None = None) -> None:
        super().__init__()
        self.spacing_mm = tuple(spacing_mm) if spacing_mm is not None else None
        self.ignore_index = ignore_index

    def distance_maps(self, target: torch.Tensor, num_classes: int) -> torch.Tensor:
        """``(B, C - 1, *spatial)`` signed distance maps of the foreground classes."""
        labels = target.detach().cpu().numpy()
        maps = np.stack(
            [
                np.stack([signed_distance_map(labels[b] == c, self.spacing_mm) for c in range(1, num_classes)])
                for b in range(labels.shape[0])
            ]
        )
        return torch.from_numpy(maps)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        batch = prepare(logits, target, self.ignore_index)
        probs = torch.softmax(batch.logits, dim=1)[:, 1:]
        phi = self.distance_maps(batch.target, batch.num_classes).to(probs.device, probs.dtype)
        valid = batch.valid.unsqueeze(1).expand_as(probs)
        return masked_mean(probs * phi, valid)
