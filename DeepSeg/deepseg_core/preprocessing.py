"""Turning volumes into network inputs.

Only the 2.5D slice stacking lives here so far; resampling and normalisation follow with the
inference engine.
"""

from __future__ import annotations

import numpy as np

from .errors import ConfigError, ShapeError


def stack_neighbour_slices(volume_czyx: np.ndarray, context_slices: int) -> np.ndarray:
    """2.5D input: for each z, the ``k`` slices centred on it, of every modality, as channels.

    Args:
        volume_czyx: ``(C, Z, Y, X)`` modalities first.
        context_slices: ``k``, odd; slices beyond the volume repeat the edge slice.

    Returns:
        ``(Z, k * C, Y, X)``; channel ``j * C + c`` is modality ``c`` at offset ``j - k // 2``.
    """
    if volume_czyx.ndim != 4:
        raise ShapeError("2.5D stacking needs (C, Z, Y, X)", expected="4 axes", found=str(volume_czyx.shape))
    if context_slices < 1 or context_slices % 2 == 0:
        raise ConfigError("context_slices must be odd and >= 1", found=str(context_slices))
    channels, depth = volume_czyx.shape[:2]
    half = context_slices // 2
    offsets = np.arange(-half, half + 1)
    index = np.clip(np.arange(depth)[:, None] + offsets[None, :], 0, depth - 1)  # (Z, k)
    stacked = volume_czyx[:, index]  # (C, Z, k, Y, X)
    return np.ascontiguousarray(
        stacked.transpose(1, 2, 0, 3, 4).reshape(depth, context_slices * channels, *volume_czyx.shape[2:])
    )
