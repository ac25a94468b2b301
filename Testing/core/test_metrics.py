"""Metrics against small hand-computed cases, including the documented empty-mask convention."""

from __future__ import annotations

import math

import numpy as np
import pytest
import whole_array

from deepseg_core import metrics
from deepseg_core.errors import ShapeError


def line(indices, n=10):
    """A (1, 1, n) mask: every voxel of it is a surface voxel (its z/y neighbours are outside)."""
    mask = np.zeros((1, 1, n), dtype=bool)
    mask[0, 0, list(indices)] = True
    return mask


PRED = line([2, 3, 4])
REF = line([3, 4, 5, 6])
SPACING = (1.0, 1.0, 2.0)  # x spacing 2 mm


def test_overlap_metrics_hand_computed():
    assert metrics.dice(PRED, REF) == pytest.approx(2 * 2 / (3 + 4))
    assert metrics.iou(PRED, REF) == pytest.approx(2 / 5)
    assert metrics.precision(PRED, REF) == pytest.approx(2 / 3)
    assert metrics.recall(PRED, REF) == pytest.approx(2 / 4)


def test_surface_distances_hand_computed():
    # pred -> ref: [2, 0, 0] mm; ref -> pred: [0, 0, 2, 4] mm
    assert sorted(metrics.directed_surface_distances(PRED, REF, SPACING)) == [0, 0, 2]
    assert sorted(metrics.directed_surface_distances(REF, PRED, SPACING)) == [0, 0, 2, 4]
    # numpy's linear 95th percentile: [0,0,2] -> 1.8; [0,0,2,4] -> 3.7; HD95 = max
    assert metrics.hausdorff95(PRED, REF, SPACING) == pytest.approx(3.7)
    assert metrics.average_symmetric_surface_distance(PRED, REF, SPACING) == pytest.approx(8 / 7)
    # within 2 mm: 3 of 3 and 3 of 4
    assert metrics.surface_dice(PRED, REF, SPACING, tolerance_mm=2.0) == pytest.approx(6 / 7)
    assert metrics.surface_dice(PRED, REF, SPACING, tolerance_mm=1.0) == pytest.approx(4 / 7)


def test_distances_scale_with_spacing():
    assert metrics.hausdorff95(PRED, REF, (1.0, 1.0, 1.0)) == pytest.approx(3.7 / 2)
    assert metrics.hausdorff95(PRED, REF, (5.0, 5.0, 2.0)) == pytest.approx(3.7)


def test_surface_is_the_face_connected_border():
    square = np.zeros((7, 7), dtype=bool)
    square[1:6, 1:6] = True
    border = metrics.surface(square)
    assert border.sum() == 16
    assert not border[2:5, 2:5].any()
    # shifted by one voxel along x: every border voxel of one lies within 1 mm of the other's border
    shifted = np.roll(square, 1, axis=1)
    d = metrics.directed_surface_distances(square, shifted, (1.0, 1.0))
    assert d.max() == pytest.approx(1.0)


def test_volume_error_in_ml():
    spacing = (2.0, 5.0, 10.0)  # 100 mm^3 per voxel
    err_ml, rel = metrics.volume_error(PRED, REF, spacing)
    assert metrics.volume_ml(REF, spacing) == pytest.approx(0.4)
    assert err_ml == pytest.approx(-0.1)
    assert rel == pytest.approx(-0.25)


def test_empty_versus_empty_is_perfect():
    empty = np.zeros((3, 3, 3), dtype=bool)
    m = metrics.compute_all(empty, empty, (1, 1, 1))
    assert (m.dice, m.iou, m.precision, m.recall, m.surface_dice) == (1.0, 1.0, 1.0, 1.0, 1.0)
    assert (m.hd95_mm, m.assd_mm, m.volume_error_ml, m.volume_error_rel) == (0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize("pred_empty", [True, False])
def test_empty_versus_nonempty_is_total_failure(pred_empty):
    empty = np.zeros((1, 1, 10), dtype=bool)
    pred, ref = (empty, REF) if pred_empty else (REF, empty)
    m = metrics.compute_all(pred, ref, SPACING)
    assert (m.dice, m.iou, m.surface_dice) == (0.0, 0.0, 0.0)
    assert m.precision == 0.0 and m.recall == 0.0
    assert math.isinf(m.hd95_mm) and math.isinf(m.assd_mm)
    assert m.volume_error_rel == (-1.0 if pred_empty else math.inf)


def test_compute_all_agrees_with_the_single_metrics():
    rng = np.random.default_rng(3)
    pred = rng.random((6, 7, 8)) > 0.5
    ref = rng.random((6, 7, 8)) > 0.4
    spacing = (2.5, 0.8, 0.8)
    m = metrics.compute_all(pred, ref, spacing, tolerance_mm=1.0)
    assert m.dice == pytest.approx(metrics.dice(pred, ref))
    assert m.hd95_mm == pytest.approx(metrics.hausdorff95(pred, ref, spacing))
    assert m.assd_mm == pytest.approx(metrics.average_symmetric_surface_distance(pred, ref, spacing))
    assert m.surface_dice == pytest.approx(metrics.surface_dice(pred, ref, spacing, 1.0))


def test_identical_masks_have_zero_distance():
    mask = np.zeros((8, 8, 8), dtype=bool)
    mask[2:6, 1:7, 3:5] = True
    m = metrics.compute_all(mask, mask, (1, 2, 3))
    assert (m.dice, m.hd95_mm, m.assd_mm, m.surface_dice) == (1.0, 0.0, 0.0, 1.0)


def test_evaluate_labels_per_value():
    pred = np.zeros((1, 1, 10), dtype=np.uint8)
    ref = np.zeros_like(pred)
    pred[PRED] = 1
    ref[REF] = 1
    ref[0, 0, 9] = 2
    result = metrics.evaluate_labels(pred, ref, [1, 2], SPACING)
    assert result[1].dice == pytest.approx(4 / 7)
    assert result[2].dice == 0.0 and math.isinf(result[2].hd95_mm)


def test_mismatched_shapes_are_refused():
    with pytest.raises(ShapeError, match="differ in shape"):
        metrics.dice(np.zeros((2, 2)), np.zeros((2, 3)))
    with pytest.raises(ShapeError, match="spacing"):
        metrics.hausdorff95(PRED, REF, (1.0, 1.0))


def test_surface_distances_are_the_distance_transforms_bit_for_bit():
    # the k-d tree's nearest surface voxel, its distance computed from the voxel offsets: the same
    # float64 values as scipy's transform, at anisotropic spacings whose products round
    from scipy import ndimage

    rng = np.random.default_rng(3)
    compared = 0
    for _ in range(40):
        shape = tuple(int(n) for n in rng.integers(5, 24, size=3))
        a = ndimage.binary_dilation(rng.random(shape) < 0.03, iterations=int(rng.integers(0, 3)))
        b = ndimage.binary_dilation(rng.random(shape) < 0.03, iterations=int(rng.integers(0, 3)))
        if not (a.any() and b.any()):
            continue
        spacing = tuple(float(s) for s in rng.choice([0.4883, 0.7, 0.8, 0.976, 1.5, 2.5, 3.0], size=3))
        ours = metrics.directed_surface_distances(a, b, spacing)
        np.testing.assert_array_equal(ours, whole_array.surface_distances(a, b, spacing))
        compared += ours.size
    assert compared > 10_000


@pytest.mark.parametrize("where", ["inside", "touching the array's edges"])
def test_distance_metrics_of_small_masks_in_a_large_array_are_the_whole_arrays(where):
    # the distances are taken in the box around both masks: the same numbers as over the whole array,
    # also where a mask touches the array's edge (outside the array counts as outside the mask)
    z, y, x = np.ogrid[:40, :64, :56]
    offset = 0 if where == "inside" else 8
    ref = (z - 20) ** 2 / 36 + (y - 30 + offset * 3) ** 2 / 49 + (x - 28 + offset * 3) ** 2 / 64 < 1
    pred = (z - 21) ** 2 / 30 + (y - 31 + offset * 3) ** 2 / 49 + (x - 27 + offset * 3) ** 2 / 81 < 1
    spacing = (2.5, 0.7, 0.9)
    if where != "inside":
        assert ref[:, 0].any() and pred[:, :, 0].any()
    hd95, assd, within = whole_array.distance_metrics(pred, ref, spacing, tolerance_mm=2.0)
    result = metrics.compute_all(pred, ref, spacing, tolerance_mm=2.0)
    assert (result.hd95_mm, result.surface_dice) == (hd95, within) and 0.0 < within < 1.0 and hd95 > 0.0
    assert result.assd_mm == assd
