"""Voxel axes reordered toward world directions without interpolation (shared by imported pipelines).

Each voxel axis goes to the closest world axis, greedily in i, j, k order (nibabel's rule, which
MONAI's ``Orientationd`` and TotalSegmentator's ``as_closest_canonical`` use), so an oblique image
keeps its rotation; the axes are then permuted and flipped so that they run toward the asked codes
(``RAS``: i toward Right, j toward Anterior, k toward Superior). :class:`AxisReorder` does it and
undoes it on arrays and grids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..inference.pipelines import Geometry
from ..io import Volume

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

    def input_axis_names(self) -> tuple[str, str, str]:
        """For each array axis ``(z, y, x)`` of the reordered voxels, the input array axis it was."""
        return tuple("zyx"[p] for p in self._zyx_permutation())  # type: ignore[return-value]

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
