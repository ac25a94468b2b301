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
