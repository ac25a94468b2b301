"""The Segment Editor effect's code path on a real MRML scene: Apply captures the segment, a real
``deepseg segment`` run, the write through Slicer's editor logic (masking, overwrite, one undo),
a segment deleted meanwhile, Cancel, and a destroyed editor.

``EditorLogicTarget`` drives ``vtkSlicerSegmentEditorLogic``, the class the effect's own
``saveStateForUndo`` / ``modifySegmentByLabelmap`` forward to in Slicer 5.10
(``qSlicerSegmentEditorAbstractEffect.cxx:279-310``, ``qMRMLSegmentEditorWidget.cxx:1978-1982``).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import slicer
import vtk

from deepseg_core import io
from deepseg_core.demo import DEFAULT_MODEL, SAMPLE_VOLUME
from DeepSegLib.effect_logic import LABEL_PARAMETER, MODEL_PARAMETER, DeepSegEffectLogic, EditorLogicTarget, EffectError
from DeepSegLib.mrml_bridge import SegmentSpec, add_segment, node_from_volume, segment_mask, segments_by_name
from DeepSegLib.segment_job import SegmentRequest, start_segmentation


@pytest.fixture(scope="module")
def sample() -> io.Volume:
    return io.read_image(SAMPLE_VOLUME)


@pytest.fixture(scope="module")
def reference_liver(sample, engine_python) -> np.ndarray:
    """What the bundled model says is liver on the sample (a separate, plain run)."""
    job = start_segmentation([sample], SegmentRequest(model=str(DEFAULT_MODEL), device="cpu", measurements=False), engine_python)
    try:
        assert job.wait(300) == 0, job.error
        return io.read_segmentation(job.output).mask("liver")
    finally:
        job.cleanup()


def editor(scene, volume_node, segmentation_node):
    editor_node = scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    logic = slicer.vtkSlicerSegmentEditorLogic()
    logic.SetMRMLScene(scene)
    logic.SetSegmentEditorNode(editor_node)
    logic.SetSegmentationNode(segmentation_node)
    logic.SetSourceVolumeNode(volume_node)
    return editor_node, logic


def effect_logic(engine_python, tmp_path) -> DeepSegEffectLogic:
    logic = DeepSegEffectLogic(models_dir=str(tmp_path / "store"), python=engine_python)
    logic.refresh_models()
    assert [entry.label for entry in logic.view.models] == ["phantom-liver v1 (bundled)"]
    assert logic.view.label_names == ("liver", "liver lesion")
    return logic


def run_to_end(logic: DeepSegEffectLogic, target, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while logic.poll(target):
        assert time.monotonic() < deadline, "the effect's job did not finish"
        time.sleep(0.05)


@pytest.mark.parametrize("overwrite", ["none", "all"])
def test_apply_writes_into_the_segment_selected_at_apply_with_masking_overwrite_and_one_undo(
    mrml_scene, sample, reference_liver, engine_python, tmp_path, overwrite
):
    volume_node = node_from_volume(mrml_scene, sample, "CT")
    seg = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    seg.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    region = np.zeros(sample.shape_zyx, bool)
    region[:, :56] = True  # editable area: the anterior half
    other = np.zeros(sample.shape_zyx, bool)
    other[:, :, :60] = True  # an existing segment the liver overlaps
    add_segment(seg, SegmentSpec("region", (1, 0, 0)), region, sample)
    add_segment(seg, SegmentSpec("other", (0, 0, 1)), other, sample)
    target = seg.GetSegmentation().AddEmptySegment("target", "target", [0, 1, 0])
    editor_node, editor_logic = editor(mrml_scene, volume_node, seg)
    editor_node.SetSelectedSegmentID(target)
    editor_node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    editor_node.SetMaskSegmentID(segments_by_name(seg)["region"])
    editor_node.SetOverwriteMode(editor_node.OverwriteNone if overwrite == "none" else editor_node.OverwriteAllSegments)

    logic = effect_logic(engine_python, tmp_path)
    logic.start(volume_node, seg, editor_node.GetSelectedSegmentID(), label_index=0)
    editor_node.SetSelectedSegmentID(segments_by_name(seg)["other"])  # the user moves on while it runs
    run_to_end(logic, EditorLogicTarget(editor_logic))

    written = reference_liver & region
    assert written.sum() > 1000
    np.testing.assert_array_equal(segment_mask(seg, target, sample), written)
    other_now = segment_mask(seg, segments_by_name(seg)["other"], sample)
    if overwrite == "none":
        np.testing.assert_array_equal(other_now, other)
    else:
        np.testing.assert_array_equal(other_now, other & ~written)
    assert logic.view.status.startswith(f"{int(reference_liver.sum())} voxels of liver found; written into 'target'")
    assert logic.view.apply_enabled and not logic.view.cancel_enabled
    editor_logic.Undo()  # one undo restores everything
    assert not segment_mask(seg, target, sample).any()
    np.testing.assert_array_equal(segment_mask(seg, segments_by_name(seg)["other"], sample), other)


def test_on_an_oversampled_segmentation_the_editable_area_intensity_range_and_outside_all_segments_still_apply(
    mrml_scene, sample, reference_liver, engine_python, tmp_path
):
    """The result is made on the source volume's grid; the editor makes its masks on the segmentation's reference
    geometry (here oversampled 2x, as *Specify geometry* makes it) and, on another grid, dropped the editable
    area and wrote nothing under an intensity range. The user selects another segment while the model runs: in
    "outside all segments" mode the editor protects the segments other than the selected one."""
    from DeepSegLib.mrml_bridge import _numpy_to_matrix

    volume_node = node_from_volume(mrml_scene, sample, "CT")
    seg = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    fine = slicer.vtkOrientedImageData()
    z, y, x = sample.shape_zyx
    fine.SetExtent(0, 2 * x - 1, 0, 2 * y - 1, 0, 2 * z - 1)
    fine_to_ras = sample.ijk_to_ras().copy()
    fine_to_ras[:3, :3] /= 2
    fine_to_ras[:3, 3] -= 0.25 * sample.ijk_to_ras()[:3, :3].sum(axis=1)  # the image's box at half the spacing
    fine.SetImageToWorldMatrix(_numpy_to_matrix(fine_to_ras))
    seg.GetSegmentation().SetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(),
        slicer.vtkSegmentationConverter.SerializeImageGeometry(fine),
    )
    protected = np.zeros(sample.shape_zyx, bool)
    protected[:, :, :60] = True  # an existing segment the liver overlaps
    add_segment(seg, SegmentSpec("protected", (0, 0, 1)), protected, sample)
    target = seg.GetSegmentation().AddEmptySegment("target", "target", [0, 1, 0])
    elsewhere = seg.GetSegmentation().AddEmptySegment("elsewhere", "elsewhere", [1, 1, 0])
    editor_node, editor_logic = editor(mrml_scene, volume_node, seg)
    editor_node.SetSelectedSegmentID(target)
    editor_node.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedOutsideAllSegments)
    editor_node.SetOverwriteMode(editor_node.OverwriteNone)
    editor_node.SetSourceVolumeIntensityMask(True)
    editor_node.SetSourceVolumeIntensityMaskRange(-500.0, 5000.0)

    logic = effect_logic(engine_python, tmp_path)
    logic.start(volume_node, seg, target, label_index=0)
    editor_node.SetSelectedSegmentID(elsewhere)  # the user moves on while it runs
    # slices 20-27 of the source volume darkened below the range after the model read it: the editor's range
    # must keep the liver out of them (the model's result still has liver there)
    from vtk.util import numpy_support

    voxels = numpy_support.vtk_to_numpy(volume_node.GetImageData().GetPointData().GetScalars()).reshape(sample.shape_zyx)
    voxels[20:28] = -1000
    volume_node.GetImageData().Modified()
    run_to_end(logic, EditorLogicTarget(editor_logic))

    # the editor thresholds the source volume interpolated onto the oversampled grid: a slice next to the dark
    # slab counts by its neighbours, so the checks keep one slice away from the slab's faces
    candidates = reference_liver & ~protected
    actual = segment_mask(seg, target, sample)
    assert candidates[21:27].sum() > 1000 and (reference_liver & protected).sum() > 1000
    assert not (actual & ~candidates).any(), "written outside the editable area or over the protected segment"
    assert not actual[21:27].any(), "the intensity range was not applied"
    np.testing.assert_array_equal(actual[:19], candidates[:19])
    np.testing.assert_array_equal(actual[29:], candidates[29:])
    np.testing.assert_array_equal(segment_mask(seg, segments_by_name(seg)["protected"], sample), protected)
    assert editor_node.GetSelectedSegmentID() == target  # selected again for the write


def test_a_label_the_model_does_not_find_leaves_the_segment_and_the_undo_history_as_they_were(mrml_scene, sample):
    """Written in Set mode, an empty result cleared the user's segment (within the editable area). The toy
    bundled model finds both labels in any input, so the write is given the empty mask directly."""
    from DeepSegLib.effect_logic import ApplyTarget, write_label

    volume_node = node_from_volume(mrml_scene, sample, "CT")
    seg = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    drawn = np.zeros(sample.shape_zyx, bool)
    drawn[10:20, 30:60, 30:60] = True
    segment_id = add_segment(seg, SegmentSpec("drawn by hand", (0, 1, 0)), drawn, sample)
    editor_node, editor_logic = editor(mrml_scene, volume_node, seg)
    editor_node.SetSelectedSegmentID(segment_id)
    target = ApplyTarget(seg, segment_id, "drawn by hand", "liver lesion", sample)
    said = write_label(np.zeros(sample.shape_zyx, bool), target, EditorLogicTarget(editor_logic))
    assert said == "The model found no liver lesion in this volume; 'drawn by hand' was left as it was."
    np.testing.assert_array_equal(segment_mask(seg, segment_id, sample), drawn)
    assert not editor_logic.CanUndo()
    found = np.zeros(sample.shape_zyx, bool)
    found[12:14, 40:50, 40:50] = True
    assert write_label(found, target, EditorLogicTarget(editor_logic)).startswith("200 voxels of liver lesion found; written")
    np.testing.assert_array_equal(segment_mask(seg, segment_id, sample), found)  # Set mode: replaced
    assert editor_logic.CanUndo()


def test_the_chosen_label_is_kept_when_the_effect_is_activated_again(tmp_path):
    """The effect's label selector snapped back to the first label after every Apply and activation."""
    logic = DeepSegEffectLogic(models_dir=str(tmp_path / "store"))
    logic.refresh_models()
    logic.choose_label(1)
    logic.refresh_models()  # what activate() does
    assert logic.view.label_names[logic.view.label_index] == "liver lesion"
    logic.choose_model(0)  # choosing a model anew starts at its first label
    assert logic.view.label_index == 0


def test_a_segmentation_under_a_transform_is_refused_and_a_cancel_after_the_job_ended_writes_nothing(
    mrml_scene, sample, engine_python, tmp_path
):
    volume_node = node_from_volume(mrml_scene, sample, "CT")
    seg = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    target = seg.GetSegmentation().AddEmptySegment("target", "target", [0, 1, 0])
    _, editor_logic = editor(mrml_scene, volume_node, seg)
    logic = effect_logic(engine_python, tmp_path)
    seg.SetAndObserveTransformNodeID(mrml_scene.AddNewNodeByClass("vtkMRMLLinearTransformNode").GetID())
    with pytest.raises(EffectError, match="is under a transform"):
        logic.start(volume_node, seg, target, label_index=0)
    seg.SetAndObserveTransformNodeID(None)
    job = logic.start(volume_node, seg, target, label_index=1)
    assert job.wait(300) == 0  # finished, its result not yet read by the effect's timer
    logic.cancel("Cancelled because the DeepSeg effect was deactivated; nothing was written.")
    run_to_end(logic, EditorLogicTarget(editor_logic), timeout_s=60)
    assert logic.view.status == "Cancelled because the DeepSeg effect was deactivated; nothing was written."
    assert not segment_mask(seg, target, sample).any()


def test_a_segment_deleted_while_the_model_runs_gets_nothing_and_says_so(mrml_scene, sample, engine_python, tmp_path):
    volume_node = node_from_volume(mrml_scene, sample, "CT")
    seg = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    target = seg.GetSegmentation().AddEmptySegment("target", "target", [0, 1, 0])
    keep = seg.GetSegmentation().AddEmptySegment("keep", "keep", [0, 0, 1])
    _, editor_logic = editor(mrml_scene, volume_node, seg)
    logic = effect_logic(engine_python, tmp_path)
    logic.start(volume_node, seg, target, label_index=0)
    seg.GetSegmentation().RemoveSegment(target)
    run_to_end(logic, EditorLogicTarget(editor_logic))
    assert logic.view.status == "Segment 'target' was removed while DeepSeg ran; nothing was written."
    assert not segment_mask(seg, keep, sample).any()


def test_cancel_writes_nothing_and_close_kills_a_running_job(mrml_scene, sample, engine_python, tmp_path):
    volume_node = node_from_volume(mrml_scene, sample, "CT")
    seg = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    target = seg.GetSegmentation().AddEmptySegment("target", "target", [0, 1, 0])
    _, editor_logic = editor(mrml_scene, volume_node, seg)
    logic = effect_logic(engine_python, tmp_path)
    job = logic.start(volume_node, seg, target, label_index=0)
    with pytest.raises(EffectError, match="already running"):
        logic.start(volume_node, seg, target, label_index=0)
    logic.cancel("Cancelled because the DeepSeg effect was deactivated; nothing was written.")
    assert not logic.view.cancel_enabled
    run_to_end(logic, EditorLogicTarget(editor_logic), timeout_s=60)
    assert logic.view.status == "Cancelled because the DeepSeg effect was deactivated; nothing was written."
    assert not segment_mask(seg, target, sample).any() and not job.workdir.exists()

    job = logic.start(volume_node, seg, target, label_index=0)
    logic.close()  # the Segment Editor widget is destroyed
    assert logic.job is None and job.finished and not job.workdir.exists()
    assert not segment_mask(seg, target, sample).any()


def test_apply_refuses_without_a_segment_or_without_the_engine_packages(mrml_scene, sample, engine_python, tmp_path):
    volume_node = node_from_volume(mrml_scene, sample, "CT")
    seg = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "s")
    logic = effect_logic(engine_python, tmp_path)
    with pytest.raises(EffectError, match="Select the segment to write into"):
        logic.start(volume_node, seg, None, label_index=0)
    target = seg.GetSegmentation().AddEmptySegment("target", "target", [0, 1, 0])
    no_torch = DeepSegEffectLogic(
        models_dir=str(tmp_path / "store"), find_spec=lambda name: None if name in ("torch", "PyTorchUtils") else object()
    )
    no_torch.refresh_models()
    offer = no_torch.install_offer()
    assert offer is not None and offer.missing == ("torch",)
    with pytest.raises(EffectError, match=r"not installed yet \(torch\)"):
        no_torch.start(volume_node, seg, target, label_index=0)
    assert no_torch.job is None


def test_the_chosen_model_and_label_are_saved_with_the_scene_and_offered_again(mrml_scene, tmp_path):
    """As Slicer's own effects keep their settings: on the Segment Editor node, as the effect's parameters
    (``DeepSeg.Model``, ``DeepSeg.ModelLabel``), written with the scene and read back from the file."""
    editor_node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    logic = DeepSegEffectLogic(models_dir=str(tmp_path / "store"))
    logic.refresh_models()
    logic.choose_label(1)
    modified = []
    editor_node.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, event: modified.append(event))
    logic.save_choices(editor_node)
    assert modified == [], "written as Slicer writes effect parameters: no full Modified event of the editor node"
    assert editor_node.GetAttribute(MODEL_PARAMETER) == logic.view.models[0].ref
    assert editor_node.GetAttribute(LABEL_PARAMETER) == "liver lesion"

    mrml_scene.SetURL(str(tmp_path / "scene.mrml"))
    assert mrml_scene.Commit()
    mrml_scene.Clear(0)
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLSegmentEditorNode") == 0
    mrml_scene.SetURL(str(tmp_path / "scene.mrml"))
    assert mrml_scene.Import()
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLSegmentEditorNode") == 1
    saved_node = mrml_scene.GetFirstNodeByClass("vtkMRMLSegmentEditorNode")
    fresh = DeepSegEffectLogic(models_dir=str(tmp_path / "store"))
    fresh.refresh_models()
    assert fresh.view.label_index == 0  # a new effect starts at the first label ...
    fresh.restore_choices(saved_node)
    assert fresh.view.label_names[fresh.view.label_index] == "liver lesion"  # ... and the scene's choice wins
    assert fresh.view.status == ""


def test_a_saved_model_or_label_this_computer_lacks_keeps_the_current_choice_and_says_so(mrml_scene, tmp_path):
    editor_node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
    logic = DeepSegEffectLogic(models_dir=str(tmp_path / "store"))
    logic.refresh_models()
    editor_node.SetAttribute(MODEL_PARAMETER, "hospital-liver:7")
    editor_node.SetAttribute(LABEL_PARAMETER, "liver lesion")
    logic.restore_choices(editor_node)
    assert (logic.view.model_index, logic.view.label_index) == (0, 0)
    assert "hospital-liver:7 is not in the model list" in logic.view.status
    assert "phantom-liver v1 (bundled)" in logic.view.status

    editor_node.SetAttribute(MODEL_PARAMETER, logic.view.models[0].ref)
    editor_node.SetAttribute(LABEL_PARAMETER, "spleen")
    logic.view.status = ""
    logic.restore_choices(editor_node)
    assert logic.view.label_index == 0
    assert "'spleen' is not one of" in logic.view.status and "liver, liver lesion" in logic.view.status
    # nothing saved yet (a scene from before this effect, or another editor): the current choice stays, silently
    logic.choose_label(1)
    logic.view.status = ""
    logic.restore_choices(mrml_scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode"))
    assert logic.view.label_index == 1 and logic.view.status == ""
