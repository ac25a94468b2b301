"""Post-processing on small hand-made labelmaps."""

from __future__ import annotations

import numpy as np
import whole_array

from deepseg_core import postprocessing


def two_blobs() -> np.ndarray:
    labels = np.zeros((5, 10, 10), np.uint8)
    labels[1:4, 1:4, 1:4] = 2  # 27 voxels
    labels[2, 7:9, 7:9] = 2  # 4 voxels
    labels[0, 0, 9] = 1
    labels[2:5, 5:9, 0:4] = 1
    return labels


def test_instances_numbered_by_size_with_minimum():
    ids, instances = postprocessing.label_instances(two_blobs(), [2], (2.0, 1.0, 1.0))
    assert [(i.instance_id, i.voxels, i.volume_mm3) for i in instances] == [(1, 27, 54.0), (2, 4, 8.0)]
    assert ids[2, 2, 2] == 1 and ids[2, 7, 7] == 2 and ids[0, 0, 9] == 0
    assert instances[0].centroid_zyx == (2.0, 2.0, 2.0)
    ids, instances = postprocessing.label_instances(two_blobs(), [2], (2.0, 1.0, 1.0), min_size_mm3=10.0)
    assert len(instances) == 1 and ids[2, 7, 7] == 0


def test_largest_component_and_hole_filling():
    labels = two_blobs()
    cleaned = postprocessing.keep_largest_component(labels, [1])
    assert cleaned[0, 0, 9] == 0 and cleaned[3, 6, 1] == 1
    assert (cleaned == 2).sum() == (labels == 2).sum()
    hollow = np.zeros((5, 5, 5), np.uint8)
    hollow[1:4, 1:4, 1:4] = 1
    hollow[2, 2, 2] = 0
    assert postprocessing.fill_holes(hollow, [1])[2, 2, 2] == 1


def test_panoptic_ids():
    labels = two_blobs()
    ids, _ = postprocessing.label_instances(labels, [2], (1.0, 1.0, 1.0))
    pan = postprocessing.panoptic(labels, ids, [2])
    assert pan[2, 2, 2] == 2001 and pan[2, 7, 7] == 2002
    assert pan[3, 6, 1] == 1000 and pan[0, 0, 0] == 0


def _random_classes(seed: int, shape=(18, 30, 26)) -> np.ndarray:
    """Classes 1-4 as blobs, hollow shells and specks, some cut by the array's edge; class 5 absent."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.uint8)
    zz, yy, xx = np.ogrid[: shape[0], : shape[1], : shape[2]]
    for _ in range(9):
        value = int(rng.integers(1, 5))
        centre, radius = rng.integers(0, shape), float(rng.uniform(1.5, 6.0))
        distance = np.sqrt((zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2)
        shell = distance < radius if rng.random() < 0.5 else (distance < radius) & (distance > radius - 1.5)
        labels[shell] = value
    labels[rng.random(shape) < 0.01] = rng.integers(1, 5)
    return labels


def test_cleaning_inside_class_boxes_gives_the_whole_arrays_result():
    for seed in range(12):
        labels = _random_classes(seed)
        values = [1, 2, 3, 4, 5]
        np.testing.assert_array_equal(
            postprocessing.keep_largest_component(labels, values), whole_array.largest_component(labels, values)
        )
        filled = postprocessing.fill_holes(labels, values)
        np.testing.assert_array_equal(filled, whole_array.holes_filled(labels, values))
        assert seed or np.count_nonzero(filled != labels) > 0  # some holes (the first map has them)
        ids, instances = postprocessing.label_instances(labels, [3, 1], (1.5, 0.8, 0.7), min_size_mm3=2.0)
        expected_ids, expected_rows = whole_array.instances(labels, [3, 1], 1.5 * 0.8 * 0.7, 2.0)
        np.testing.assert_array_equal(ids, expected_ids)
        assert [(i.instance_id, i.label, i.voxels, i.volume_mm3, i.centroid_zyx) for i in instances] == expected_rows
        assert len(instances) > 1
