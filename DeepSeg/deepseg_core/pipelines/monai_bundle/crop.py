"""The bundle's foreground crop: ``crop_foreground`` (``CropForegroundd``).

The bounding box of voxels above 0 in any channel, plus ``margin``, clamped to the image when
``allow_smaller``, else padded with zeros. The box is kept so that the way back (:mod:`.collector`)
can un-crop with zeros, as ``Invertd`` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...errors import ImageError


@dataclass(frozen=True)
class CropBox:
    """A box of the model grid ``[start, stop)`` per array axis (z, y, x); may extend beyond it."""

    start_zyx: tuple[int, int, int]
    stop_zyx: tuple[int, int, int]


def foreground_box(data_czyx: torch.Tensor, margin_xyz: Sequence[int], allow_smaller: bool) -> CropBox:
    """CropForegroundd's box: voxels above 0 in any channel, plus ``margin`` (clamped when ``allow_smaller``)."""
    foreground = (data_czyx > 0).any(dim=0)
    if not bool(foreground.any()):
        raise ImageError(
            "the bundle crops to the foreground, but no voxel is above 0 after its intensity mapping",
            expected="an image with voxels above the bundle's lower intensity bound",
            found="an empty foreground",
            hint="Check that the image is of the model's modality and intensity range.",
        )
    start, stop = [], []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        present = torch.nonzero(foreground.any(dim=others)).flatten()
        margin = int(margin_xyz[2 - axis])
        low, high = int(present[0]) - margin, int(present[-1]) + margin + 1
        if allow_smaller:
            low, high = max(low, 0), min(high, foreground.shape[axis])
        start.append(low)
        stop.append(high)
    return CropBox(tuple(start), tuple(stop))  # type: ignore[arg-type]


def crop_pad(array: np.ndarray | torch.Tensor, box: CropBox, fill: float = 0.0) -> Any:
    """``array[..., box]`` with ``fill`` where the box extends beyond the array (numpy or torch)."""
    shape = array.shape[-3:]
    sizes = [b - a for a, b in zip(box.start_zyx, box.stop_zyx, strict=True)]
    lead = tuple(array.shape[:-3])
    if isinstance(array, torch.Tensor):
        out: Any = torch.full((*lead, *sizes), fill, dtype=array.dtype)
    else:
        out = np.full((*lead, *sizes), fill, dtype=array.dtype)
    src, dst = [], []
    for a, b, n in zip(box.start_zyx, box.stop_zyx, shape, strict=True):
        lo, hi = max(a, 0), min(b, n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - a, hi - a))
    out[(..., *dst)] = array[(..., *src)]
    return out
