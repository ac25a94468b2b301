"""Post-processing on small hand-made labelmaps."""

from __future__ import annotations

import numpy as np

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
