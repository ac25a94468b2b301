"""Geometry of the bundle's preprocessing: MONAI's orientation and spacing rules on DeepSeg grids.

- ``orientation`` (``Orientationd(axcodes)``): voxel axes permuted and flipped so that they run
  toward ``axcodes`` (nibabel's convention: ``RAS`` = i toward Right, j toward Anterior, k toward
  Superior); each voxel axis goes to the closest world axis, greedily in i, j, k order, so an
  oblique image keeps its rotation. No interpolation (:class:`AxisReorder`).
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
from dataclasses import dataclass

import numpy as np

from ...inference.pipelines import Geometry
from ...io import Volume

#: MONAI's tolerance (mm, affine entries) below which a spacing or an affine counts as unchanged.
AFFINE_TOL = 1e-3
_LPS_RAS = np.diag([-1.0, -1.0, 1.0])
#: axis code -> (world axis in RAS, +1 if the index increases toward R / A / S).
AXIS_CODES = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}


def grid_of(volume: Volume) -> Geometry:
    """The voxel grid of ``volume`` (no voxels)."""
    return Geometry(volume.shape_zyx, volume.spacing_xyz_mm, volume.origin_lps, tuple(np.asarray(volume.direction_lps).ravel()))


def ijk_to_ras(grid: Geometry) -> np.ndarray:
    """4x4 voxel index ``(i, j, k)`` -> RAS mm matrix of ``grid`` (the affine MONAI works with)."""
    direction = np.asarray(grid.direction_lps, dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = _LPS_RAS @ direction @ np.diag(grid.spacing_xyz_mm)
    matrix[:3, 3] = _LPS_RAS @ np.asarray(grid.origin_lps, dtype=float)
    return matrix


def voxel_axis_codes(direction_lps: np.ndarray) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    """For voxel axes i, j, k: ``(closest RAS world axis, +1 / -1)`` as nibabel's ``io_orientation``.

    The direction is first made exactly orthonormal (polar decomposition); then, in axis order
    i, j, k, each axis takes the world axis its direction has the largest component along, and
    that world axis is no longer available to the next ones.
    """
    ras = _LPS_RAS @ np.asarray(direction_lps, dtype=float).reshape(3, 3)
    u, _, vt = np.linalg.svd(ras)
    rotation = u @ vt
    codes = []
    for axis in range(3):
        column = rotation[:, axis]
        world = int(np.argmax(np.abs(column)))
        codes.append((world, 1 if column[world] > 0 else -1))
        rotation[world, :] = 0.0
    return tuple(codes)  # type: ignore[return-value]


@dataclass(frozen=True)
class AxisReorder:
    """Voxel axes permuted and flipped without interpolation (MONAI's ``Orientationd``).

    Attributes:
        source_ijk: for each new voxel axis i', j', k' the old axis (0 = i, 1 = j, 2 = k) it is.
        flip_ijk: whether the new axis runs opposite to that old axis.
    """

    source_ijk: tuple[int, int, int] = (0, 1, 2)
    flip_ijk: tuple[bool, bool, bool] = (False, False, False)

    @classmethod
    def towards(cls, direction_lps: np.ndarray, axcodes: str) -> AxisReorder:
        """The reorder that makes voxel axes run toward ``axcodes`` (e.g. ``RAS``)."""
        codes = voxel_axis_codes(direction_lps)
        source, flips = [], []
        for letter in axcodes:
            world, sign = AXIS_CODES[letter]
            old = next(a for a in range(3) if codes[a][0] == world)
            source.append(old)
            flips.append(codes[old][1] != sign)
        return cls(tuple(source), tuple(flips))  # type: ignore[arg-type]

    @property
    def identity(self) -> bool:
        """True when nothing moves."""
        return self.source_ijk == (0, 1, 2) and not any(self.flip_ijk)

    def _zyx_permutation(self) -> list[int]:
        # array axis q of (Z, Y, X) is voxel axis 2 - q
        return [2 - self.source_ijk[2 - q] for q in range(3)]

    def _zyx_flips(self) -> tuple[int, ...]:
        return tuple(2 - t for t in range(3) if self.flip_ijk[t])

    def apply(self, array: np.ndarray) -> np.ndarray:
        """``(..., Z, Y, X)`` on the old grid -> the same voxels on the new grid (a view)."""
        lead = array.ndim - 3
        out = np.transpose(array, (*range(lead), *(lead + p for p in self._zyx_permutation())))
        flips = self._zyx_flips()
        return np.flip(out, axis=tuple(lead + a for a in flips)) if flips else out

    def undo(self, array: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`apply` (a view)."""
        lead = array.ndim - 3
        flips = self._zyx_flips()
        out = np.flip(array, axis=tuple(lead + a for a in flips)) if flips else array
        inverse = np.argsort(self._zyx_permutation())
        return np.transpose(out, (*range(lead), *(lead + int(p) for p in inverse)))

    def geometry(self, grid: Geometry) -> Geometry:
        """The grid of the reordered voxels (same physical positions)."""
        direction = np.asarray(grid.direction_lps, dtype=float).reshape(3, 3)
        shape_ijk = grid.shape_zyx[::-1]
        origin = np.asarray(grid.origin_lps, dtype=float)
        columns, spacing, shape = [], [], []
        for new_axis, old in enumerate(self.source_ijk):
            column = direction[:, old]
            if self.flip_ijk[new_axis]:
                origin = origin + (shape_ijk[old] - 1) * grid.spacing_xyz_mm[old] * column
                column = -column
            columns.append(column)
            spacing.append(grid.spacing_xyz_mm[old])
            shape.append(shape_ijk[old])
        new_direction = np.stack(columns, axis=1)
        return Geometry(tuple(shape[::-1]), tuple(spacing), tuple(origin), tuple(new_direction.ravel()))  # type: ignore[arg-type]


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
