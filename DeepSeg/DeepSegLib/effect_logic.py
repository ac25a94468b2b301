"""What the DeepSeg Segment Editor effect decides, without Qt, tested with Slicer's editor logic.

The effect (``SegmentEditorDeepSegLib/SegmentEditorEffect.py``) forwards Apply, Cancel, activation
changes and its timer here. Decided here:

- the model list and each model's labels (plain JSON: works before anything is installed), and the
  chosen model and label kept on the Segment Editor node, which the scene saves;
- what Apply captures: the segmentation node, the *segment selected at Apply*, the source volume's
  grid and the model label. The result goes into that segment even if the user selects another
  one while the model runs (it is selected again for the write: the editor builds its editable area
  around the selected segment); if the segment was deleted meanwhile, nothing is written;
- the job (a ``deepseg segment`` process tree): progress text, Cancel (non-blocking), and what a
  deactivated or destroyed effect does (cancel, never write later);
- the write itself: the result resampled (nearest) from the source volume's grid onto the segmentation's
  reference geometry, the grid the editor's masks are made on (oversampling, *Specify geometry*, a
  segmentation made on another series), then one undoable edit through the editor (``saveStateForUndo``
  then ``modifySegmentByLabelmap``), so the editor's editable area, intensity range and overwrite
  settings apply as for Slicer's own effects: on another grid the editor drops the editable area and
  writes nothing under an intensity range.

The editor is reached through an :class:`EditorTarget`: in Slicer the effect's own
``scriptedEffect`` methods (which forward to ``vtkSlicerSegmentEditorLogic``, Slicer >= 5.10), in
tests and scripts :class:`EditorLogicTarget` on that same logic class.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import slicer

from . import dependencies
from .model_choices import ModelEntry, available_models
from .panel_logic import progress_text
from .segment_job import DeepSegJob, SegmentRequest, start_segmentation

#: Segment Editor node attributes that keep the effect's choices in the scene, named as the effect's own
#: parameters are (``qSlicerSegmentEditorAbstractEffect::setParameter`` writes ``<effect name>.<name>``;
#: Slicer 5.10, ``qSlicerSegmentEditorAbstractEffect.cxx:639``): the model's ``--model`` reference and the
#: name of the model label to write
MODEL_PARAMETER = "DeepSeg.Model"
LABEL_PARAMETER = "DeepSeg.ModelLabel"


class EffectError(Exception):
    """Something the user must fix before Apply can run; the message says what."""


class EditorTarget(Protocol):
    """The two editor operations the effect needs."""

    def save_state_for_undo(self) -> None:
        """Record the segmentation's state so one Undo restores it."""

    def modify_segment(
        self, segmentation_node: slicer.vtkMRMLSegmentationNode, segment_id: str, labelmap: slicer.vtkOrientedImageData
    ) -> None:
        """Set ``segment_id`` to ``labelmap`` (masking and overwrite settings of the editor apply)."""

    def select_segment(self, segment_id: str) -> None:
        """Make ``segment_id`` the editor's selected segment."""


class EditorLogicTarget:
    """:class:`EditorTarget` on a ``vtkSlicerSegmentEditorLogic`` (what the effect's C++ methods call)."""

    def __init__(self, logic: slicer.vtkSlicerSegmentEditorLogic) -> None:
        self.logic = logic

    def save_state_for_undo(self) -> None:
        self.logic.SaveStateForUndo()

    def modify_segment(
        self, segmentation_node: slicer.vtkMRMLSegmentationNode, segment_id: str, labelmap: slicer.vtkOrientedImageData
    ) -> None:
        self.logic.ModifySegmentByLabelmap(segmentation_node, segment_id, labelmap, self.logic.ModificationModeSet, False, False)

    def select_segment(self, segment_id: str) -> None:
        self.logic.GetSegmentEditorNode().SetSelectedSegmentID(segment_id)


@dataclass
class EffectView:
    """What the effect's options widgets show."""

    models: list[ModelEntry] = field(default_factory=list)
    model_index: int = -1
    label_names: tuple[str, ...] = ()
    label_index: int = -1
    apply_enabled: bool = True
    cancel_enabled: bool = False
    status: str = ""


@dataclass(frozen=True)
class ApplyTarget:
    """Where the result goes, fixed when Apply was clicked."""

    segmentation_node: slicer.vtkMRMLSegmentationNode
    segment_id: str
    segment_name: str
    label_name: str
    grid: object  # deepseg_core.io.Volume of the source volume


class DeepSegEffectLogic:
    """The effect's decisions and state (see the module docstring)."""

    def __init__(
        self,
        models_dir: str | None = None,
        python: str | list[str] | None = None,
        find_spec: Callable[[str], object | None] = importlib.util.find_spec,
    ) -> None:
        self.models_dir = models_dir
        self.python = python
        self.find_spec = find_spec
        self.view = EffectView()
        self.job: DeepSegJob | None = None
        self.target: ApplyTarget | None = None
        self._stop_reason = ""
        self._cancelled = False

    def refresh_models(self) -> None:
        """Re-read the model list (JSON only) and keep the chosen model when it is still there."""
        chosen = self.view.models[self.view.model_index].ref if 0 <= self.view.model_index < len(self.view.models) else None
        chosen_label = (
            self.view.label_names[self.view.label_index] if 0 <= self.view.label_index < len(self.view.label_names) else None
        )
        self.view.models, problems = available_models(self.models_dir)
        refs = [entry.ref for entry in self.view.models]
        self.choose_model(refs.index(chosen) if chosen in refs else (0 if refs else -1))
        if chosen_label in self.view.label_names:  # an activation keeps the label the user chose
            self.view.label_index = self.view.label_names.index(chosen_label)
        if problems:
            self.view.status = "Some model folders could not be read: " + " ".join(problems)

    def choose_model(self, index: int) -> None:
        """The user picked model ``index``: its labels fill the label selector."""
        self.view.model_index = index
        entry = self.view.models[index] if 0 <= index < len(self.view.models) else None
        self.view.label_names = entry.label_names if entry else ()
        self.view.label_index = 0 if self.view.label_names else -1

    def choose_label(self, index: int) -> None:
        """The user picked which of the model's labels to write."""
        self.view.label_index = index

    def save_choices(self, editor_node: slicer.vtkMRMLSegmentEditorNode | None) -> None:
        """Write the chosen model and label on the Segment Editor node (:data:`MODEL_PARAMETER`,
        :data:`LABEL_PARAMETER`), which the scene saves, so a reopened scene offers them again."""
        if editor_node is None:
            return
        models, labels = self.view.models, self.view.label_names
        chosen = {
            MODEL_PARAMETER: models[self.view.model_index].ref if 0 <= self.view.model_index < len(models) else None,
            LABEL_PARAMETER: labels[self.view.label_index] if 0 <= self.view.label_index < len(labels) else None,
        }
        # as Slicer's setCommonParameter writes a parameter: without the node's full Modified event, which
        # would make the editor widget update everything for a setting only this effect reads
        disabled = editor_node.GetDisableModifiedEvent()
        editor_node.SetDisableModifiedEvent(1)
        try:
            for name, value in chosen.items():
                if value is None:
                    editor_node.RemoveAttribute(name)
                elif editor_node.GetAttribute(name) != value:
                    editor_node.SetAttribute(name, value)
        finally:
            editor_node.SetDisableModifiedEvent(disabled)

    def restore_choices(self, editor_node: slicer.vtkMRMLSegmentEditorNode | None) -> None:
        """Choose the model and label the Segment Editor node names (a saved scene, or the editor's last use),
        when this model list has them; else keep the current choice and say in the status what is missing."""
        if editor_node is None or self.job is not None:
            return
        ref, label = editor_node.GetAttribute(MODEL_PARAMETER), editor_node.GetAttribute(LABEL_PARAMETER)
        if not ref:
            return
        refs = [entry.ref for entry in self.view.models]
        if ref not in refs:
            current = self.view.models[self.view.model_index].label if 0 <= self.view.model_index < len(refs) else "none"
            self.view.status = (
                f"This scene's DeepSeg model {ref} is not in the model list; chosen instead: {current}. "
                "Import or install that model to use it again."
            )
            return
        if refs.index(ref) != self.view.model_index:
            self.choose_model(refs.index(ref))
        if label in self.view.label_names:
            self.view.label_index = self.view.label_names.index(label)
        elif label:
            self.view.status = (
                f"This scene's model label {label!r} is not one of {ref}'s labels "
                f"({', '.join(self.view.label_names)}); chosen instead: {self.view.label_names[self.view.label_index]}."
            )

    def install_offer(self) -> dependencies.InstallOffer | None:
        """What must be installed before the model can run (None: nothing)."""
        return dependencies.install_offer(self.find_spec, self.python)

    def start(
        self,
        source_volume_node: slicer.vtkMRMLScalarVolumeNode | None,
        segmentation_node: slicer.vtkMRMLSegmentationNode | None,
        segment_id: str | None,
        label_index: int,
    ) -> DeepSegJob:
        """Apply: run the chosen model on the source volume; the result will go into ``segment_id``."""
        from .mrml_bridge import volume_from_node

        if self.job is not None:
            raise EffectError("DeepSeg is already running; wait for it or click Cancel.")
        if not (0 <= self.view.model_index < len(self.view.models)):
            raise EffectError("Choose a model first (import one in the DeepSeg module if the list is empty).")
        if not (0 <= label_index < len(self.view.label_names)):
            raise EffectError("Choose which of the model's labels to write into the segment.")
        if source_volume_node is None or segmentation_node is None:
            raise EffectError("Choose a segmentation and a source volume in the Segment Editor first.")
        segment = segmentation_node.GetSegmentation().GetSegment(segment_id) if segment_id else None
        if segment is None:
            raise EffectError("Select the segment to write into (add one with Add if there is none).")
        if segmentation_node.GetParentTransformNode() is not None:
            # the result is made on the source volume's grid in world coordinates; the segments live in the node's
            # own frame, so under a transform the result would be written moved by it
            raise EffectError(
                f"The segmentation {segmentation_node.GetName()!r} is under a transform: harden or remove it"
                " (Data module) before applying DeepSeg."
            )
        dependencies.require_engine(self.python, self.find_spec, EffectError)
        entry = self.view.models[self.view.model_index]
        if len(entry.channels) != 1:
            raise EffectError(f"{entry.label} needs {len(entry.channels)} input volumes; use the DeepSeg module for it.")
        grid = volume_from_node(source_volume_node)
        request = SegmentRequest(model=entry.ref, measurements=False, models_dir=self.models_dir)
        self.job = start_segmentation([grid], request, self.python)
        self.target = ApplyTarget(segmentation_node, segment_id, segment.GetName(), self.view.label_names[label_index], grid)
        self._stop_reason = ""
        self._cancelled = False
        self.view.apply_enabled = False
        self.view.cancel_enabled = True
        self.view.status = f"Running {entry.label} for segment {segment.GetName()!r}..."
        return self.job

    def poll(self, editor: EditorTarget) -> bool:
        """Read new events; when the job has finished, write its result through ``editor``. True while running."""
        job = self.job
        if job is None:
            return False
        for event in job.poll():
            _, text = progress_text(event)
            if text and not job.cancel_requested:
                self.view.status = text
        if not job.finished:
            return True
        job.wait(5)
        self.job = None
        target, self.target = self.target, None
        self.view.apply_enabled = True
        self.view.cancel_enabled = False
        try:
            if job.outcome == "cancelled" or self._cancelled:  # a job that ended just before the cancel too
                self.view.status = self._stop_reason or "Cancelled; nothing was written."
            elif job.outcome != "succeeded":
                self.view.status = job.failure_text()
            else:
                self.view.status = self._write(job, target, editor)
        finally:
            job.cleanup()
        return False

    def _write(self, job: DeepSegJob, target: ApplyTarget, editor: EditorTarget) -> str:
        from deepseg_core import io

        from .result_review import domain_check_text

        text = write_label(io.read_segmentation(job.output).mask(target.label_name), target, editor)
        if job.domain_check is not None:
            verdict, check = domain_check_text(job.domain_check)
            if verdict != "ok":
                text += f" {check}"
        return text

    def cancel(self, reason: str = "") -> None:
        """Stop the run (non-blocking); ``reason`` replaces the *Cancelled* message. Nothing is written afterwards,
        also when the job had finished before the cancel and its result was not yet read."""
        if self.job is not None and not self._cancelled:
            self._stop_reason = reason
            self._cancelled = True
            self.job.cancel()
            self.view.cancel_enabled = False
            self.view.status = "Cancelling..."

    def close(self) -> None:
        """The editor is being destroyed: stop the tree now, write nothing, remove the job folder."""
        if self.job is not None:
            self.job.kill_and_remove()
            self.job = None
            self.target = None


def write_label(mask_zyx: np.ndarray, target: ApplyTarget, editor: EditorTarget) -> str:
    """Write ``mask_zyx`` (on ``target.grid``) into the target segment through ``editor``; what to tell the user.

    Nothing is written when the segment was removed meanwhile, or when the mask is empty: written in Set mode,
    an empty result would clear what the user has in the segment.
    """
    from .mrml_bridge import oriented_mask

    node = target.segmentation_node
    if node.GetScene() is None or node.GetSegmentation().GetSegment(target.segment_id) is None:
        return f"Segment {target.segment_name!r} was removed while DeepSeg ran; nothing was written."
    if not mask_zyx.any():
        return f"The model found no {target.label_name} in this volume; {target.segment_name!r} was left as it was."
    labelmap = on_reference_geometry(node, oriented_mask(np.asarray(mask_zyx, bool), target.grid))
    editor.select_segment(target.segment_id)
    editor.save_state_for_undo()
    editor.modify_segment(node, target.segment_id, labelmap)
    # counted on the source volume's grid: an oversampled segment holds more, the editor's masking may keep fewer
    return (
        f"{int(mask_zyx.sum())} voxels of {target.label_name} found; written into {target.segment_name!r}"
        " through the editor's masking."
    )


def on_reference_geometry(
    segmentation_node: slicer.vtkMRMLSegmentationNode, labelmap: slicer.vtkOrientedImageData
) -> slicer.vtkOrientedImageData:
    """``labelmap`` resampled (nearest neighbour) onto the segmentation's reference geometry, the grid the editor
    makes its editable-area and intensity masks on; as it is where that geometry is not set or is the same."""
    geometry = slicer.vtkSlicerSegmentEditorLogic.GetReferenceImageGeometryStringFromSegmentation(
        segmentation_node.GetSegmentation()
    )
    reference = slicer.vtkOrientedImageData()
    if not geometry or not slicer.vtkSegmentationConverter.DeserializeImageGeometry(geometry, reference, False):
        return labelmap
    if slicer.vtkOrientedImageDataResample.DoGeometriesMatch(labelmap, reference):
        return labelmap
    resampled = slicer.vtkOrientedImageData()
    resample = slicer.vtkOrientedImageDataResample
    resample.ResampleOrientedImageToReferenceOrientedImage(labelmap, reference, resampled, False, False)
    return resampled
