"""After Segment, on a real MRML scene: the domain verdict, the uncertainty overlay, Next uncertain
region and the measurement table, from a real ``deepseg segment`` subprocess."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deepseg_core import io, phantoms
from deepseg_core.demo import DEFAULT_MODEL
from deepseg_core.measurements import COLUMN_TITLES, read_measurements_csv
from deepseg_core.uncertainty import uncertain_regions
from DeepSegLib.mrml_bridge import node_from_volume
from DeepSegLib.result_review import (
    UNCERTAINTY_ATTRIBUTE,
    UncertaintyNavigator,
    domain_check_text,
    load_review,
    measurements_table,
    remove_review,
)
from DeepSegLib.segment_job import STATS_FILE, UNCERTAINTY_FILE, SegmentRequest, start_segmentation


def shifted_case() -> phantoms.Phantom:
    """Halfway to scanner profile B, so the bundled model is unsure in places and the check warns."""
    profile = phantoms.interpolate_profiles(phantoms.PROFILES["ct-A"], phantoms.PROFILES["ct-B"], 0.6)
    return phantoms.generate_phantom(
        seed=1310, profile=profile, shape_zyx=(24, 96, 96), spacing_xyz_mm=(1.5, 1.5, 2.5), origin_lps=(-40.0, 12.0, 7.5)
    )


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory, engine_python):
    case = shifted_case()
    request = SegmentRequest(model=str(DEFAULT_MODEL), device="cpu", instances=True, uncertainty=True, measurements=True)
    job = start_segmentation([case.image], request, engine_python)
    assert job.wait(300) == 0, job.error
    kept = tmp_path_factory.mktemp("job")
    for name in (UNCERTAINTY_FILE, STATS_FILE):
        (kept / name).write_bytes((job.workdir / name).read_bytes())
    (kept / "result.seg.nrrd").write_bytes(job.output.read_bytes())
    check = job.domain_check
    job.cleanup()
    return case, kept, check


def add_slice_views(scene) -> list:
    views = []
    for name, orientation in (("Red", "Axial"), ("Yellow", "Sagittal"), ("Green", "Coronal")):
        slice_node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
        slice_node.SetLayoutName(name)
        slice_node.SetOrientation(orientation)
        composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetLayoutName(name)
        views.append((slice_node, composite))
    return views


def test_domain_verdict_reaches_the_panel_text(finished_job):
    _, _, check = finished_job
    assert check is not None and check["verdict"] in ("caution", "out_of_distribution")
    verdict, text = domain_check_text(check)
    assert verdict == check["verdict"] and check["reasons"][0] in text and "Check the result carefully" in text
    assert domain_check_text({"verdict": "ok", "reasons": []}) == ("ok", "Input looks like the model's training data.")


def test_review_loads_overlay_navigator_and_table(mrml_scene, finished_job):
    case, folder, _ = finished_job
    views = add_slice_views(mrml_scene)
    volume_node = node_from_volume(mrml_scene, case.image, "CT")
    review = load_review(mrml_scene, folder, volume_node)

    overlay = review.uncertainty_node
    assert overlay.GetAttribute(UNCERTAINTY_ATTRIBUTE) == "1" and overlay.GetName() == "CT uncertainty"
    display = overlay.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLColorTableNodeIron"
    assert (display.GetWindow(), display.GetLevel()) == pytest.approx((1.0, 0.5)) and display.GetApplyThreshold()
    assert all(c.GetForegroundVolumeID() == overlay.GetID() and c.GetForegroundOpacity() == 0.5 for _, c in views)
    uncertainty = io.read_image(folder / UNCERTAINTY_FILE)
    assert uncertainty.same_grid(case.image)

    navigator = review.navigator
    expected = uncertain_regions(uncertainty)
    assert len(navigator) == len(expected) > 0
    red = views[0][0]
    for region in expected[:2]:
        shown = navigator.next_region(mrml_scene)
        assert shown == region
        slice_to_ras = red.GetSliceToRAS()
        centre = [slice_to_ras.GetElement(i, 3) for i in range(3)]
        assert centre == pytest.approx(list(region.centre_ras_mm), abs=1e-6)
    assert navigator.status(shown).startswith(f"Uncertain region 2 of {len(expected)}")

    table = review.table_node.GetTable()
    names = [table.GetColumn(c).GetName() for c in range(table.GetNumberOfColumns())]
    assert names == list(COLUMN_TITLES.values())
    segments = [table.GetValue(r, 0).ToString() for r in range(table.GetNumberOfRows())]
    assert segments[0] == "liver" and "liver lesion 1" in segments
    volume_column = table.GetColumnByName("Volume [cm3]")
    assert review.table_node.GetColumnUnitLabel("Volume [cm3]") == "cm3"
    liver_ml = volume_column.GetValue(0)
    assert 0 < liver_ml < (np.prod(case.image.shape_zyx) * case.image.voxel_volume_ml)

    again = load_review(mrml_scene, folder, volume_node, previous=review)
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 1
    assert again.uncertainty_node.GetID() != overlay.GetID() and mrml_scene.GetNodeByID(overlay.GetID()) is None

    # Undo last Segment takes the overlay and the table out; the slice views drop the overlay
    overlay_id = again.uncertainty_node.GetID()
    remove_review(mrml_scene, again)
    assert mrml_scene.GetNodeByID(overlay_id) is None and mrml_scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 0
    assert all(not c.GetForegroundVolumeID() for _, c in views)
    assert again.navigator is None


def test_measured_lesions_are_the_segments_the_panel_shows(finished_job):
    """Row "liver lesion N" of the table measures segment "liver lesion N" of the result."""
    _, folder, _ = finished_job
    segmentation = io.read_segmentation(folder / "result.seg.nrrd")
    rows = {r["segment"]: r for r in read_measurements_csv(folder / STATS_FILE)}
    lesions = [s for s in segmentation.segments if s.name.startswith("liver lesion ")]
    assert lesions and int(rows["liver lesion"]["instance_count"]) == len(lesions)
    for segment in lesions:
        assert int(rows[segment.name]["voxel_count"]) == int(segmentation.mask(segment.name).sum())


def test_navigator_without_uncertain_voxels_says_so(mrml_scene):
    flat = io.Volume(np.zeros((4, 5, 6), dtype=np.float32))
    navigator = UncertaintyNavigator(flat)
    assert len(navigator) == 0 and navigator.next_region(mrml_scene) is None
    assert "No uncertain region" in navigator.status(None)


def test_table_from_rows_keeps_missing_values_as_nan(mrml_scene):
    rows = [{"segment": "empty", "label_value": "2", "voxel_count": "0", "surface_area_mm2": ""}]
    node = measurements_table(mrml_scene, rows, "m")
    assert node.GetTable().GetValue(0, 0).ToString() == "empty"
    assert math.isnan(node.GetTable().GetColumnByName("Surface area [mm2]").GetValue(0))


def test_a_region_row_shows_with_no_label_value(mrml_scene):
    # a region-based nnU-Net model's "whole tumor" row: the union of values 1, 2 and 3 has no label value of its own
    rows = [{"segment": "whole tumor (values 1, 2, 3)", "label_value": "", "voxel_count": "120", "volume_ml": "0.9"}]
    table = measurements_table(mrml_scene, rows, "m").GetTable()
    assert table.GetValue(0, 0).ToString() == "whole tumor (values 1, 2, 3)"
    assert math.isnan(table.GetColumnByName("Label value").GetValue(0))
    assert table.GetColumnByName("Volume [cm3]").GetValue(0) == 0.9


def test_a_multi_channel_table_has_each_channels_intensities_under_its_name(mrml_scene):
    """A two-sequence MR model's rows (``SegmentMeasurement`` with per-channel intensities, as ``deepseg segment
    --stats`` writes them): one intensity column per statistic and channel, named with the channel, no unnamed one."""
    from deepseg_core.io import SegmentInfo, Volume
    from deepseg_core.measurements import measure_segments

    labels = Volume(np.zeros((4, 5, 6), dtype=np.uint8))
    labels.array_zyx[1:3, 1:4, 1:5] = 1
    t1 = labels.with_array(np.arange(labels.array_zyx.size, dtype=np.float32).reshape(labels.shape_zyx))
    t2 = t1.with_array(1000.0 - 2.0 * t1.array_zyx)
    rows = measure_segments(labels, [SegmentInfo("tumour", 1)], intensity_channels=[("T1", t1), ("T2", t2)])
    table = measurements_table(mrml_scene, rows, "m").GetTable()
    names = [table.GetColumnName(column) for column in range(table.GetNumberOfColumns())]
    assert "Mean" not in names and names.index("Mean (T1)") < names.index("Mean (T2)")
    inside = labels.array_zyx == 1
    assert table.GetColumnByName("Mean (T1)").GetValue(0) == pytest.approx(float(t1.array_zyx[inside].mean()))
    assert table.GetColumnByName("Maximum (T2)").GetValue(0) == float(t2.array_zyx[inside].max())
    assert table.GetColumnByName("Volume [mm3]").GetValue(0) == float(inside.sum())
