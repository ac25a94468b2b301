"""Resampling as MONAI does it, between grids of one direction (:mod:`.geometry`).

Linear interpolation with edge values outside (MONAI's ``padding_mode="border"``), or nearest with
ties to even (as ``grid_sample``). Because both grids share one direction, each array axis is
resampled on its own: target voxel ``r`` reads source position ``r * ratio + shift``
(:func:`~.geometry.index_mapping`).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ...inference.pipelines import Geometry
from .geometry import index_mapping


def _sitk_image(array_zyx: np.ndarray, grid: Geometry) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx, dtype=np.float32))
    image.SetSpacing(tuple(float(s) for s in grid.spacing_xyz_mm))
    image.SetOrigin(tuple(float(o) for o in grid.origin_lps))
    image.SetDirection(tuple(float(d) for d in grid.direction_lps))
    return image


def resample_linear_border(array_zyx: np.ndarray, source: Geometry, target: Geometry) -> np.ndarray:
    """Linear resampling onto ``target`` with edge values outside ``source`` (MONAI's ``border``).

    SimpleITK's linear interpolator already clamps within half a voxel of the edge; the
    nearest-neighbour extrapolator does the same further out. Returns float32 ``target.shape_zyx``.
    """
    reference = sitk.Image([int(s) for s in target.shape_zyx[::-1]], sitk.sitkUInt8)
    reference.SetSpacing(tuple(float(s) for s in target.spacing_xyz_mm))
    reference.SetOrigin(tuple(float(o) for o in target.origin_lps))
    reference.SetDirection(tuple(float(d) for d in target.direction_lps))
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(reference)
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    resampler.SetUseNearestNeighborExtrapolator(True)
    return sitk.GetArrayFromImage(resampler.Execute(_sitk_image(array_zyx, source)))


def scaled_positions(count: int, ratio: float, start: int = 0, shift: float = 0.0) -> np.ndarray:
    """Source voxel positions (float64) of target voxels ``start .. start + count - 1``
    (``r * ratio + shift``, see :func:`index_mapping`)."""
    positions = np.arange(start, start + count, dtype=np.float64) * ratio
    return positions + shift if shift else positions


def nearest_indices(positions: np.ndarray, size: int) -> np.ndarray:
    """Nearest source voxel of each position: ties to even (as ``grid_sample``), clamped to the image."""
    return np.clip(np.rint(positions), 0, size - 1).astype(np.intp)


def interpolate_axis(array: np.ndarray, axis: int, positions: np.ndarray, size: int, mode: str, offset: int = 0) -> np.ndarray:
    """Resample ``array`` along ``axis`` at source ``positions`` (edge values beyond the image).

    ``array`` holds source voxels ``offset .. offset + array.shape[axis] - 1`` of an axis of
    ``size`` voxels. ``linear`` computes in float64, ``nearest`` keeps the dtype.
    """
    if mode == "nearest":
        return np.take(array, nearest_indices(positions, size) - offset, axis=axis)
    clamped = np.clip(positions, 0, size - 1)
    low = np.floor(clamped).astype(np.intp)
    high = np.minimum(low + 1, size - 1)
    weight = clamped - low
    shape = [1] * array.ndim
    shape[axis] = len(positions)
    weight = weight.reshape(shape)
    if not weight.any():
        return np.take(array, low - offset, axis=axis).astype(np.float64)
    below = np.take(array, low - offset, axis=axis).astype(np.float64)
    above = np.take(array, high - offset, axis=axis).astype(np.float64)
    return below * (1.0 - weight) + above * weight


def resample_nearest(array: np.ndarray, source: Geometry, target: Geometry) -> np.ndarray:
    """``(..., Z, Y, X)`` nearest resampling between grids of one direction (ties to even, edge values outside)."""
    out = array
    lead = array.ndim - 3
    ratio, shift = index_mapping(source, target)
    for q in range(3):
        positions = scaled_positions(target.shape_zyx[q], ratio[q], shift=shift[q])
        out = interpolate_axis(out, lead + q, positions, source.shape_zyx[q], "nearest")
    return np.ascontiguousarray(out)
