"""The DeepSeg panel's scene work on a real MRML scene: a real Segment result into segments (names,
colours, terminology, oblique geometry), re-run and undo, export of a corrected case."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

from deepseg_core import io
from deepseg_core.datasets import Dataset, DatasetError, validate_dataset
from deepseg_core.demo import DEFAULT_MODEL, SAMPLE_VOLUME
from DeepSegLib import scene_logic
from DeepSegLib.mrml_bridge import (
    SegmentSpec,
    add_segment,
    node_from_volume,
    segment_mask,
    segments_by_name,
    volume_from_node,
    write_result_segments,
)
from DeepSegLib.scene_logic import (
    MODEL_ATTRIBUTE,
    PREDICTION_ATTRIBUTE,
    apply_segmentation_file,
    export_corrected_case,
    labelmap_from_segments,
)
from DeepSegLib.segment_job import SegmentRequest, start_segmentation


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
def segmented(tmp_path_factory, engine_python):
    """One real `deepseg segment` subprocess run on the oblique sample (shared by the tests)."""
    request = SegmentRequest(model=str(DEFAULT_MODEL), device="cpu", instances=True)
    job = start_segmentation([oblique_sample()], request, python=engine_python)
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
    # The segments hold exactly the engine's voxels, on the input's exact (oblique) grid.
    written = io.read_segmentation(result_path)
    np.testing.assert_array_equal(segment_mask(output, ids[0], volume_from_node(volume_node)), written.mask("liver"))
    for segment_id, name in zip(ids[1:], names[1:], strict=True):
        np.testing.assert_array_equal(segment_mask(output, segment_id, volume), written.mask(name))
    assert output.GetAttribute(MODEL_ATTRIBUTE) == "phantom-liver:1"


def test_unknown_model_fails_with_exit_code_3_and_a_message(mrml_scene, engine_python):
    job = start_segmentation([oblique_sample()], SegmentRequest(model="no-such-model", device="cpu"), python=engine_python)
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


def test_cached_predictions_no_node_refers_to_are_removed_when_old_or_over_the_size_bound(mrml_scene, segmented, monkeypatch):
    """Every Segment keeps its prediction for the export's correction effort; the cache is bounded by age and
    size, but a prediction that a segmentation of the scene, or the Undo of the latest run, needs is kept."""
    result_path, _ = segmented
    volume = oblique_sample()
    volume_node = node_from_volume(mrml_scene, volume, "CT")
    first = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "first")
    apply_segmentation_file(result_path, first, volume_node, "phantom-liver:1")
    output = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    apply_segmentation_file(result_path, output, volume_node, "phantom-liver:1")
    referenced_by_first = Path(first.GetAttribute(PREDICTION_ATTRIBUTE))
    for_undo = Path(output.GetAttribute(PREDICTION_ATTRIBUTE))
    folder = scene_logic.prediction_cache_folder()
    month_ago = time.time() - 31 * 86400
    stale = folder / "stale.seg.nrrd"  # a session long gone
    stale.write_bytes(b"x" * 100)
    recent = folder / "recent.seg.nrrd"  # another session's, this week
    recent.write_bytes(b"x" * 100)
    os.utime(recent, (time.time() - 86400,) * 2)
    for path in (stale, referenced_by_first, for_undo):
        os.utime(path, (month_ago,) * 2)

    _, snapshot = apply_segmentation_file(result_path, output, volume_node, "phantom-liver:1")
    newest = Path(output.GetAttribute(PREDICTION_ATTRIBUTE))
    assert not stale.exists()
    assert referenced_by_first.exists() and for_undo.exists() and recent.exists() and newest.exists()
    snapshot.restore()
    assert output.GetAttribute(PREDICTION_ATTRIBUTE) == str(for_undo)

    # over the size bound the oldest go first, and never a referenced one
    monkeypatch.setattr(scene_logic, "PREDICTION_CACHE_MAX_BYTES", 1)
    removed = scene_logic.prune_prediction_cache(scene_logic.predictions_referenced(mrml_scene))
    assert set(removed) == {recent, newest}
    assert referenced_by_first.exists() and for_undo.exists()


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


def test_an_export_is_refused_for_a_volume_the_segmentation_was_not_made_on(mrml_scene, segmented, tmp_path):
    """Two volumes of one grid (series of one study): labels made on one never enter the dataset with the other,
    whether DeepSeg made them or Slicer's Segment Editor did; Slicer's *Specify geometry* says they belong to
    the other. Nothing is written by a refused export."""
    import dataclasses

    from deepseg_core.phantoms import PHANTOM_LABELS

    result_path, _ = segmented
    volume = oblique_sample()
    made_on = node_from_volume(mrml_scene, volume, "CT arterial")
    other = node_from_volume(mrml_scene, dataclasses.replace(volume, array_zyx=volume.array_zyx + 100), "CT venous")
    dataset_root = tmp_path / "ds"
    Dataset.create(dataset_root, "site", PHANTOM_LABELS, ("CT",))

    predicted = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "predicted")
    apply_segmentation_file(result_path, predicted, made_on, "phantom-liver:1")
    drawn = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn")
    # what Slicer's Segment Editor does on a new segmentation with a source volume
    drawn.SetReferenceImageGeometryParameterFromVolumeNode(made_on)
    add_segment(
        drawn, SegmentSpec("liver", (1, 0, 0)), segment_mask(predicted, segments_by_name(predicted)["liver"], volume), volume
    )
    for node in (predicted, drawn):
        with pytest.raises(
            io.ImageError, match=r"not made on the input volume.*'CT arterial'.*found 'CT venous'.*Specify geometry"
        ) as refused:
            export_corrected_case(dataset_root, "case01", other, node)
        assert str(refused.value).count(f"'CT arterial' ({made_on.GetID()})") == 1, "each volume named once"
        assert Dataset.open(dataset_root).cases == {}
        assert not any((dataset_root / "labelsTr").iterdir()) and not any((dataset_root / "imagesTr").iterdir())
    export_corrected_case(dataset_root, "case01", made_on, predicted)
    drawn.SetReferenceImageGeometryParameterFromVolumeNode(other)  # the Segment Editor's Specify geometry
    record = export_corrected_case(dataset_root, "case02", other, drawn)
    assert record.provenance.source.startswith("CT venous")
    np.testing.assert_array_equal(Dataset.open(dataset_root).load_case("case02")[0][0].array_zyx, volume.array_zyx + 100)
    # a segmentation that refers to no volume (loaded from a file) is not checked
    loaded = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
    add_segment(
        loaded, SegmentSpec("liver", (1, 0, 0)), segment_mask(predicted, segments_by_name(predicted)["liver"], volume), volume
    )
    export_corrected_case(dataset_root, "case03", other, loaded)
    # a volume the node refers to that left the scene is no longer compared
    mrml_scene.RemoveNode(made_on)
    export_corrected_case(dataset_root, "case04", other, predicted)


def test_undo_puts_back_the_geometry_the_segmentation_was_drawn_on_and_a_geometry_from_an_roi_names_no_volume(
    mrml_scene, segmented, tmp_path
):
    """A DeepSeg run sets Slicer's reference geometry to the volume it read; Undo put back DeepSeg's references
    only, so a segmentation drawn on one volume, run on another and undone, was taken for the other's."""
    import dataclasses

    from deepseg_core.phantoms import PHANTOM_LABELS

    result_path, _ = segmented
    volume = oblique_sample()
    drawn_on = node_from_volume(mrml_scene, volume, "drawn on")
    run_on = node_from_volume(mrml_scene, dataclasses.replace(volume, array_zyx=volume.array_zyx + 7), "run on")
    node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    node.SetReferenceImageGeometryParameterFromVolumeNode(drawn_on)
    liver = np.zeros(volume.shape_zyx, bool)
    liver[10:20, 40:60, 40:60] = True
    add_segment(node, SegmentSpec("liver", (1, 0, 0)), liver, volume)
    _, snapshot = apply_segmentation_file(result_path, node, run_on, "phantom-liver:1")
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is run_on
    snapshot.restore()
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is drawn_on
    dataset_root = tmp_path / "ds"
    Dataset.create(dataset_root, "site", PHANTOM_LABELS, ("CT",))
    with pytest.raises(io.ImageError, match="not made on the input volume"):
        export_corrected_case(dataset_root, "case01", run_on, node)
    record = export_corrected_case(dataset_root, "case01", drawn_on, node)
    assert record.provenance.predicted_by is None  # the undone run is not credited either

    roi = mrml_scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
    drawn = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "geometry from an ROI")
    add_segment(drawn, SegmentSpec("liver", (1, 0, 0)), liver, volume)
    drawn.SetNodeReferenceID(drawn.GetReferenceImageGeometryReferenceRole(), roi.GetID())  # Specify geometry: an ROI
    export_corrected_case(dataset_root, "case02", run_on, drawn)


def test_the_second_input_volume_of_an_export_must_be_the_one_the_run_read(mrml_scene, segmented, tmp_path):
    import dataclasses

    from deepseg_core.phantoms import PHANTOM_LABELS

    result_path, _ = segmented
    volume = oblique_sample()
    first = node_from_volume(mrml_scene, volume, "T1")
    second = node_from_volume(mrml_scene, dataclasses.replace(volume, array_zyx=volume.array_zyx * 2), "FLAIR")
    wrong = node_from_volume(mrml_scene, dataclasses.replace(volume, array_zyx=volume.array_zyx * 3), "FLAIR old")
    output = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    _, snapshot = apply_segmentation_file(result_path, output, first, "phantom-liver:1", additional_volume_node=second)
    assert output.GetNodeReference("DeepSeg.AdditionalVolume") is second
    dataset_root = tmp_path / "ds"
    Dataset.create(dataset_root, "site", PHANTOM_LABELS, ("T1", "FLAIR"))
    with pytest.raises(io.ImageError, match=r"second input volume is not the one.*'FLAIR'.*found 'FLAIR old'"):
        export_corrected_case(dataset_root, "case01", first, output, additional_volume_nodes=[wrong])
    assert Dataset.open(dataset_root).cases == {}
    export_corrected_case(dataset_root, "case01", first, output, additional_volume_nodes=[second])
    np.testing.assert_array_equal(Dataset.open(dataset_root).load_case("case01")[0][1].array_zyx, volume.array_zyx * 2)
    # a later one-channel run forgets the second volume; its Undo brings the reference back
    _, snapshot = apply_segmentation_file(result_path, output, first, "phantom-liver:1")
    assert output.GetNodeReference("DeepSeg.AdditionalVolume") is None
    snapshot.restore()
    assert output.GetNodeReference("DeepSeg.AdditionalVolume") is second


def test_predicted_segments_renamed_to_the_datasets_names_are_exported_with_their_correction_effort(
    mrml_scene, segmented, tmp_path
):
    """A dataset that names the labels otherwise than the model ("hepar", "tumour"): the user renames DeepSeg's
    segments to the dataset's names and exports. The cached prediction, under the model's names, is compared
    through the segments' label tags; before, its names made the export fail."""
    import dataclasses

    from deepseg_core.phantoms import PHANTOM_LABELS

    result_path, _ = segmented
    volume = oblique_sample()
    volume_node = node_from_volume(mrml_scene, volume, "CT")
    output = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    apply_segmentation_file(result_path, output, volume_node, "phantom-liver:1")
    new_names = {"liver": "hepar", "liver lesion": "tumour"}
    segmentation = output.GetSegmentation()
    renamed = 0
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        base, _, number = segment.GetName().rpartition(" ") if segment.GetName()[-1].isdigit() else (segment.GetName(), "", "")
        segment.SetName(f"{new_names[base]} {number}".strip())
        renamed += 1
    assert renamed >= 3, "the liver and at least two lesion instances"
    labels = [dataclasses.replace(label, name=new_names[label.name]) for label in PHANTOM_LABELS]
    dataset_root = tmp_path / "ds"
    Dataset.create(dataset_root, "site", labels, ("CT",))
    record = export_corrected_case(dataset_root, "case01", volume_node, output)
    assert record.provenance.predicted_by == "phantom-liver:1"
    assert record.provenance.changed_voxels == 0 and record.provenance.dice_prediction_vs_correction == 1.0
    _, label = Dataset.open(dataset_root).load_case("case01")
    assert set(np.unique(label.array_zyx)) == {0, 1, 2}


def test_a_predicted_lesion_relabelled_as_liver_counts_as_a_correction(mrml_scene, segmented, tmp_path):
    """The model's names are in the dataset's schema: a predicted segment renamed to another label is a
    correction of every voxel of it, not a rename that the prediction follows."""
    from deepseg_core.phantoms import PHANTOM_LABELS

    result_path, _ = segmented
    volume = oblique_sample()
    volume_node = node_from_volume(mrml_scene, volume, "CT")
    output = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    apply_segmentation_file(result_path, output, volume_node, "phantom-liver:1")
    lesion_id = segments_by_name(output)["liver lesion 1"]
    relabelled = int(segment_mask(output, lesion_id, volume).sum())
    assert relabelled > 0
    output.GetSegmentation().GetSegment(lesion_id).SetName("liver")
    Dataset.create(tmp_path / "ds", "site", PHANTOM_LABELS, ("CT",))
    record = export_corrected_case(tmp_path / "ds", "case01", volume_node, output)
    assert record.provenance.changed_voxels == relabelled


def test_an_output_segmentation_under_a_transform_is_refused_before_anything_is_written(mrml_scene, segmented):
    result_path, _ = segmented
    volume_node = node_from_volume(mrml_scene, oblique_sample(), "CT")
    output = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "out")
    output.SetAndObserveTransformNodeID(mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode").GetID())
    with pytest.raises(io.ImageError, match="the output segmentation is under a transform"):
        apply_segmentation_file(result_path, output, volume_node, "phantom-liver:1")
    assert output.GetSegmentation().GetNumberOfSegments() == 0 and output.GetAttribute(MODEL_ATTRIBUTE) is None
