"""nnU-Net's crop: the bounding box of the non-zero voxels of any channel (holes filled)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def nonzero_mask(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Where any of the same-shaped ``arrays`` is non-zero (bool, their shape)."""
    mask = np.asarray(arrays[0]) != 0
    for array in arrays[1:]:
        mask |= np.asarray(array) != 0
    return mask


def mask_box(mask: np.ndarray) -> list[tuple[int, int]]:
    """The half-open bounding box per axis of ``mask``'s true voxels (the whole array when there are none)."""
    box = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        box.append((int(present[0]), int(present[-1]) + 1) if present.size else (0, mask.shape[axis]))
    return box


def nonzero_bbox(data_czyx: np.ndarray, fill_holes: bool = True) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The non-zero mask of all channels, holes filled, and its half-open bounding box per axis (nnU-Net's crop).

    An all-zero image gives the whole image as its box. The box is that of the mask before its holes
    are filled, which is the same box: a hole is background enclosed by the mask, so it lies inside
    the mask's box (everything outside the box is background that reaches the array's border).
    ``fill_holes=False`` returns the mask unfilled, for callers that need only the box (nnU-Net's
    filling took 0.06 s of a 192 x 192 x 160 CT). A mask without background is returned as it is.
    """
    mask = nonzero_mask(list(data_czyx))
    bbox = mask_box(mask)
    if fill_holes and not mask.all():
        mask = ndimage.binary_fill_holes(mask)
    return mask, bbox
