"""nnU-Net's crop: the bounding box of the non-zero voxels of any channel (holes filled)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def nonzero_bbox(data_czyx: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The filled non-zero mask of all channels and its half-open bounding box per axis (nnU-Net's crop).

    An all-zero image gives the whole image as its box.
    """
    mask = data_czyx[0] != 0
    for c in range(1, data_czyx.shape[0]):
        mask |= data_czyx[c] != 0
    mask = ndimage.binary_fill_holes(mask)
    bbox = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        bbox.append((int(present[0]), int(present[-1]) + 1) if present.size else (0, mask.shape[axis]))
    return mask, bbox
