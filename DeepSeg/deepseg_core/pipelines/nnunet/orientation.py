"""TotalSegmentator's first step: the voxels reoriented to the closest RAS orientation, and back (setting ``reorient``).

TotalSegmentator hands nnU-Net ``nibabel.as_closest_canonical(image)`` and turns the prediction back
with ``as_reoriented`` and the inverse orientation; its models are trained on images so reoriented.
``reorient: "ras"`` does the same here: the voxel axes are permuted and flipped, without
interpolation, so that i runs toward Right, j toward Anterior and k toward Superior as closely as
the image's direction allows. The axes are chosen by nibabel's rule (``io_orientation``): the
direction made exactly orthonormal, then voxel axis i, j, k in turn takes the world axis it has
the largest component along, which is then no longer available to the next; an oblique image stays
oblique. That rule is MONAI's ``Orientationd``'s as well, so the MONAI pipeline's
:class:`~deepseg_core.pipelines.monai_bundle.geometry.AxisReorder` applies it.

nnU-Net's preprocessing then runs on the reordered voxels with their reordered spacing (nnU-Net
reads nothing else of the image), and the export writes its results through the reorder's view of
arrays allocated on the input grid, so they land there without a copy. ``none`` (the default)
keeps the voxels as read, which is what ``nnUNetPredictor`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ...errors import ConfigError
from ...io import Volume
from ..axes import AxisReorder, grid_of

#: the ``reorient`` settings: ``none`` (nnU-Net's own behaviour) or ``ras`` (TotalSegmentator's).
REORIENTATIONS = ("none", "ras")


def check_reorient(value: object) -> str:
    """``value`` as a ``reorient`` setting; a :class:`ConfigError` naming the valid ones otherwise."""
    if value not in REORIENTATIONS:
        raise ConfigError(
            "unknown reorientation in the nnunetv2 pipeline settings",
            expected=" or ".join(REORIENTATIONS),
            found=repr(value),
            hint="Re-import the model with `deepseg models import FOLDER --reorient ras` (or none).",
        )
    return str(value)


def reorientation(volume: Volume, reorient: str) -> AxisReorder:
    """The voxel reorder ``reorient`` asks for on ``volume``'s grid (nothing moves for ``none``)."""
    if check_reorient(reorient) == "none":
        return AxisReorder()
    return AxisReorder.towards(np.asarray(volume.direction_lps, dtype=float), "RAS")


def reoriented_spacing_zyx(volume: Volume, reorder: AxisReorder) -> list[float]:
    """The spacing per array axis ``(z, y, x)`` of ``volume``'s voxels after ``reorder`` (mm)."""
    spacing_xyz = volume.spacing_xyz_mm if reorder.identity else reorder.geometry(grid_of(volume)).spacing_xyz_mm
    return [abs(float(s)) for s in spacing_xyz[::-1]]


def input_shape(reorder: AxisReorder, reoriented_zyx: Sequence[int]) -> tuple[int, int, int]:
    """The input grid's shape ``(Z, Y, X)`` whose voxels ``reorder`` turns into an array of shape ``reoriented_zyx``."""
    reoriented_ijk = [int(s) for s in reoriented_zyx][::-1]
    shape_ijk = [0, 0, 0]
    for new_axis, old_axis in enumerate(reorder.source_ijk):
        shape_ijk[old_axis] = reoriented_ijk[new_axis]
    return (shape_ijk[2], shape_ijk[1], shape_ijk[0])
