"""Geometry of the bundle's preprocessing: MONAI's orientation and spacing rules on DeepSeg grids.

- ``orientation`` (``Orientationd(axcodes)``): voxel axes permuted and flipped toward ``axcodes``
  by nibabel's closest-axis rule, no interpolation (:class:`~deepseg_core.pipelines.axes.AxisReorder`,
  shared with the nnU-Net pipeline's ``--reorient ras``).
- ``spacing`` (``Spacingd(pixdim)``): the same direction, spacing ``pixdim`` except along axes
  already within 1e-3 mm of it, and ``round_half_even((n - 1) * s / pixdim + 1)`` voxels per axis.
  The origin stays the first voxel's, except where MONAI's corner test fails by rounding (an
  oblique affine stored in float32): then, as MONAI does, the new grid is centred on the old one,
  a fraction of a voxel away (:func:`spacing_grid`). When MONAI would find the grid unchanged
  (affines within 1e-3) nothing is resampled. The resampling itself is :mod:`.resampling`'s.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from ...inference.pipelines import Geometry
from ..axes import AXIS_CODES, AxisReorder, grid_of, ijk_to_ras, voxel_axis_codes

__all__ = [
    "AFFINE_TOL",
    "AXIS_CODES",
    "AxisReorder",
    "grid_of",
    "ijk_to_ras",
    "index_mapping",
    "spacing_grid",
    "voxel_axis_codes",
]

#: MONAI's tolerance (mm, affine entries) below which a spacing or an affine counts as unchanged.
AFFINE_TOL = 1e-3
_LPS_RAS = np.diag([-1.0, -1.0, 1.0])


def spacing_grid(grid: Geometry, pixdim_xyz_mm: Sequence[float]) -> Geometry | None:
    """The grid MONAI's ``Spacingd(pixdim)`` resamples ``grid`` onto, or None when it keeps it.

    Per axis the spacing is ``pixdim`` unless the current spacing is within :data:`AFFINE_TOL` of
    it (then it is kept). The direction is the rotation part of the affine (Spacingd's Cholesky
    split). The size is where the far corner of the voxel-centre grid lands,
    ``round_half_even(ptp + 1)``, computed through the affines as MONAI does so that sizes on an
    exact half round alike. The origin is the input's first voxel when that corner maps to the
    smallest output index along every axis (to within 1e-8 mm, MONAI's test); otherwise MONAI
    centres the new grid on the old one. After Orientationd the first test holds unless rounding
    in an oblique affine (float32 in NIfTI) makes another corner fall a few nanometres below it;
    the centred origin, off by a fraction of a voxel, is then what MONAI uses, and so is it here.
    """
    affine = ijk_to_ras(grid)
    current = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    target = np.asarray(pixdim_xyz_mm, dtype=float)
    target = np.where(np.abs(current - target) <= AFFINE_TOL, current, target)
    rzs = affine[:3, :3]
    zooms = np.linalg.cholesky(rzs.T @ rzs).T
    rotation = rzs @ np.linalg.inv(zooms)
    new_affine = np.eye(4)
    new_affine[:3, :3] = rotation @ np.diag(np.sign(np.diag(zooms)) * target)
    shape_ijk = np.asarray(grid.shape_zyx[::-1], dtype=float)
    corners = np.array(list(itertools.product(*[(0.0, n - 1.0) for n in shape_ijk]))).T
    corners = np.concatenate([corners, np.ones((1, corners.shape[1]))])
    mapped = np.linalg.solve(new_affine, affine) @ corners
    new_shape = np.round(np.ptp(mapped[:3] / mapped[3], axis=1) + 1.0)
    physical = affine @ corners
    offset = None
    for index in range(corners.shape[1]):
        if np.allclose(np.min(mapped[:3] - mapped[:3, index : index + 1], axis=1), 0.0, rtol=AFFINE_TOL):
            offset = physical[:3, index]
            break
    if offset is None:
        offset = rzs @ (shape_ijk / 2.0) + affine[:3, 3] - new_affine[:3, :3] @ (new_shape / 2.0)
    new_affine[:3, 3] = offset
    new_shape = new_shape.astype(int)
    xform = np.linalg.solve(affine, new_affine)
    same_size = np.array_equal(new_shape, shape_ijk.astype(int))
    if same_size and (np.allclose(affine, new_affine, atol=AFFINE_TOL) or np.allclose(xform, np.eye(4), atol=AFFINE_TOL)):
        return None
    direction_lps = _LPS_RAS @ rotation
    return Geometry(
        tuple(int(n) for n in new_shape[::-1]),  # type: ignore[arg-type]
        tuple(float(t) for t in target),  # type: ignore[arg-type]
        tuple(float(o) for o in _LPS_RAS @ offset),  # type: ignore[arg-type]
        tuple(float(d) for d in direction_lps.ravel()),
    )


def index_mapping(source: Geometry, target: Geometry) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """``(ratio_zyx, shift_zyx)``: target voxel ``r`` lies at source voxel ``r * ratio + shift`` per array axis.

    Valid for grids with the same direction (up to rounding), which Spacingd guarantees.
    """
    direction = np.asarray(source.direction_lps, dtype=float).reshape(3, 3)
    offset = direction.T @ (np.asarray(target.origin_lps, dtype=float) - np.asarray(source.origin_lps, dtype=float))
    ratio_xyz = [t / s for t, s in zip(target.spacing_xyz_mm, source.spacing_xyz_mm, strict=True)]
    shift_xyz = [float(o / s) for o, s in zip(offset, source.spacing_xyz_mm, strict=True)]
    return tuple(ratio_xyz[::-1]), tuple(shift_xyz[::-1])  # type: ignore[return-value]
