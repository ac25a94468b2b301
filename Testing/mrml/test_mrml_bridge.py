"""Volume nodes <-> io.Volume and results -> segmentation nodes, on a real MRML scene."""

from __future__ import annotations

import numpy as np
import pytest

from deepseg_core import io
from DeepSegLib.mrml_bridge import (
    SegmentationSnapshot,
    SegmentSpec,
    deepseg_segment_ids,
    node_from_volume,
    segment_mask,
    segments_by_name,
    volume_from_node,
    write_result_segments,
)


def oblique_volume(shape_zyx=(7, 9, 11)) -> io.Volume:
    """Anisotropic spacing, non-zero origin, a rotation about z and a tilt (LPS)."""
    a, b = np.deg2rad(20.0), np.deg2rad(10.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    direction = rz @ rx
    array = np.arange(np.prod(shape_zyx), dtype=np.int16).reshape(shape_zyx)
    return io.Volume(array, (0.7, 0.9, 2.5), origin_lps=(-12.5, 30.25, 7.0), direction_lps=tuple(direction.ravel()))


def test_volume_round_trip_keeps_voxels_and_lps_geometry(mrml_scene):
    volume = oblique_volume()
    node = node_from_volume(mrml_scene, volume, "ct")
    ras_origin = node.GetOrigin()
    assert ras_origin == pytest.approx((12.5, -30.25, 7.0))  # LPS -> RAS flips x and y
    assert node.GetSpacing() == pytest.approx((0.7, 0.9, 2.5))
    back = volume_from_node(node)
    np.testing.assert_array_equal(back.array_zyx, volume.array_zyx)
    assert back.same_grid(volume)
    # A voxel's world position agrees between MRML (RAS) and io (LPS).
    ijk = np.array([3, 4, 5, 1.0])
    ras = np.array(_ijk_to_ras(node)) @ ijk
    lps = volume.ijk_to_lps() @ ijk
    assert ras[:3] == pytest.approx(lps[:3] * np.array([-1, -1, 1]))


def _ijk_to_ras(node):
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return [[matrix.GetElement(r, c) for c in range(4)] for r in range(4)]


def test_result_segments_match_labels_on_an_oblique_grid(mrml_scene):
    volume = oblique_volume()
    labels = np.zeros(volume.shape_zyx, np.uint8)
    labels[1:5, 2:7, 3:9] = 1
    labels[2:4, 3:5, 4:6] = 2
    node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    specs = [
        (SegmentSpec("liver", (0.8, 0.4, 0.3), label_value=1), labels == 1),
        (SegmentSpec("liver lesion", (0.2, 0.8, 0.2), label_value=2), labels == 2),
    ]
    ids = write_result_segments(node, specs, volume, "phantom-liver:1")
    assert [node.GetSegmentation().GetSegment(i).GetName() for i in ids] == ["liver", "liver lesion"]
    assert node.GetSegmentation().GetSegment(ids[0]).GetColor() == pytest.approx((0.8, 0.4, 0.3))
    for value, segment_id in zip((1, 2), ids, strict=True):
        np.testing.assert_array_equal(segment_mask(node, segment_id, volume), labels == value)


def test_rerun_replaces_deepseg_segments_and_keeps_hand_added_ones(mrml_scene):
    volume = oblique_volume()
    labels = np.zeros(volume.shape_zyx, np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    write_result_segments(node, [(SegmentSpec("liver", (1, 0, 0), label_value=1), labels == 1)], volume, "m:1")
    node.GetSegmentation().AddEmptySegment("my note", "my note", [0, 0, 1])
    labels2 = np.zeros_like(labels)
    labels2[4:6, 4:6, 4:6] = 1
    write_result_segments(node, [(SegmentSpec("liver", (1, 0, 0), label_value=1), labels2 == 1)], volume, "m:2")
    names = segments_by_name(node)
    assert sorted(names) == ["liver", "my note"]
    assert len(deepseg_segment_ids(node)) == 1
    np.testing.assert_array_equal(segment_mask(node, names["liver"], volume), labels2 == 1)


def test_snapshot_restores_segments_exactly(mrml_scene):
    volume = oblique_volume()
    labels = np.zeros(volume.shape_zyx, np.uint8)
    labels[1:3, 1:3, 1:3] = 1
    node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    write_result_segments(node, [(SegmentSpec("liver", (1, 0, 0), label_value=1), labels == 1)], volume, "m:1")
    snapshot = SegmentationSnapshot(node)
    write_result_segments(node, [(SegmentSpec("other", (1, 0, 0), label_value=1), labels == 9)], volume, "m:2")
    snapshot.restore()
    names = segments_by_name(node)
    assert list(names) == ["liver"]
    np.testing.assert_array_equal(segment_mask(node, names["liver"], volume), labels == 1)


def test_volume_under_a_transform_is_refused(mrml_scene):
    node = node_from_volume(mrml_scene, oblique_volume(), "ct")
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(io.ImageError, match="Harden the transform"):
        volume_from_node(node)


def _grid(shape_zyx=(10, 20, 30)) -> io.Volume:
    return io.Volume(np.zeros(shape_zyx, np.int16), (1.0, 1.0, 2.0), origin_lps=(0.0, 0.0, 0.0))


def _segment_on(node, mask_zyx: np.ndarray, grid: io.Volume, name: str = "liver") -> str:
    from DeepSegLib.mrml_bridge import add_segment

    return add_segment(node, SegmentSpec(name, (1, 0, 0)), mask_zyx, grid)


def test_deepsegs_segments_keep_the_models_names_when_a_terminology_is_confirmed(mrml_scene):
    """Slicer renames a segment whose name was generated when its terminology is confirmed ("liver" would become
    the terminology's "Liver", which the dataset's schema does not know): DeepSeg's names are the model's."""
    grid = _grid()
    node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segment = node.GetSegmentation().GetSegment(_segment_on(node, np.ones(grid.shape_zyx, bool), grid))
    assert not segment.GetNameAutoGenerated() and not segment.GetColorAutoGenerated()


def test_a_segment_on_a_larger_geometry_is_read_onto_the_image_and_one_reaching_beyond_it_is_refused(mrml_scene):
    """The Segment Editor's "Specify geometry" (or another source volume) can give the segments a grid larger
    than the image. Labels inside the image come back exactly; labels beyond it are refused, naming how many
    and how to remove them, rather than silently dropped (Slicer's own export pads nothing and drops them)."""
    grid = _grid()
    larger = io.Volume(np.zeros((10, 20, 40), np.int16), (1.0, 1.0, 2.0), origin_lps=(-10.0, 0.0, 0.0))  # 10 voxels more in -x
    inside = np.zeros(larger.shape_zyx, bool)
    inside[2:5, 2:5, 12:15] = True  # image voxels x 2..4
    node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    expected = np.zeros(grid.shape_zyx, bool)
    expected[2:5, 2:5, 2:5] = True
    np.testing.assert_array_equal(segment_mask(node, _segment_on(node, inside, larger), grid), expected)

    beyond = inside.copy()
    beyond[2:5, 2:5, 8:10] = True  # 18 voxels at image x -2 and -1
    segment_id = _segment_on(node, beyond, larger, "spleen")
    with pytest.raises(io.ImageError, match="'spleen' has 18 labelled voxels outside the image") as caught:
        segment_mask(node, segment_id, grid)
    assert "Specify geometry" in str(caught.value)


def test_a_segment_on_an_oversampled_geometry_reaching_every_border_of_an_oblique_image_is_not_refused(mrml_scene):
    import slicer

    from DeepSegLib.mrml_bridge import _numpy_to_matrix

    grid = oblique_volume((6, 8, 10))
    mask = np.zeros(grid.shape_zyx, bool)
    mask[:, :, :4] = True  # touches all six faces of the image
    mask[:3, :, 4:] = True
    node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segment_id = _segment_on(node, mask, grid)
    coarse = node.GetSegmentation().GetSegment(segment_id).GetRepresentation("Binary labelmap")
    fine = slicer.vtkOrientedImageData()  # the image's box at half the spacing (Segment Editor oversampling 2)
    z, y, x = grid.shape_zyx
    fine.SetExtent(0, 2 * x - 1, 0, 2 * y - 1, 0, 2 * z - 1)
    ijk_to_ras = grid.ijk_to_ras()
    fine_to_ras = ijk_to_ras.copy()
    fine_to_ras[:3, :3] /= 2
    fine_to_ras[:3, 3] -= 0.25 * ijk_to_ras[:3, :3].sum(axis=1)  # voxel centres a quarter voxel inside
    fine.SetImageToWorldMatrix(_numpy_to_matrix(fine_to_ras))
    oversampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(coarse, fine, oversampled, False, False)
    assert oversampled.GetNumberOfPoints() == 8 * mask.size
    node.GetSegmentation().GetSegment(segment_id).AddRepresentation("Binary labelmap", oversampled)
    np.testing.assert_array_equal(segment_mask(node, segment_id, grid), mask)


def test_a_transform_above_the_segmentation_is_applied_as_slicers_export_applies_it(mrml_scene):
    import vtk

    grid = _grid()
    mask = np.zeros(grid.shape_zyx, bool)
    mask[3:6, 4:9, 10:20] = True
    node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segment_id = _segment_on(node, mask, grid)
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(1, 3, 3.0)  # 3 mm anterior (RAS +y): LPS y - 3, so 3 voxels lower y index
    transform.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_array_equal(segment_mask(node, segment_id, grid), np.roll(mask, -3, axis=1))


def test_a_segment_moved_far_away_by_a_transform_is_refused_with_its_count_without_allocating_the_space_between(
    mrml_scene,
):
    """A transform in metres where millimetres were meant puts a segment 100 m away. Resampling onto the union
    of the image and the moved labelmap allocated the box spanning both (1e11 voxels here); the labelled box
    alone is resampled now, so the refusal comes with the exact count, as for a segment just beyond the image.
    Half on and half off the image, the part on it is counted inside."""
    import resource

    import vtk

    grid = _grid()
    mask = np.zeros(grid.shape_zyx, bool)
    mask[3:6, 4:9, 10:20] = True
    node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segment_id = _segment_on(node, mask, grid, "far")
    transform = mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    shift = vtk.vtkMatrix4x4()
    shift.SetElement(0, 3, 1e5)
    shift.SetElement(1, 3, -1e5)
    transform.SetMatrixTransformToParent(shift)
    node.SetAndObserveTransformNodeID(transform.GetID())
    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(io.ImageError, match=f"'far' has {int(mask.sum())} labelled voxels outside the image"):
        segment_mask(node, segment_id, grid)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kb < 200 * 1024, "no allocation of the space between"

    shift.SetElement(1, 3, 0.0)
    shift.SetElement(0, 3, -15.0)  # RAS -x 15 mm: LPS x + 15, image x index + 15: x 25..34 of an image of 30
    transform.SetMatrixTransformToParent(shift)
    with pytest.raises(io.ImageError, match=f"'far' has {3 * 5 * 5} labelled voxels outside the image"):
        segment_mask(node, segment_id, grid)

    scale = vtk.vtkMatrix4x4()  # a segmentation scaled 1000x (a transform in metres the other way round)
    for axis in range(3):
        scale.SetElement(axis, axis, 1000.0)
    transform.SetMatrixTransformToParent(scale)
    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(
        io.ImageError, match=r"'far' spans far more than the image.*labelled box of 1\.[0-9]+e\+1[0-9] image voxels"
    ):
        segment_mask(node, segment_id, grid)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before_kb < 200 * 1024


def test_segments_of_a_shared_layer_read_back_after_the_closed_surface_became_the_source(mrml_scene):
    """Slicer converts a segmentation without a binary labelmap one segment at a time, burning it as 1, while the
    segment keeps the label value it had in a shared layer (2 for the second segment)."""
    grid = _grid()
    first, second = np.zeros(grid.shape_zyx, bool), np.zeros(grid.shape_zyx, bool)
    first[2:8, 3:10, 3:10] = True
    second[2:8, 12:18, 15:25] = True
    node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    ids = [_segment_on(node, first, grid, "liver"), _segment_on(node, second, grid, "spleen")]
    segmentation = node.GetSegmentation()
    segmentation.CollapseBinaryLabelmaps(False)
    assert [segmentation.GetSegment(i).GetLabelValue() for i in ids] == [1, 2]
    node.CreateClosedSurfaceRepresentation()
    segmentation.SetSourceRepresentationName("Closed surface")
    segmentation.RemoveRepresentation("Binary labelmap")
    for segment_id, mask in zip(ids, (first, second), strict=True):
        read = segment_mask(node, segment_id, grid)
        dice = 2 * np.count_nonzero(read & mask) / (np.count_nonzero(read) + np.count_nonzero(mask))
        assert dice > 0.8, f"{segment_id}: Dice {dice:.3f} with the labelmap it was made from"


def test_snapshot_restores_the_nodes_deepseg_attributes_and_input_volume(mrml_scene):
    from DeepSegLib.mrml_bridge import INPUT_VOLUME_REFERENCE

    volume_node = node_from_volume(mrml_scene, _grid(), "ct")
    node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    node.SetAttribute("DeepSeg.Model", "m:1")
    node.SetAttribute("Other.Attribute", "kept")
    snapshot = SegmentationSnapshot(node)
    node.SetAttribute("DeepSeg.Model", "m:2")
    node.SetAttribute("DeepSeg.PredictionPath", "/tmp/m2.seg.nrrd")
    node.SetNodeReferenceID(INPUT_VOLUME_REFERENCE, volume_node.GetID())
    snapshot.restore()
    assert node.GetAttribute("DeepSeg.Model") == "m:1" and node.GetAttribute("DeepSeg.PredictionPath") is None
    assert node.GetAttribute("Other.Attribute") == "kept" and node.GetNodeReferenceID(INPUT_VOLUME_REFERENCE) is None
