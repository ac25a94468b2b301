"""nnU-Net's sliding window: its tile placement and importance map, registered for DeepSeg's sliding window.

Importing this module registers placement ``nnunet`` (:func:`nnunet_tile_starts`) in
:data:`~deepseg_core.inference.sliding_window.TILE_PLACEMENTS` and importance ``nnunet``
(:func:`nnunet_gaussian`) in :data:`~deepseg_core.inference.sliding_window.IMPORTANCE_MAPS`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import ndimage

from ...inference.sliding_window import IMPORTANCE_MAPS, TILE_PLACEMENTS

#: peak of nnU-Net's Gaussian importance map (``value_scaling_factor``).
GAUSSIAN_PEAK = 10.0


def nnunet_tile_starts(length: int, patch: int, overlap: float) -> list[int]:
    """nnU-Net's tile starts along one axis (``compute_steps_for_sliding_window``), ``step = 1 - overlap``.

    ``n = ceil((length - patch) / (patch * step)) + 1`` tiles, starts ``round(i * (length - patch) / (n - 1))``
    with numpy's round-half-even. A patch of 1 (2D networks on a volume) visits every slice.
    """
    if patch == 1:
        return list(range(length))
    if length <= patch:
        return [0]
    step = 1.0 - overlap
    count = int(np.ceil((length - patch) / (patch * step))) + 1
    actual = (length - patch) / (count - 1)
    return [int(np.round(actual * i)) for i in range(count)]


def nnunet_gaussian(patch_size: Sequence[int], sigma_scale: float) -> torch.Tensor:
    """nnU-Net's importance map of a tile (``compute_gaussian``), float32 ``patch_size``.

    A unit impulse at ``patch // 2`` filtered by ``scipy.ndimage.gaussian_filter`` (sigma
    ``sigma_scale * patch``, constant 0 outside), scaled to a peak of 10, rounded to float16 (as nnU-Net
    keeps it) and its zeros set to the smallest non-zero value. Axes of size 1 (2D tiles) are left out
    of the filter, so a 2D network's map is nnU-Net's 2D map.
    """
    sizes = [int(p) for p in patch_size if int(p) > 1] or [1]
    # The filtered impulse is the outer product of the axes' filtered 1D impulses, bit for bit: scipy
    # filters one axis after another, and every sum it forms has a single non-zero term, so each value
    # is the same chain of float64 products. Filtering 128^3 values with a 129-tap kernel three times
    # took 0.3 s of every run; the products take milliseconds.
    gaussian = np.ones([1] * len(sizes))
    for axis, size in enumerate(sizes):
        impulse = np.zeros(size)
        impulse[size // 2] = 1
        profile = ndimage.gaussian_filter1d(impulse, size * sigma_scale, order=0, mode="constant", cval=0)
        gaussian = gaussian * profile.reshape([-1 if a == axis else 1 for a in range(len(sizes))])
    gaussian /= np.max(gaussian) / GAUSSIAN_PEAK
    half = torch.from_numpy(gaussian).to(torch.float16)
    # masked fill, not boolean indexing: 3 instead of 30 ms at 128^3 (every value is >= 0)
    zero = half == 0
    half.masked_fill_(zero, torch.where(zero, torch.inf, half).min())
    return half.float().reshape(tuple(int(p) for p in patch_size))


TILE_PLACEMENTS["nnunet"] = nnunet_tile_starts
IMPORTANCE_MAPS["nnunet"] = nnunet_gaussian
