"""The ``monai_bundle`` pipeline: a MONAI bundle's own inference, reproduced step by step.

A bundle's ``inference.json`` chains MONAI transforms, an inferer and postprocessing. The importer
(:mod:`deepseg_core.importers.monai_bundle`) maps the ones DeepSeg reproduces exactly into this
pipeline's config (``card.pipeline["config"]``, see :func:`parse_config`); everything else is
refused at import. The semantics below are MONAI 1.6's; they were checked voxel by voxel against
MONAI's own bundle runner (``Testing/foreign/test_monai_import.py``).

Preprocessing (``steps``, applied in the bundle's order; arrays are DeepSeg's ``(C, Z, Y, X)``):

- ``orientation`` (``Orientationd(axcodes)``): voxel axes permuted and flipped so that they run
  toward ``axcodes`` (nibabel's convention: ``RAS`` = i toward Right, j toward Anterior, k toward
  Superior); each voxel axis goes to the closest world axis, greedily in i, j, k order, so an
  oblique image keeps its rotation. No interpolation.
- ``spacing`` (``Spacingd(pixdim)``): the same direction, spacing ``pixdim`` except along axes
  already within 1e-3 mm of it, and ``round_half_even((n - 1) * s / pixdim + 1)`` voxels per axis.
  The origin stays the first voxel's, except where MONAI's corner test fails by rounding (an
  oblique affine stored in float32): then, as MONAI does, the new grid is centred on the old one,
  a fraction of a voxel away (:func:`spacing_grid`). Linear interpolation with edge values outside
  (MONAI's ``padding_mode="border"``), or nearest with ties to even. When MONAI would find the
  grid unchanged (affines within 1e-3) nothing is resampled.
- intensity: ``scale_intensity_range`` (``ScaleIntensityRanged``), ``scale_intensity``
  (``ScaleIntensityd``, min-max), ``normalize_intensity`` (``NormalizeIntensityd``: population
  std, optionally over non-zero voxels only and per channel), ``scale_intensity_range_percentiles``
  (``ScaleIntensityRangePercentilesd``), each in float32 with MONAI's order of operations and on
  the image as it is at that point (statistics after resampling when the bundle resamples first).
- ``crop_foreground`` (``CropForegroundd``): the bounding box of voxels above 0 in any channel,
  plus ``margin``, clamped to the image when ``allow_smaller``, else padded with zeros.

Sliding window (``inferer``, ``SlidingWindowInferer``): tiles of ``roi_size`` placed as MONAI places
them (step ``int(roi * (1 - overlap))``, the last tile pulled back to end at the border; registered
here as placement ``monai``), an image smaller than a tile padded symmetrically, constant or
Gaussian tile weights (``sigma_scale * roi``, clamped at 1e-3; importance ``monai_gaussian``), and
the raw logits averaged (``blend="logits"``).

Back to the input grid (``postprocessing``): softmax (or sigmoid, or none) of the stitched logits,
then ``Invertd``: the model grid is un-cropped with zeros, resampled back onto the oriented input
grid (linear with edge values, or nearest when ``nearest_interp``; one direction, so each axis is
resampled on its own, :func:`index_mapping`) and un-oriented; the label is
the argmax over channels (lowest channel on ties), taken after the inversion, or before it when the
bundle discretises first (only with nearest inversion). The one known difference: where an input
voxel lies exactly half-way between two model voxels, MONAI's nearest choice is decided by rounding
in ``grid_sample``'s coordinates (1e-9 terms of its affine), DeepSeg's by rounding half to even;
labels can differ on those planes only. :class:`BundleGridCollector` does this
slab by slab as the sliding window finishes model slices, keeping only the model slices the next
input slices interpolate between (plus one slab), so memory does not grow with classes x slices.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import ConfigError, ImageError
from ..inference.pipelines import CollectedOutput, Geometry, Pipeline, PreparedInput
from ..inference.sliding_window import IMPORTANCE_MAPS, TILE_PLACEMENTS, SlidingWindowConfig
from ..io import Volume
from ..uncertainty import normalised_entropy

log = logging.getLogger(__name__)

#: MONAI's tolerance (mm, affine entries) below which a spacing or an affine counts as unchanged.
AFFINE_TOL = 1e-3
#: MONAI inferer padding_mode -> DeepSeg sliding-window ``pad`` (MONAI pads small images symmetrically).
PAD_FOR_MONAI = {"constant": "center", "replicate": "center_replicate", "reflect": "center_reflect"}
_LPS_RAS = np.diag([-1.0, -1.0, 1.0])
#: axis code -> (world axis in RAS, +1 if the index increases toward R / A / S).
_AXIS_CODES = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}
#: bytes of float64 work arrays per interpolation chunk when resampling back (bounds the peak for many classes).
_CHUNK_BYTES = 64 << 20


# ------------------------------------------------------------------------------------------------
# MONAI's tile placement and Gaussian importance map, registered for the sliding window


def monai_tile_starts(length: int, patch: int, overlap: float) -> list[int]:
    """Tile starts along one axis as MONAI's ``SlidingWindowInferer`` places them.

    ``length`` is the (padded) image length, at least ``patch``. Steps of
    ``max(int(patch * (1 - overlap)), 1)`` voxels until a tile reaches the end; that last tile is
    pulled back to end exactly at ``length`` (so the last overlap is usually larger).
    """
    if patch >= length:
        return [0]
    step = max(int(patch * (1 - overlap)), 1)
    starts = []
    index = 0
    while index * step + patch < length:
        starts.append(index * step)
        index += 1
    starts.append(length - patch)
    return starts


def monai_gaussian_importance(patch_size_zyx: Sequence[int], sigma_scale: float) -> torch.Tensor:
    """MONAI's Gaussian tile weights ``(pz, py, px)`` float32: no normalisation, clamped at 1e-3.

    Per axis ``exp(-d**2 / (2 * sigma**2))`` with ``d`` the distance (voxels) from the tile centre
    ``(size - 1) / 2`` and ``sigma = sigma_scale * size``, multiplied in MONAI's axis order
    (x, y, z) in float32 so the weights are bit-identical to MONAI's.
    """
    sizes_xyz = [int(s) for s in reversed(patch_size_zyx)]
    profiles = []
    for size in sizes_xyz:
        sigma = size * sigma_scale
        offsets = torch.arange(-(size - 1) / 2.0, (size - 1) / 2.0 + 1, dtype=torch.float32)
        profiles.append(torch.exp(offsets**2 / (-2 * sigma**2)))
    gx, gy, gz = profiles
    weights = (gx[:, None] * gy[None, :])[:, :, None] * gz[None, None, :]
    weights = torch.clamp(weights, min=max(float(weights.min()), 1e-3))
    return weights.permute(2, 1, 0).contiguous()


TILE_PLACEMENTS.setdefault("monai", monai_tile_starts)
IMPORTANCE_MAPS.setdefault("monai_gaussian", monai_gaussian_importance)


# ------------------------------------------------------------------------------------------------
# the pipeline config

STEP_FIELDS: dict[str, tuple[str, ...]] = {
    "orientation": ("axcodes",),
    "spacing": ("pixdim_xyz_mm", "mode"),
    "scale_intensity_range": ("a_min", "a_max", "b_min", "b_max", "clip"),
    "scale_intensity": ("minv", "maxv", "channel_wise"),
    "normalize_intensity": ("subtrahend", "divisor", "nonzero", "channel_wise"),
    "scale_intensity_range_percentiles": ("lower", "upper", "b_min", "b_max", "clip", "relative", "channel_wise"),
    "crop_foreground": ("margin_xyz", "allow_smaller"),
}
INTENSITY_OPS = ("scale_intensity_range", "scale_intensity", "normalize_intensity", "scale_intensity_range_percentiles")
ACTIVATIONS = ("softmax", "sigmoid", "none")
INVERT_INTERPOLATIONS = ("linear", "nearest")


@dataclass(frozen=True)
class InfererSettings:
    """``SlidingWindowInferer`` settings (MONAI's axis order x, y, z)."""

    roi_size_xyz: tuple[int, int, int]
    overlap: float = 0.25
    mode: str = "constant"
    sigma_scale: float = 0.125
    sw_batch_size: int = 1
    padding_mode: str = "constant"


@dataclass(frozen=True)
class PostprocessingSettings:
    """How the stitched logits become labels on the input grid.

    Attributes:
        activation: ``softmax``, ``sigmoid`` (one logit; the network returns ``[0, logit]``, whose
            softmax is the sigmoid) or ``none``.
        argmax_before_invert: labels are taken on the model grid and resampled back (nearest).
        invert_interpolation: ``linear`` or ``nearest`` (Invertd's ``nearest_interp``).
    """

    activation: str = "softmax"
    argmax_before_invert: bool = False
    invert_interpolation: str = "linear"


@dataclass(frozen=True)
class BundleSettings:
    """The parsed, checked pipeline config (see the module docstring)."""

    steps: tuple[dict[str, Any], ...]
    inferer: InfererSettings
    postprocessing: PostprocessingSettings = field(default_factory=PostprocessingSettings)

    @property
    def target_spacing_xyz_mm(self) -> tuple[float, float, float] | None:
        """The Spacingd pixdim (x, y, z) mm, or None when the bundle does not resample."""
        for step in self.steps:
            if step["op"] == "spacing":
                return tuple(float(v) for v in step["pixdim_xyz_mm"])  # type: ignore[return-value]
        return None


def parse_config(config: dict[str, Any]) -> BundleSettings:
    """Check a pipeline config (``card.pipeline["config"]``) and return its settings.

    Raises:
        ConfigError: listing every problem (unknown step, missing or unknown field, bad value,
            steps in an order the pipeline cannot reproduce).
    """
    problems: list[str] = []
    steps = config.get("steps")
    if not isinstance(steps, list):
        problems.append("'steps' must be a list")
        steps = []
    seen: list[str] = []
    for index, step in enumerate(steps):
        where = f"steps[{index}]"
        if not isinstance(step, dict) or step.get("op") not in STEP_FIELDS:
            problems.append(f"{where}: unknown step {step.get('op') if isinstance(step, dict) else step!r}")
            continue
        op = step["op"]
        expected = set(STEP_FIELDS[op])
        missing, unknown = sorted(expected - set(step)), sorted(set(step) - expected - {"op"})
        if missing or unknown:
            problems.append(f"{where} ({op}): missing {missing}, unknown {unknown}")
            continue
        problems.extend(f"{where} ({op}): {p}" for p in _step_value_problems(step))
        if op in seen and op in ("orientation", "spacing", "crop_foreground"):
            problems.append(f"{where}: a second {op} step")
        if op == "spacing" and "orientation" not in seen and "orientation" in [s.get("op") for s in steps[index:]]:
            problems.append(f"{where}: spacing before orientation is not reproduced (MONAI bundles orient first)")
        if op == "crop_foreground" and "spacing" not in seen and "spacing" in [s.get("op") for s in steps[index:]]:
            problems.append(f"{where}: crop_foreground before spacing is not reproduced")
        seen.append(op)
    inferer_data = config.get("inferer")
    inferer = None
    if not isinstance(inferer_data, dict):
        problems.append("'inferer' must be an object")
    else:
        try:
            roi = tuple(int(v) for v in inferer_data["roi_size_xyz"])
            inferer = InfererSettings(
                roi_size_xyz=roi,  # type: ignore[arg-type]
                overlap=float(inferer_data.get("overlap", 0.25)),
                mode=str(inferer_data.get("mode", "constant")),
                sigma_scale=float(inferer_data.get("sigma_scale", 0.125)),
                sw_batch_size=int(inferer_data.get("sw_batch_size", 1)),
                padding_mode=str(inferer_data.get("padding_mode", "constant")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            problems.append(f"inferer: {exc!r}")
        if inferer is not None:
            if len(inferer.roi_size_xyz) != 3 or min(inferer.roi_size_xyz) < 1:
                problems.append(f"inferer: roi_size_xyz must be 3 positive sizes, found {list(inferer.roi_size_xyz)}")
            if not 0.0 <= inferer.overlap < 1.0:
                problems.append(f"inferer: overlap must be in [0, 1), found {inferer.overlap}")
            if inferer.mode not in ("constant", "gaussian"):
                problems.append(f"inferer: mode must be constant or gaussian, found {inferer.mode!r}")
            if inferer.padding_mode not in PAD_FOR_MONAI:
                problems.append(f"inferer: padding_mode must be one of {sorted(PAD_FOR_MONAI)}, found {inferer.padding_mode!r}")
            if inferer.sw_batch_size < 1 or inferer.sigma_scale <= 0:
                problems.append("inferer: sw_batch_size must be >= 1 and sigma_scale > 0")
    post_data = config.get("postprocessing", {})
    post = PostprocessingSettings(
        activation=str(post_data.get("activation", "softmax")),
        argmax_before_invert=bool(post_data.get("argmax_before_invert", False)),
        invert_interpolation=str(post_data.get("invert_interpolation", "linear")),
    )
    if post.activation not in ACTIVATIONS:
        problems.append(f"postprocessing: activation must be one of {list(ACTIVATIONS)}, found {post.activation!r}")
    if post.invert_interpolation not in INVERT_INTERPOLATIONS:
        problems.append(f"postprocessing: invert_interpolation must be linear or nearest, found {post.invert_interpolation!r}")
    if post.argmax_before_invert and post.invert_interpolation != "nearest":
        problems.append("postprocessing: labels taken before Invertd can only be resampled back with nearest interpolation")
    if problems or inferer is None:
        raise ConfigError(
            "the MONAI bundle pipeline config is invalid",
            found="; ".join(problems),
            hint="Re-import the bundle with `deepseg models import`; model cards must not be edited by hand.",
        )
    return BundleSettings(tuple(dict(s) for s in steps), inferer, post)


def _step_value_problems(step: dict[str, Any]) -> list[str]:
    """Values a step cannot take (types and ranges)."""
    op = step["op"]
    problems = []

    def number(name: str, optional: bool = False) -> None:
        value = step[name]
        if value is None and optional:
            return
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            problems.append(f"{name} must be a number, found {value!r}")

    if op == "orientation":
        codes = step["axcodes"]
        if not (isinstance(codes, str) and len(codes) == 3 and {_AXIS_CODES.get(c, (9, 0))[0] for c in codes} == {0, 1, 2}):
            problems.append(f"axcodes must name one direction of each axis (e.g. RAS), found {codes!r}")
    elif op == "spacing":
        pixdim = step["pixdim_xyz_mm"]
        if not (isinstance(pixdim, list) and len(pixdim) == 3 and all(isinstance(v, int | float) and v > 0 for v in pixdim)):
            problems.append(f"pixdim_xyz_mm must be 3 positive spacings, found {pixdim!r}")
        if step["mode"] not in ("bilinear", "nearest"):
            problems.append(f"mode must be bilinear or nearest, found {step['mode']!r}")
    elif op == "scale_intensity_range":
        for name in ("a_min", "a_max"):
            number(name)
        for name in ("b_min", "b_max"):
            number(name, optional=True)
    elif op == "scale_intensity":
        number("minv")
        number("maxv")
    elif op == "normalize_intensity":
        for name in ("subtrahend", "divisor"):
            value = step[name]
            if value is not None and not isinstance(value, int | float | list):
                problems.append(f"{name} must be a number, a list per channel or null, found {value!r}")
    elif op == "scale_intensity_range_percentiles":
        for name in ("lower", "upper"):
            number(name)
            if not 0 <= step[name] <= 100:
                problems.append(f"{name} must be a percentile in [0, 100], found {step[name]!r}")
        for name in ("b_min", "b_max"):
            number(name, optional=True)
    elif op == "crop_foreground":
        margin = step["margin_xyz"]
        if not (isinstance(margin, list) and len(margin) == 3 and all(isinstance(m, int) and m >= 0 for m in margin)):
            problems.append(f"margin_xyz must be 3 non-negative integers, found {margin!r}")
    return problems


# ------------------------------------------------------------------------------------------------
# geometry: orientation and MONAI's spacing rule


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
            world, sign = _AXIS_CODES[letter]
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


# ------------------------------------------------------------------------------------------------
# intensity steps (float32 torch, MONAI's order of operations)


def _as_float(value: Any) -> float | None:
    return None if value is None else float(value)


def scale_intensity_range(x: torch.Tensor, step: dict[str, Any]) -> torch.Tensor:
    """``(x - a_min) / (a_max - a_min) * (b_max - b_min) + b_min``, clipped to ``[b_min, b_max]`` when asked."""
    a_min, a_max = float(step["a_min"]), float(step["a_max"])
    b_min, b_max = _as_float(step["b_min"]), _as_float(step["b_max"])
    if a_max - a_min == 0.0:
        return x - a_min if b_min is None else x - a_min + b_min
    x = (x - a_min) / (a_max - a_min)
    if b_min is not None and b_max is not None:
        x = x * (b_max - b_min) + b_min
    if step["clip"] and b_min is not None and b_max is not None:
        x = torch.clamp(x, b_min, b_max)
    return x


def _min_max(x: torch.Tensor, minv: float, maxv: float) -> torch.Tensor:
    low, high = x.min(), x.max()
    if low == high:
        return x * minv
    return (x - low) / (high - low) * (maxv - minv) + minv


def scale_intensity(x: torch.Tensor, step: dict[str, Any]) -> torch.Tensor:
    """Min-max rescaling of the whole image (or each channel) to ``[minv, maxv]``."""
    minv, maxv = float(step["minv"]), float(step["maxv"])
    if step["channel_wise"]:
        return torch.stack([_min_max(c, minv, maxv) for c in x])
    return _min_max(x, minv, maxv)


def _normalize(x: torch.Tensor, nonzero: bool, subtrahend: float | None, divisor: float | None) -> torch.Tensor:
    x = x.clone()
    if nonzero:
        mask = x != 0
        if not mask.any():
            return x
        values = x[mask]
    else:
        mask, values = None, x
    mean = subtrahend if subtrahend is not None else torch.mean(values.float()).item()
    std = divisor if divisor is not None else torch.std(values.float(), unbiased=False).item()
    if std == 0.0:
        std = 1.0
    if mask is not None:
        x[mask] = (values - mean) / std
        return x
    return (x - mean) / std


def normalize_intensity(x: torch.Tensor, step: dict[str, Any]) -> torch.Tensor:
    """``(x - mean) / std`` (population std; 0 becomes 1), over non-zero voxels only when ``nonzero``."""
    subtrahend, divisor = step["subtrahend"], step["divisor"]
    if step["channel_wise"]:
        channels = []
        for c, channel in enumerate(x):
            sub = subtrahend[c] if isinstance(subtrahend, list) else subtrahend
            div = divisor[c] if isinstance(divisor, list) else divisor
            channels.append(_normalize(channel, step["nonzero"], _as_float(sub), _as_float(div)))
        return torch.stack(channels)
    return _normalize(x, step["nonzero"], _as_float(subtrahend), _as_float(divisor))


def _percentile(x: torch.Tensor, q: float) -> float:
    # MONAI uses numpy's percentile above 1e6 voxels and torch.quantile below (same linear rule).
    if x.numel() > 1_000_000:
        return float(np.percentile(x.numpy(), q))
    return float(torch.quantile(x.flatten(), q / 100.0))


def scale_intensity_range_percentiles(x: torch.Tensor, step: dict[str, Any]) -> torch.Tensor:
    """ScaleIntensityRange with ``a_min`` / ``a_max`` the image's ``lower`` / ``upper`` percentiles."""

    def one(values: torch.Tensor) -> torch.Tensor:
        lower, upper = float(step["lower"]), float(step["upper"])
        b_min, b_max = _as_float(step["b_min"]), _as_float(step["b_max"])
        if step["relative"] and b_min is not None and b_max is not None:
            b_min, b_max = (b_max - b_min) * (lower / 100.0) + b_min, (b_max - b_min) * (upper / 100.0) + b_min
        scaled = {"a_min": _percentile(values, lower), "a_max": _percentile(values, upper), "b_min": b_min, "b_max": b_max}
        return scale_intensity_range(values, {**scaled, "clip": step["clip"]})

    if step["channel_wise"]:
        return torch.stack([one(c) for c in x])
    return one(x)


INTENSITY_FUNCTIONS = {
    "scale_intensity_range": scale_intensity_range,
    "scale_intensity": scale_intensity,
    "normalize_intensity": normalize_intensity,
    "scale_intensity_range_percentiles": scale_intensity_range_percentiles,
}


# ------------------------------------------------------------------------------------------------
# foreground crop


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


# ------------------------------------------------------------------------------------------------
# the pipeline


@dataclass
class _Prepared:
    data: torch.Tensor
    label: np.ndarray | None
    reorder: AxisReorder
    oriented: Geometry
    model: Geometry
    crop: CropBox | None


class MonaiBundlePipeline(Pipeline):
    """Preparation, sliding-window settings and way back of a MONAI bundle (module docstring)."""

    name = "monai_bundle"

    def __init__(self, card: Any, spatial_dims: int, context_slices: int) -> None:
        super().__init__(card, spatial_dims, context_slices)
        if spatial_dims != 3:
            raise ConfigError("MONAI bundle models are 3D", found=f"spatial_dims {spatial_dims}")
        self.settings = parse_config(self.config)

    # -------------------------------------------------------------- preprocessing
    def _run_steps(self, channels: Sequence[Volume], label: Volume | None = None) -> _Prepared:
        grid = grid_of(channels[0])
        data = torch.from_numpy(np.stack([np.asarray(v.array_zyx, dtype=np.float32) for v in channels]))
        label_array = None if label is None else np.asarray(label.array_zyx)
        reorder, oriented, crop = AxisReorder(), grid, None
        for step in self.settings.steps:
            op = step["op"]
            if op == "orientation":
                reorder = AxisReorder.towards(np.asarray(grid.direction_lps).reshape(3, 3), step["axcodes"])
                if not reorder.identity:
                    data = torch.from_numpy(np.ascontiguousarray(reorder.apply(data.numpy())))
                    label_array = None if label_array is None else np.ascontiguousarray(reorder.apply(label_array))
                    grid = reorder.geometry(grid)
                oriented = grid
            elif op == "spacing":
                target = spacing_grid(grid, step["pixdim_xyz_mm"])
                if target is not None:
                    if step["mode"] == "nearest":
                        data = torch.from_numpy(resample_nearest(data.numpy(), grid, target))
                    else:
                        data = torch.from_numpy(np.stack([resample_linear_border(c, grid, target) for c in data.numpy()]))
                    label_array = None if label_array is None else resample_nearest(label_array, grid, target)
                    grid = target
            elif op == "crop_foreground":
                crop = foreground_box(data, step["margin_xyz"], step["allow_smaller"])
                data = crop_pad(data, crop)
                label_array = None if label_array is None else crop_pad(label_array, crop)
            else:
                data = INTENSITY_FUNCTIONS[op](data, step).to(torch.float32)
        return _Prepared(data, label_array, reorder, oriented, grid, crop)

    def prepare(self, channels: Sequence[Volume]) -> PreparedInput:
        """The network input ``(C, Z, Y, X)`` float32 on the (cropped) model grid, as the bundle prepares it.

        ``context`` holds the reorder, the oriented input grid, the model grid and the crop box.
        """
        run = self._run_steps(channels)
        image = np.ascontiguousarray(run.data.numpy(), dtype=np.float32)
        log.debug("MONAI bundle input %s -> network input %s", channels[0].shape_zyx, image.shape)
        context = {"reorder": run.reorder, "oriented_grid": run.oriented, "model_grid": run.model, "crop": run.crop}
        return PreparedInput(image, None, context)

    def prepare_training_case(self, images: Sequence[Volume], label: Volume | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A training case as the bundle's preprocessing makes it (for fine-tuning).

        Args:
            images: one volume per input channel, on one grid.
            label: label values on the same grid (a Volume, or its ``(Z, Y, X)`` array).

        Returns:
            ``(image_czyx, label_zyx)``: float32 ``(C, Z, Y, X)`` network input (exactly what
            :meth:`prepare` makes) and the labels on the same (cropped) model grid, reoriented and
            resampled with nearest neighbours (ties to even), 0 where the crop extends beyond the
            image; the label dtype is kept.
        """
        array = label.array_zyx if isinstance(label, Volume) else np.asarray(label)
        if tuple(array.shape) != tuple(images[0].shape_zyx) or (isinstance(label, Volume) and not label.same_grid(images[0])):
            raise ImageError(
                "the label map is not on the image's grid",
                expected=f"shape {images[0].shape_zyx} and the image's geometry",
                found=f"shape {tuple(array.shape)}",
            )
        run = self._run_steps(images, images[0].with_array(array))
        assert run.label is not None
        return np.ascontiguousarray(run.data.numpy(), dtype=np.float32), np.ascontiguousarray(run.label)

    # -------------------------------------------------------------- sliding window
    def window_config(self, options: Any) -> SlidingWindowConfig:
        """MONAI's tiling (placement ``monai``, constant or ``monai_gaussian`` weights, logits blended)."""
        inferer = self.settings.inferer
        mirror = (0, 1, 2) if options.tta or options.uncertainty == "tta" else ()
        return SlidingWindowConfig(
            patch_size_zyx=tuple(inferer.roi_size_xyz[::-1]),  # type: ignore[arg-type]
            overlap=inferer.overlap if options.overlap is None else options.overlap,
            batch_size=options.batch_size or inferer.sw_batch_size,
            sigma_scale=inferer.sigma_scale,
            mirror_axes=mirror,
            intensity_perturbations=options.uncertainty_perturbations if options.uncertainty == "tta" else (),
            repeats=options.uncertainty_passes if options.uncertainty == "mc_dropout" else 1,
            placement="monai",
            importance="monai_gaussian" if inferer.mode == "gaussian" else "constant",
            blend="logits",
            pad=PAD_FOR_MONAI[inferer.padding_mode],
        )

    def collector(self, prepared: PreparedInput, reference: Volume, options: Any) -> BundleGridCollector:
        """Logit slabs -> labels on ``reference`` as the bundle's postprocessing makes them."""
        context = prepared.context
        if "model_grid" not in context:
            raise ConfigError("internal: the MONAI bundle pipeline needs the context of its own prepare()")
        return BundleGridCollector(
            model_grid=context["model_grid"],
            oriented_grid=context["oriented_grid"],
            reorder=context["reorder"],
            crop=context["crop"],
            channels=self.card.num_classes,
            postprocessing=self.settings.postprocessing,
            keep_probabilities=options.keep_probabilities,
            uncertainty=options.uncertainty is not None,
        )


class BundleGridCollector:
    """Stitched logit slabs on the model grid -> labels on the input grid (Invertd + argmax), streamed.

    Slabs arrive in model-z order on the cropped grid. Each is turned into probabilities (the
    bundle's activation), placed on the full model grid (zeros outside the crop box, as Invertd
    pads), and every oriented input slice whose two model slices (one, for nearest) are known is
    resampled at once: along z from the buffered model slices, then along y and x, in float64,
    rounded to float32 as MONAI's resampling output is, then the argmax. Only the model slices
    still needed are kept. At the end the labels (and probabilities, entropy) are un-oriented onto
    the input's voxel order.

    Args:
        model_grid: the grid the network input was resampled onto (before the crop).
        oriented_grid: the input grid after orientation (same origin and direction as ``model_grid``).
        reorder: the orientation step (undone at the end).
        crop: the foreground box on ``model_grid``, or None.
        channels: network output channels ``K``.
        postprocessing: activation, argmax position and interpolation.
        keep_probabilities: also return float16 ``(K, Z, Y, X)`` probabilities on the input grid.
        uncertainty: also return the normalised entropy of the probabilities on the input grid.
    """

    def __init__(
        self,
        *,
        model_grid: Geometry,
        oriented_grid: Geometry,
        reorder: AxisReorder,
        crop: CropBox | None,
        channels: int,
        postprocessing: PostprocessingSettings,
        keep_probabilities: bool,
        uncertainty: bool,
    ) -> None:
        self.model_grid, self.oriented_grid, self.reorder, self.crop = model_grid, oriented_grid, reorder, crop
        self.channels = channels
        self.post = postprocessing
        # With nearest inversion each input voxel copies one model voxel, so the argmax taken before
        # the inversion (argmax_before_invert) equals the argmax taken after it: one path serves both.
        self.mode = postprocessing.invert_interpolation
        shape = oriented_grid.shape_zyx
        self.labels = np.zeros(shape, dtype=np.uint8 if channels <= 256 else np.uint16)
        self.probabilities = np.zeros((channels, *shape), dtype=np.float16) if keep_probabilities else None
        self.entropy = np.zeros(shape, dtype=np.float32) if uncertainty else None
        # oriented voxel r lies at model position r * ratio + shift along each axis
        self.ratio_zyx, self.shift_zyx = index_mapping(model_grid, oriented_grid)
        self.model_depth = model_grid.shape_zyx[0]
        self._buffer: list[tuple[int, np.ndarray]] = []  # (full model z0, (K [+ 1], dz, Y, X) float32)
        self._known = self._initially_known()  # full model slices [0, known) are final
        self._emitted = 0  # oriented slices done
        self.max_buffered_slices = 0

    # -------------------------------------------------------------- bookkeeping
    def _crop_offsets(self) -> tuple[int, int, int]:
        return self.crop.start_zyx if self.crop is not None else (0, 0, 0)

    def _initially_known(self) -> int:
        # slices before the crop box are zeros from the start
        return min(max(self._crop_offsets()[0], 0), self.model_depth)

    def _position(self, r: int) -> float:
        return float(scaled_positions(1, self.ratio_zyx[0], r, self.shift_zyx[0])[0])

    def _needed_through(self, r: int) -> int:
        """The last model slice oriented slice ``r`` reads."""
        position = min(max(self._position(r), 0.0), self.model_depth - 1)
        if self.mode == "nearest":
            return int(nearest_indices(np.array([position]), self.model_depth)[0])
        return min(int(math.floor(position)) + 1, self.model_depth - 1)

    def _first_needed(self, r: int) -> int:
        """The first model slice oriented slice ``r`` reads."""
        position = min(max(self._position(r), 0.0), self.model_depth - 1)
        if self.mode == "nearest":
            return int(nearest_indices(np.array([position]), self.model_depth)[0])
        return int(math.floor(position))

    # -------------------------------------------------------------- slabs in
    def add(self, z_start: int, z_stop: int, blended: np.ndarray) -> None:
        """One finished slab ``(K, z_stop - z_start, Y, X)`` of logits on the (cropped) model grid."""
        probs = self._activation(blended)
        if self.entropy is not None:
            probs = np.concatenate([probs, normalised_entropy(self._softmax_for_entropy(probs, blended))[None]], axis=0)
        oz, oy, ox = self._crop_offsets()
        depth, height, width = self.model_grid.shape_zyx
        full_z0 = z_start + oz
        keep = slice(max(0, -full_z0), max(0, min(probs.shape[1], depth - full_z0)))
        probs = probs[:, keep]
        full_z0 = max(full_z0, 0)
        if probs.shape[1] > 0:
            if self.crop is not None:
                placed = np.zeros((probs.shape[0], probs.shape[1], height, width), dtype=np.float32)
                ys = slice(max(oy, 0), min(oy + probs.shape[2], height))
                xs = slice(max(ox, 0), min(ox + probs.shape[3], width))
                placed[:, :, ys, xs] = probs[:, :, ys.start - oy : ys.stop - oy, xs.start - ox : xs.stop - ox]
                probs = placed
            self._buffer.append((full_z0, probs))
        crop_end = self.crop.stop_zyx[0] if self.crop is not None else self.model_depth
        received = min(z_stop + oz, self.model_depth)
        self._known = self.model_depth if received >= min(crop_end, self.model_depth) else max(self._known, received)
        self.max_buffered_slices = max(self.max_buffered_slices, sum(p.shape[1] for _, p in self._buffer))
        self._emit()

    def _activation(self, logits: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))
        if self.post.activation in ("softmax", "sigmoid"):  # sigmoid: the network returns [0, logit]
            return torch.softmax(tensor, dim=0).numpy()
        return tensor.numpy()

    def _softmax_for_entropy(self, probs: np.ndarray, logits: np.ndarray) -> np.ndarray:
        if self.post.activation == "none":
            return torch.softmax(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)), dim=0).numpy()
        return probs

    # -------------------------------------------------------------- slices out
    def _ready_until(self) -> int:
        depth = self.oriented_grid.shape_zyx[0]
        if self._known >= self.model_depth:
            return depth
        r = self._emitted
        while r < depth and self._needed_through(r) < self._known:
            r += 1
        return r

    def _emit(self) -> None:
        r1 = self._ready_until()
        step = max(1, self._rows_per_block())
        r0 = self._emitted
        while r0 < r1:
            stop = min(r0 + step, r1)
            self._emit_block(r0, stop)
            r0 = stop
        self._emitted = r1
        if r1 < self.oriented_grid.shape_zyx[0]:
            keep_from = self._first_needed(r1)
            # copies, so that the few slices kept do not hold on to the whole slab they came from
            self._buffer = [
                (max(z0, keep_from), p[:, keep_from - z0 :].copy() if keep_from > z0 else p)
                for z0, p in self._buffer
                if z0 + p.shape[1] > keep_from
            ]
        else:
            self._buffer = []

    def _rows_per_block(self) -> int:
        _, height, width = self.oriented_grid.shape_zyx
        _, mh, mw = self.model_grid.shape_zyx
        per_row = 8 * max(height, mh) * max(width, mw) * 2
        return int(_CHUNK_BYTES // per_row)

    def _model_slices(self, m0: int, m1: int) -> np.ndarray:
        first = self._buffer[0][1] if self._buffer else None
        planes = first.shape[0] if first is not None else self.channels + (1 if self.entropy is not None else 0)
        out = np.zeros((planes, m1 - m0, *self.model_grid.shape_zyx[1:]), dtype=np.float32)
        for z0, p in self._buffer:
            lo, hi = max(z0, m0), min(z0 + p.shape[1], m1)
            if lo < hi:
                out[:, lo - m0 : hi - m0] = p[:, lo - z0 : hi - z0]
        return out

    def _emit_block(self, r0: int, r1: int) -> None:
        positions_z = scaled_positions(r1 - r0, self.ratio_zyx[0], r0, self.shift_zyx[0])
        m0 = self._first_needed(r0)
        m1 = self._needed_through(r1 - 1) + 1
        source = self._model_slices(m0, m1)
        planes = source.shape[0]
        _, height, width = self.oriented_grid.shape_zyx
        _, mh, mw = self.model_grid.shape_zyx
        positions_y = scaled_positions(height, self.ratio_zyx[1], shift=self.shift_zyx[1])
        positions_x = scaled_positions(width, self.ratio_zyx[2], shift=self.shift_zyx[2])
        per_plane = 8 * (r1 - r0) * max(height, mh) * max(width, mw) * 2
        chunk = max(1, int(_CHUNK_BYTES // per_plane))
        best = np.full((r1 - r0, height, width), -np.inf, dtype=np.float32)
        labels = np.zeros((r1 - r0, height, width), dtype=self.labels.dtype)
        for c0 in range(0, planes, chunk):
            part = source[c0 : c0 + chunk]
            part = interpolate_axis(part, 1, positions_z, self.model_depth, self.mode, offset=m0)
            part = interpolate_axis(part, 2, positions_y, mh, self.mode)
            part = interpolate_axis(part, 3, positions_x, mw, self.mode).astype(np.float32)
            for i in range(part.shape[0]):
                channel = c0 + i
                if channel >= self.channels:  # the entropy plane
                    if self.entropy is not None:
                        self.entropy[r0:r1] = np.clip(part[i], 0.0, 1.0)
                    continue
                better = part[i] > best  # strict: ties keep the lower channel, as argmax does
                best[better] = part[i][better]
                labels[better] = channel
                if self.probabilities is not None:
                    self.probabilities[channel, r0:r1] = part[i]
        self.labels[r0:r1] = labels

    def finish(self) -> CollectedOutput:
        """Labels (and probabilities, entropy) on the input grid, once every slab was added."""
        if self._emitted < self.oriented_grid.shape_zyx[0]:
            self._known = self.model_depth
            self._emit()
        labels = np.ascontiguousarray(self.reorder.undo(self.labels))
        probabilities = None if self.probabilities is None else np.ascontiguousarray(self.reorder.undo(self.probabilities))
        entropy = None if self.entropy is None else np.ascontiguousarray(self.reorder.undo(self.entropy))
        return CollectedOutput(labels, probabilities, entropy)


__all__ = [
    "AxisReorder",
    "BundleGridCollector",
    "BundleSettings",
    "CropBox",
    "MonaiBundlePipeline",
    "monai_gaussian_importance",
    "monai_tile_starts",
    "parse_config",
    "spacing_grid",
]
