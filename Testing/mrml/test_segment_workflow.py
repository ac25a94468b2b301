"""The DeepSeg panel's workflow on a real MRML scene: Segment (subprocess), cancel, re-run, export,
and the Segment Editor effect's masking, overwrite and undo."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from deepseg_core import io  # noqa: E402
from deepseg_core.datasets import Dataset, DatasetError, validate_dataset  # noqa: E402
from deepseg_core.demo import DEFAULT_MODEL, SAMPLE_VOLUME  # noqa: E402
from deepseg_core.inference import Segmenter, SegmentOptions  # noqa: E402
from DeepSegLib.mrml_bridge import (  # noqa: E402
    SegmentSpec,
    add_segment,
    node_from_volume,
    segment_mask,
    segments_by_name,
    volume_from_node,
    write_result_segments,
)
from DeepSegLib.scene_logic import (  # noqa: E402
    MODEL_ATTRIBUTE,
    apply_in_segment_editor,
    apply_segmentation_file,
    export_corrected_case,
    labelmap_from_segments,
)
from DeepSegLib.segment_job import SegmentRequest, start_segmentation  # noqa: E402


@pytest.fixture(autouse=True)
def _prediction_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def oblique_sample() -> io.Volume:
    """The bundled CT sample placed obliquely: non-zero origin, rotated direction (LPS)."""
    sample = io.read_image(SAMPLE_VOLUME)
    a = np.deg2rad(15.0)
    direction = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    return io.Volume(
        sample.array_zyx, sample.spacing_xyz_mm, origin_lps=(-80.0, 40.5, -300.0), direction_lps=tuple(direction.ravel())
    )


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
    """One real `deepseg segment` subprocess run on the oblique sample (shared by the tests)."""
    job = start_segmentation([oblique_sample()], SegmentRequest(model=str(DEFAULT_MODEL), device="cpu", instances=True))
    code = job.wait(300)
    assert code == 0, job.error
    kept = tmp_path_factory.mktemp("job") / "result.seg.nrrd"
    kept.write_bytes(job.output.read_bytes())
    events = list(job.events)
    job.cleanup()
    return kept, events


def test_segment_round_trip_matches_the_engine(mrml_scene, segmented):
    result_path, events = segmented
    assert [e["event"] for e in events][0] == "start" and events[-1] == {"event": "done", "ok": 1, "failed": 0}
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"]
    volume = oblique_sample()
    volume_node = node_from_volume(mrml_scene, volume, "CT")
    output = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "CT segmentation")
    ids, _ = apply_segmentation_file(result_path, output, volume_node, "phantom-liver:1")
    names = [output.GetSegmentation().GetSegment(i).GetName() for i in ids]
    assert names[0] == "liver" and all(n.startswith("liver lesion ") for n in names[1:]) and len(names) >= 4
    liver = output.GetSegmentation().GetSegment(ids[0])
    import vtk

    terminology = vtk.mutable("")
    assert liver.GetTag("TerminologyEntry", terminology) and "^10200004^Liver" in str(terminology)
    # The same engine in-process gives the same voxels, on the input's exact (oblique) grid.
    expected = Segmenter.load(DEFAULT_MODEL, device="cpu").segment([volume], SegmentOptions()).labels.array_zyx
    np.testing.assert_array_equal(segment_mask(output, ids[0], volume_from_node(volume_node)), expected == 1)
    lesions = np.zeros(volume.shape_zyx, bool)
    for segment_id in ids[1:]:
        lesions |= segment_mask(output, segment_id, volume)
    assert (lesions & (expected != 2)).sum() == 0  # instances are a subset of the semantic lesion label
    assert output.GetAttribute(MODEL_ATTRIBUTE) == "phantom-liver:1"


def test_cancel_stops_the_run_and_leaves_the_scene_unchanged(mrml_scene):
    volume_node = node_from_volume(mrml_scene, oblique_sample(), "CT")
    nodes_before = mrml_scene.GetNumberOfNodes()
    # Mirror TTA makes the run long enough (8 passes per tile) to cancel after its first progress.
    job = start_segmentation([volume_from_node(volume_node)], SegmentRequest(model=str(DEFAULT_MODEL), device="cpu", tta=True))
    try:
        import time

        deadline = time.monotonic() + 120
        while not any(e["event"] == "progress" for e in job.poll()) and time.monotonic() < deadline and not job.finished:
            time.sleep(0.05)
        assert not job.finished, "the run finished before it could be cancelled"
        job.cancel()
        assert job.wait(30) == 130
        assert not job.output.exists()
        assert not any(e["event"] == "case_done" for e in job.events)
    finally:
        job.cleanup()
    assert mrml_scene.GetNumberOfNodes() == nodes_before


def test_unknown_model_fails_with_exit_code_3_and_a_message(mrml_scene):
    job = start_segmentation([oblique_sample()], SegmentRequest(model="no-such-model", device="cpu"))
    try:
        assert job.wait(120) == 3
        assert "no-such-model" in job.error
    finally:
        job.cleanup()


def test_rerun_keeps_hand_added_segments_and_snapshot_undoes_it(mrml_scene, segmented):
    result_path, _ = segmented
    volume = oblique_sample()
    volume_node = node_from_volume(mrml_scene, volume, "CT")
    output = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    apply_segmentation_file(result_path, output, volume_node, "phantom-liver:1")
    hand = np.zeros(volume.shape_zyx, bool)
    hand[10:12, 50:60, 50:60] = True
    add_segment(output, SegmentSpec("my marker", (0, 0, 1)), hand, volume)  # drawn by the user: no DeepSeg tag
    before = sorted(segments_by_name(output))
    _, snapshot = apply_segmentation_file(result_path, output, volume_node, "phantom-liver:1")
    assert sorted(segments_by_name(output)) == before  # same DeepSeg segments again, marker kept
    np.testing.assert_array_equal(segment_mask(output, segments_by_name(output)["my marker"], volume), hand)
    write_result_segments(output, [], volume, "m")  # a run that found nothing removes DeepSeg's segments
    assert list(segments_by_name(output)) == ["my marker"]
    snapshot.restore()
    assert sorted(segments_by_name(output)) == before


def test_export_corrected_case(mrml_scene, segmented, tmp_path):
    from deepseg_core.phantoms import PHANTOM_LABELS

    result_path, _ = segmented
    volume = oblique_sample()
    volume_node = node_from_volume(mrml_scene, volume, "CT")
    output = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    apply_segmentation_file(result_path, output, volume_node, "phantom-liver:1")
    # The user erases part of the liver (a correction of 2 x 10 x 10 liver voxels).
    liver_id = segments_by_name(output)["liver"]
    liver = segment_mask(output, liver_id, volume)
    erase = np.zeros_like(liver)
    erase[20:22, 50:60, 50:60] = True
    changed = int((liver & erase).sum())
    assert changed > 0
    output.GetSegmentation().RemoveSegment(liver_id)
    add_segment(output, SegmentSpec("liver", (1, 0, 0)), liver & ~erase, volume)  # the corrected liver
    dataset_root = tmp_path / "ds"
    Dataset.create(dataset_root, "site", PHANTOM_LABELS, ("CT",))
    record = export_corrected_case(dataset_root, "case01", volume_node, output)
    assert record.provenance.predicted_by == "phantom-liver:1"
    assert record.provenance.changed_voxels == changed
    assert 0.9 < record.provenance.dice_prediction_vs_correction < 1.0
    images, label = Dataset.open(dataset_root).load_case("case01")
    np.testing.assert_array_equal(images[0].array_zyx, volume.array_zyx)
    assert images[0].same_grid(volume, tolerance_mm=1e-3)
    np.testing.assert_array_equal(label.array_zyx, labelmap_from_segments(output, volume, Dataset.open(dataset_root)))
    assert validate_dataset(dataset_root) == []
    before = (dataset_root / "labelsTr" / "case01.nii.gz").read_bytes()
    with pytest.raises(DatasetError, match="already exists"):
        export_corrected_case(dataset_root, "case01", volume_node, output)
    output.GetSegmentation().AddEmptySegment("spleen", "spleen", [0, 1, 0])
    with pytest.raises(DatasetError, match=r"'spleen' is not in the dataset's label schema.*add-label"):
        export_corrected_case(dataset_root, "case02", volume_node, output)
    assert (dataset_root / "labelsTr" / "case01.nii.gz").read_bytes() == before
    assert sorted(Dataset.open(dataset_root).cases) == ["case01"]


def _editor(scene, volume_node, segmentation_node):
    editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(scene)
    logic.SetSegmentEditorNode(editor_node)
    logic.SetSegmentationNode(segmentation_node)
    logic.SetSourceVolumeNode(volume_node)
    return editor_node, logic


@pytest.mark.parametrize("overwrite", ["none", "all"])
def test_editor_effect_honours_masking_overwrite_and_undo(mrml_scene, overwrite):
    volume = io.Volume(np.zeros((6, 10, 10), np.int16), (1.0, 1.0, 2.0), origin_lps=(3.0, 4.0, 5.0))
    volume_node = node_from_volume(mrml_scene, volume, "v")
    seg = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    region = np.zeros(volume.shape_zyx, bool)
    region[:, :5] = True  # editable area: the y < 5 half
    other = np.zeros(volume.shape_zyx, bool)
    other[:, :, :3] = True  # an existing segment the model output overlaps
    add_segment(seg, SegmentSpec("region", (1, 0, 0)), region, volume)
    add_segment(seg, SegmentSpec("other", (0, 0, 1)), other, volume)
    target = seg.GetSegmentation().AddEmptySegment("target", "target", [0, 1, 0])
    editor_node, logic = _editor(mrml_scene, volume_node, seg)
    editor_node.SetSelectedSegmentID(target)
    editor_node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    editor_node.SetMaskSegmentID(segments_by_name(seg)["region"])
    editor_node.SetOverwriteMode(editor_node.OverwriteNone if overwrite == "none" else editor_node.OverwriteAllSegments)
    model_mask = np.zeros(volume.shape_zyx, bool)
    model_mask[1:5, 2:8, 1:8] = True
    apply_in_segment_editor(logic, model_mask, volume)
    got = segment_mask(seg, target, volume)
    np.testing.assert_array_equal(got, model_mask & region)  # nothing outside the editable area
    other_now = segment_mask(seg, segments_by_name(seg)["other"], volume)
    if overwrite == "none":
        np.testing.assert_array_equal(other_now, other)
    else:
        np.testing.assert_array_equal(other_now, other & ~(model_mask & region))
    logic.Undo()  # a single undo restores everything
    assert not segment_mask(seg, target, volume).any()
    np.testing.assert_array_equal(segment_mask(seg, segments_by_name(seg)["other"], volume), other)
    # Overwrite=all also edits "region" itself where the model mask lies inside it.
    np.testing.assert_array_equal(segment_mask(seg, segments_by_name(seg)["region"], volume), region)
