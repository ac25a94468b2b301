"""Training patches: where foreground oversampling centres them."""

from __future__ import annotations

import numpy as np
import whole_array

from deepseg_core.training.patches import PatchSampler, TrainingCase


def test_class_voxels_are_the_whole_arrays_in_scan_order():
    # found inside each class's box: the same voxels, thinned the same way, as over the whole case
    rng = np.random.default_rng(4)
    labels = np.zeros((20, 40, 36), np.uint8)
    labels[2:18, 5:35, 4:30] = 1  # large: thinned past 4096 voxels
    labels[0:3, 0:4, 30:36] = 3  # at the edge
    labels[rng.random(labels.shape) < 0.003] = 5  # scattered; 2 and 4 are absent
    case = TrainingCase(np.zeros((1, *labels.shape), np.float32), labels)
    expected = whole_array.class_voxels(labels)
    assert case.foreground_classes == sorted(expected) == [1, 3, 5]
    for value, coords in expected.items():
        np.testing.assert_array_equal(case.class_voxels(value), coords)
    assert len(case.class_voxels(1)) <= 4096 < int(np.count_nonzero(labels == 1))


def test_foreground_patches_hold_their_class():
    labels = np.zeros((24, 48, 48), np.uint8)
    labels[18:21, 40:44, 3:7] = 2  # small and off-centre: a uniform draw would rarely hit it
    case = TrainingCase(np.random.default_rng(0).normal(size=(1, *labels.shape)).astype(np.float32), labels)
    sampler = PatchSampler([case], (8, 16, 16), foreground_fraction=1.0, flip_axes=(), intensity_jitter=0.0)
    rng = np.random.default_rng(1)
    assert all((sampler.sample(rng)[1] == 2).any() for _ in range(20))


def test_the_ignore_label_is_not_a_foreground_class_so_no_patch_is_centred_on_it():
    """Voxels nobody reviewed (255) count in no loss: a third of the foreground patches centred on them would be
    taken from the rare lesion the oversampling is for."""
    labels = np.zeros((24, 48, 48), np.uint8)
    labels[2:6, 2:10, 2:10] = 1
    labels[18:21, 40:44, 3:7] = 2
    labels[:, 24:40, 24:40] = 255
    case = TrainingCase(np.zeros((1, *labels.shape), np.float32), labels, ignore_value=255)
    assert case.foreground_classes == [1, 2]
    assert TrainingCase(np.zeros((1, *labels.shape), np.float32), labels).foreground_classes == [1, 2, 255]
