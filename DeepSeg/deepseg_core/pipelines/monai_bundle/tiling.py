"""MONAI's tile placement, Gaussian importance map and padding, registered for DeepSeg's sliding window.

Sliding window (``inferer``, ``SlidingWindowInferer``): tiles of ``roi_size`` placed as MONAI places
them (step ``int(roi * (1 - overlap))``, the last tile pulled back to end at the border; registered
here as placement ``monai``), an image smaller than a tile padded symmetrically, constant or
Gaussian tile weights (``sigma_scale * roi``, clamped at 1e-3; importance ``monai_gaussian``), and
the raw logits averaged (``blend="logits"``).

Importing this module registers ``monai`` in :data:`TILE_PLACEMENTS` and ``monai_gaussian`` in
:data:`IMPORTANCE_MAPS` (:mod:`deepseg_core.inference.sliding_window`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...inference.sliding_window import IMPORTANCE_MAPS, TILE_PLACEMENTS

#: MONAI inferer padding_mode -> DeepSeg sliding-window ``pad`` (MONAI pads small images symmetrically).
PAD_FOR_MONAI = {"constant": "center", "replicate": "center_replicate", "reflect": "center_reflect"}


def monai_tile_starts(length: int, patch: int, overlap: float) -> list[int]:
    """Tile starts along one axis as MONAI's ``SlidingWindowInferer`` places them.

    ``length`` is the (padded) image length, at least ``patch``. Steps of
    ``max(int(patch * (1 - overlap)), 1)`` voxels until a tile reaches the end; that last tile is
    pulled back to end exactly at ``length`` (so the last overlap is usually larger).
    """
    if patch >= length:
        return [0]
    step = max(int(patch * (1 - overlap)), 1)
    starts = []
    index = 0
    while index * step + patch < length:
        starts.append(index * step)
        index += 1
    starts.append(length - patch)
    return starts


def monai_gaussian_importance(patch_size_zyx: Sequence[int], sigma_scale: float) -> torch.Tensor:
    """MONAI's Gaussian tile weights ``(pz, py, px)`` float32: no normalisation, clamped at 1e-3.

    Per axis ``exp(-d**2 / (2 * sigma**2))`` with ``d`` the distance (voxels) from the tile centre
    ``(size - 1) / 2`` and ``sigma = sigma_scale * size``, multiplied in MONAI's axis order
    (x, y, z) in float32 so the weights are bit-identical to MONAI's.
    """
    sizes_xyz = [int(s) for s in reversed(patch_size_zyx)]
    profiles = []
    for size in sizes_xyz:
        sigma = size * sigma_scale
        offsets = torch.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=torch.float32)
        profiles.append(torch.exp(offsets**2 / (-2 * sigma**2)))
    gx, gy, gz = profiles
    weights = (gx[:, None] * gy[None, :])[:, :, None] * gz[None, None, :]
    weights = torch.clamp(weights, min=max(float(weights.min()), 1e-3))
    return weights.permute(2, 1, 0).contiguous()


TILE_PLACEMENTS.setdefault("monai", monai_tile_starts)
IMPORTANCE_MAPS.setdefault("monai_gaussian", monai_gaussian_importance)
