"""The per-class steps on real anatomy: the AAL atlas's 116 regions on Colin27 (181 x 217 x 181, 1 mm).

Largest component, hole filling, instances, the uncertainty summary, the ``.seg.nrrd`` extents and
``compare`` work inside each class's box; here they must give what the whole-array definitions
(``Testing/whole_array.py``) give on real region shapes: cortex folded around other regions, regions
in several pieces, regions touching the volume's edge. A seventh of the regions (every seventh value)
keeps the definitions' one pass per region affordable; ``io.class_boxes`` itself is checked on all.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import whole_array

from deepseg_core import io, metrics, postprocessing, uncertainty
from deepseg_core.compare import compare_files

SUBSET = tuple(range(1, 117, 7))


@pytest.fixture(scope="module")
def atlas(aal_path, colin_t1_path):
    labels, t1 = io.read_image(aal_path), io.read_image(colin_t1_path)
    assert labels.shape_zyx == t1.shape_zyx == (181, 217, 181)
    return labels, t1


def test_class_boxes_are_each_regions_extent(atlas):
    labels, _ = atlas
    boxes = io.class_boxes(labels.array_zyx, range(0, 120))
    assert sorted(boxes) == list(range(1, 117))  # 0 (background) and absent values are left out
    expected = whole_array.extents(labels.array_zyx, range(1, 117))
    assert [tuple(v for b in boxes[value] for v in (b.start, b.stop - 1)) for value in range(1, 117)] == expected


def test_clean_up_steps_give_the_whole_arrays_result(atlas, record_property):
    # the atlas with its darkest 15 % (sulcal CSF on the T1) cleared: holes inside regions, specks
    labels, t1 = atlas
    dark = t1.array_zyx < np.percentile(t1.array_zyx[labels.array_zyx > 0], 15)
    array = np.where(dark, 0, labels.array_zyx).astype(labels.array_zyx.dtype)
    ids, found = postprocessing.label_instances(array, SUBSET, labels.spacing_zyx_mm)
    expected_ids, expected_rows = whole_array.instances(array, SUBSET, labels.voxel_volume_ml * 1000.0, 0.0)
    np.testing.assert_array_equal(ids, expected_ids)
    assert [(i.instance_id, i.label, i.voxels, i.volume_mm3, i.centroid_zyx) for i in found] == expected_rows
    largest = postprocessing.keep_largest_component(array, SUBSET)
    np.testing.assert_array_equal(largest, whole_array.largest_component(array, SUBSET))
    filled = postprocessing.fill_holes(largest, SUBSET)
    np.testing.assert_array_equal(filled, whole_array.holes_filled(largest, SUBSET))
    removed, holes = int(np.count_nonzero(largest != array)), int(np.count_nonzero(filled != largest))
    assert len(found) > len(SUBSET) and removed > 0 and holes > 0  # every step had work to do
    record_property(
        "realdata",
        f"AAL per-class steps on {len(SUBSET)} regions (darkest T1 voxels cleared): {len(found)} pieces, "
        f"{removed} voxels outside the largest ones, {holes} hole voxels filled",
    )


def test_uncertainty_summary_gives_the_whole_arrays_numbers(atlas):
    # the T1, scaled to [0, 1], stands in for an entropy map: a real, smooth field across region borders
    labels, t1 = atlas
    field = (t1.array_zyx / float(t1.array_zyx.max())).astype(np.float32)
    summaries = uncertainty.segment_uncertainty(labels, field, [io.SegmentInfo(f"r{v}", v) for v in SUBSET], threshold=0.45)
    expected = whole_array.segment_uncertainty(labels.array_zyx, field, SUBSET, threshold=0.45)
    assert [(s.mean_entropy, s.uncertain_ml) for s in summaries] == [(m, n * labels.voxel_volume_ml) for m, n in expected]
    assert 0 < sum(n for _, n in expected) < sum(int(np.count_nonzero(labels.array_zyx == v)) for v in SUBSET) * 2


def test_compare_scores_regions_as_on_the_whole_arrays(atlas, aal_names, tmp_path):
    # a "prediction" that is the atlas moved by one voxel along x, for four regions of different sizes
    labels, _ = atlas
    chosen = (1, 37, 71, 101)
    shifted = np.roll(labels.array_zyx, 1, axis=2)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": {"background": 0, **{aal_names[v]: v for v in range(1, 117)}}}))
    reference = io.write_image(labels, tmp_path / "aal.nii.gz")
    prediction = io.write_image(labels.with_array(shifted), tmp_path / "shifted.nii.gz")
    scores = compare_files(prediction, reference, labels_json=tmp_path / "dataset.json")
    assert len(scores) == 116
    for value in chosen:
        pred, ref = shifted == value, labels.array_zyx == value
        hd95, assd, surface_dice = whole_array.distance_metrics(pred, ref, labels.spacing_zyx_mm, 2.0)
        row = scores[aal_names[value]]
        assert (row["hd95_mm"], row["assd_mm"], row["surface_dice"], row["dice"]) == (
            hd95,
            assd,
            surface_dice,
            metrics.dice(pred, ref),
        )
        assert 0.5 < row["dice"] < 1.0 and row["hd95_mm"] >= 1.0
