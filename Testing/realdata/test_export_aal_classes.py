"""nnU-Net's export of many classes on real anatomy: the AAL atlas's 116 regions and background as logits.

With labels only and many classes, ``NnUNetExportCollector`` interpolates for each output slice only the
classes that can win its argmax (``candidate_channels``). Real anatomy decides how many that is: an
axial slice of the atlas holds a few dozen of its 117 classes. The labels must be those of every class
interpolated (which ``Testing/foreign/test_nnunet_import.py`` holds to the whole-volume arithmetic).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from deepseg_core import io
from deepseg_core.pipelines.nnunet import NnUNetExportCollector

pytestmark = pytest.mark.needs_torch

CLASSES = 117
NETWORK_SHAPE = (20, 109, 91)  # every second voxel of 40 axial slices of the atlas
CROP_SHAPE = (30, 180, 150)  # the input grid, finer on every axis (linear on every axis)


def soft_logits(regions: np.ndarray, seed: int) -> np.ndarray:
    """A network's logits for ``regions``: each class's indicator averaged over 3 x 3 x 3 voxels, mapped to
    ``12 * (average - 0.5)``, plus normal noise of 0.3. ``(CLASSES, *regions.shape)`` float32."""
    one_hot = (regions[None] == np.arange(CLASSES).reshape(-1, 1, 1, 1)).astype(np.float32)
    average = ndimage.uniform_filter(one_hot, size=(1, 3, 3, 3), mode="nearest")
    noise = np.random.default_rng(seed).normal(0, 0.3, average.shape).astype(np.float32)
    return 12 * (average - 0.5) + noise


def exported_labels(logits: np.ndarray, candidates_only: bool) -> tuple[np.ndarray, NnUNetExportCollector]:
    context = {
        "shape_before_crop": CROP_SHAPE,
        "bbox": [[0, s] for s in CROP_SHAPE],
        "shape_after_crop": CROP_SHAPE,
        "network_shape": NETWORK_SHAPE,
        "network_spacing": [1.5, 1.5, 1.5],
        "spacing_transposed": [1.0, 0.9, 0.9],
    }
    collector = NnUNetExportCollector(
        context,
        list(range(CLASSES)),
        [0, 1, 2],
        {"order": 1, "order_z": 0, "force_separate_z": None},
        candidates_only=candidates_only,
    )
    for z in range(0, NETWORK_SHAPE[0], 6):  # slabs, as the sliding window hands them over
        collector.add(z, min(z + 6, NETWORK_SHAPE[0]), logits[:, z : z + 6])
    return collector.finish().labels_zyx, collector


def test_the_export_of_117_real_regions_interpolates_a_few_per_slice_and_gives_every_class_labels(aal_path, record_property):
    regions = io.read_image(aal_path).array_zyx[60:100:2, ::2, ::2].astype(np.int64)
    assert regions.shape == NETWORK_SHAPE and len(np.unique(regions)) > 80
    logits = soft_logits(regions, seed=116)
    pruned, collector = exported_labels(logits, candidates_only=True)
    every, baseline = exported_labels(logits, candidates_only=False)
    np.testing.assert_array_equal(pruned, every)
    assert baseline.interpolated_channel_slices == CLASSES * CROP_SHAPE[0]
    per_slice = collector.interpolated_channel_slices / CROP_SHAPE[0]
    present = np.mean([len(np.unique(labels)) for labels in every])
    record_property("realdata", f"AAL export: {present:.1f} of {CLASSES} classes per output slice, {per_slice:.1f} interpolated")
    assert present > 30  # real anatomy, many classes per slice
    assert collector.pruned_slices == CROP_SHAPE[0]
    assert per_slice < CLASSES / 2
