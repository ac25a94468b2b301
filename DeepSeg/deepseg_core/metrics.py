"""Segmentation metrics on binary masks, spacing-aware (distances in mm, volumes in ml).

Masks are boolean arrays of any dimension (usually ``(Z, Y, X)``); ``spacing_mm`` gives the voxel
size per array axis in the same order (use :attr:`Volume.spacing_zyx_mm`).

Empty masks (documented convention, one rule for every metric):

* both prediction and reference empty: perfect agreement. Dice = IoU = precision = recall =
  surface Dice = 1.0; HD95 = ASSD = 0.0 mm; volume error = 0.0.
* exactly one empty: total failure. Dice = IoU = surface Dice = 0.0; precision (empty prediction)
  and recall (empty reference) are 0.0 too, i.e. a ratio ``0/0`` counts as 1.0 only when both
  masks are empty; HD95 = ASSD = ``inf``.

Surfaces are the mask voxels with at least one face-neighbour outside the mask (or on the array
edge). Surface distances are Euclidean distances in mm between surface-voxel centres. HD95 is the
larger of the two directed 95th percentiles (MONAI's convention); ASSD is the mean of all distances
in both directions; surface Dice at tolerance ``tau`` is the fraction of surface voxels (both
surfaces together) lying within ``tau`` mm of the other surface.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage, spatial

from .errors import ShapeError


def _check(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred).astype(bool, copy=False)
    ref = np.asarray(ref).astype(bool, copy=False)
    if pred.shape != ref.shape:
        raise ShapeError("prediction and reference masks differ in shape", expected=str(ref.shape), found=str(pred.shape))
    return pred, ref


def _ratio(numerator: float, denominator: float, both_empty: bool) -> float:
    if denominator == 0:
        return 1.0 if both_empty else 0.0
    return numerator / denominator


def _counts(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int, int, bool]:
    tp = int(np.count_nonzero(pred & ref))
    fp = int(np.count_nonzero(pred)) - tp
    fn = int(np.count_nonzero(ref)) - tp
    return tp, fp, fn, not pred.any() and not ref.any()


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice = 2|P∩R| / (|P| + |R|) (= F1)."""
    tp, fp, fn, empty = _counts(*_check(pred, ref))
    return _ratio(2 * tp, 2 * tp + fp + fn, empty)


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """Intersection over union (Jaccard)."""
    tp, fp, fn, empty = _counts(*_check(pred, ref))
    return _ratio(tp, tp + fp + fn, empty)


def precision(pred: np.ndarray, ref: np.ndarray) -> float:
    """|P∩R| / |P| (positive predictive value)."""
    tp, fp, _, empty = _counts(*_check(pred, ref))
    return _ratio(tp, tp + fp, empty)


def recall(pred: np.ndarray, ref: np.ndarray) -> float:
    """|P∩R| / |R| (sensitivity)."""
    tp, _, fn, empty = _counts(*_check(pred, ref))
    return _ratio(tp, tp + fn, empty)


def volume_ml(mask: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """Volume of ``mask`` in ml (1 ml = 1000 mm^3)."""
    return float(np.count_nonzero(mask)) * float(np.prod(spacing_mm)) / 1000.0


def volume_error(pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float]) -> tuple[float, float]:
    """``(pred_ml - ref_ml, relative error)``; relative is ``(P - R) / R``, 0 when both empty, inf when R is."""
    pred, ref = _check(pred, ref)
    p_ml, r_ml = volume_ml(pred, spacing_mm), volume_ml(ref, spacing_mm)
    if r_ml == 0:
        return p_ml - r_ml, 0.0 if p_ml == 0 else math.inf
    return p_ml - r_ml, (p_ml - r_ml) / r_ml


def surface(mask: np.ndarray) -> np.ndarray:
    """Surface voxels: in the mask with a face-neighbour outside it (array edges count as outside)."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def directed_surface_distances(from_mask: np.ndarray, to_mask: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """Distance (mm) from each surface voxel of ``from_mask`` to the nearest surface voxel of ``to_mask``,
    in the order of ``np.argwhere`` over ``from_mask``'s surface.

    The values are those of ``scipy.ndimage.distance_transform_edt(~surface(to_mask), sampling=spacing_mm)``
    at ``from_mask``'s surface, bit for bit: a k-d tree over the target surface's points finds each
    nearest voxel, and the distance is computed from the voxel offsets as the transform computes it.
    The transform visits every voxel of the array; the tree only the surfaces (a 512 x 512 x 300 CT's
    liver: 0.6 instead of 5.1 s per direction on its bounding box)."""
    from_surface = surface(from_mask)
    to_surface = surface(to_mask)
    if not from_surface.any():
        return np.zeros(0)
    if not to_surface.any():
        return np.full(int(from_surface.sum()), math.inf)
    spacing = np.asarray([float(s) for s in spacing_mm])
    from_voxels, to_voxels = np.argwhere(from_surface), np.argwhere(to_surface)
    _, nearest = spatial.cKDTree(to_voxels * spacing).query(from_voxels * spacing)
    offsets_mm = (to_voxels[nearest] - from_voxels) * spacing
    return np.sqrt(np.sum(offsets_mm * offsets_mm, axis=1))


def _bounding_box(mask: np.ndarray) -> tuple[slice, ...] | None:
    """The smallest box holding every True voxel of ``mask``; None for an empty mask.

    For one mask, three ``any`` reductions: 0.03 s on a 512 x 512 x 300 CT, where ``io.class_boxes``
    (``find_objects``, for many classes in one pass) takes 0.27 s."""
    box = []
    for axis in range(mask.ndim):
        occupied = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if occupied.size == 0:
            return None
        box.append(slice(int(occupied[0]), int(occupied[-1]) + 1))
    return tuple(box)


def _both_directions(pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = _check(pred, ref)
    if len(spacing_mm) != pred.ndim:
        raise ShapeError(
            "spacing does not match the mask dimension", expected=f"{pred.ndim} values", found=str(tuple(spacing_mm))
        )
    # Inside the box around both masks the surfaces and distances are the whole array's: a voxel on the
    # box's face has its neighbour across that face outside both masks, so it is a surface voxel either
    # way, and every surface voxel, of either mask, is in the box. The erosion and the argwhere over a
    # 512 x 512 x 300 CT cost seconds per segment, however small the segment.
    box = _bounding_box(pred | ref)
    if box is not None:
        pred, ref = pred[box], ref[box]
    return directed_surface_distances(pred, ref, spacing_mm), directed_surface_distances(ref, pred, spacing_mm)


def _distance_summary(d_pr: np.ndarray, d_rp: np.ndarray, tolerance_mm: float) -> tuple[float, float, float]:
    """(HD95, ASSD, surface Dice) from the two directed distance sets, with the empty-mask rule."""
    if d_pr.size == 0 and d_rp.size == 0:
        return 0.0, 0.0, 1.0
    if d_pr.size == 0 or d_rp.size == 0:
        return math.inf, math.inf, 0.0
    hd95 = float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))
    assd = float((d_pr.sum() + d_rp.sum()) / (d_pr.size + d_rp.size))
    within = np.count_nonzero(d_pr <= tolerance_mm) + np.count_nonzero(d_rp <= tolerance_mm)
    return hd95, assd, float(within / (d_pr.size + d_rp.size))


def hausdorff95(pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """95th-percentile Hausdorff distance in mm (max of the two directed 95th percentiles)."""
    return _distance_summary(*_both_directions(pred, ref, spacing_mm), 0.0)[0]


def average_symmetric_surface_distance(pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """Mean surface distance in mm over both directions (ASSD)."""
    return _distance_summary(*_both_directions(pred, ref, spacing_mm), 0.0)[1]


def surface_dice(pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float], tolerance_mm: float) -> float:
    """Fraction of both surfaces within ``tolerance_mm`` of the other (normalised surface Dice)."""
    return _distance_summary(*_both_directions(pred, ref, spacing_mm), tolerance_mm)[2]


@dataclass(frozen=True)
class MaskMetrics:
    """All metrics of one prediction/reference pair (distances in mm, volumes in ml)."""

    dice: float
    iou: float
    precision: float
    recall: float
    hd95_mm: float
    assd_mm: float
    surface_dice: float
    pred_ml: float
    ref_ml: float
    volume_error_ml: float
    volume_error_rel: float

    def as_dict(self) -> dict[str, float]:
        """Plain dict (JSON-ready except for inf, which ``json`` writes as ``Infinity``)."""
        return asdict(self)


def compute_all(pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float], tolerance_mm: float = 2.0) -> MaskMetrics:
    """Every metric for one pair, with the surface distances computed once."""
    pred, ref = _check(pred, ref)
    tp, fp, fn, empty = _counts(pred, ref)
    hd95, assd, sdice = _distance_summary(*_both_directions(pred, ref, spacing_mm), tolerance_mm)
    err_ml, err_rel = volume_error(pred, ref, spacing_mm)
    return MaskMetrics(
        dice=_ratio(2 * tp, 2 * tp + fp + fn, empty),
        iou=_ratio(tp, tp + fp + fn, empty),
        precision=_ratio(tp, tp + fp, empty),
        recall=_ratio(tp, tp + fn, empty),
        hd95_mm=hd95,
        assd_mm=assd,
        surface_dice=sdice,
        pred_ml=volume_ml(pred, spacing_mm),
        ref_ml=volume_ml(ref, spacing_mm),
        volume_error_ml=err_ml,
        volume_error_rel=err_rel,
    )


def evaluate_labels(
    pred_labels: np.ndarray,
    ref_labels: np.ndarray,
    label_values: Sequence[int],
    spacing_mm: Sequence[float],
    tolerance_mm: float = 2.0,
) -> dict[int, MaskMetrics]:
    """Per-label metrics of two labelmaps: ``{value: MaskMetrics}`` for each value in ``label_values``."""
    pred_labels = np.asarray(pred_labels)
    ref_labels = np.asarray(ref_labels)
    return {int(v): compute_all(pred_labels == v, ref_labels == v, spacing_mm, tolerance_mm) for v in label_values}
