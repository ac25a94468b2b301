"""The DeepSeg Segment Editor effect: run a model and write one of its labels into the selected segment.

Loaded by Slicer's Segment Editor (``qSlicerSegmentEditorScriptedEffect.setPythonSource``); runs
inside Slicer only. The edit goes through ``modifySelectedSegmentByLabelmap`` after
``saveStateForUndo``, so the editor's editable area, intensity range and overwrite settings apply
and one undo restores the previous segments (the same path ``scene_logic.apply_in_segment_editor``
takes with the editor logic, which the tests exercise on real MRML).
"""

import os

import qt
import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorEffect


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Segment Editor effect "DeepSeg"."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "DeepSeg"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self._job = None
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self._poll)

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        path = os.path.join(os.path.dirname(__file__), "..", "Resources", "Icons", "DeepSeg.png")
        return qt.QIcon(path) if os.path.exists(path) else qt.QIcon()

    def helpText(self):
        return (
            "<html>Run a DeepSeg model on the source volume and write the chosen label into the selected "
            "segment. Masking and overwrite settings apply; Undo restores the previous state.</html>"
        )

    def setupOptionsFrame(self):
        from DeepSegLib.panel_support import available_models

        self.modelComboBox = qt.QComboBox()
        for entry in available_models():
            self.modelComboBox.addItem(entry.label, entry.ref)
        self.modelComboBox.connect("currentIndexChanged(int)", self._fillLabels)
        self.scriptedEffect.addLabeledOptionsWidget("Model:", self.modelComboBox)
        self.labelComboBox = qt.QComboBox()
        self.scriptedEffect.addLabeledOptionsWidget("Model label:", self.labelComboBox)
        self.applyButton = qt.QPushButton("Apply")
        self.applyButton.connect("clicked()", self.onApply)
        self.statusLabel = qt.QLabel()
        self.scriptedEffect.addOptionsWidget(self.applyButton)
        self.scriptedEffect.addOptionsWidget(self.statusLabel)
        self._fillLabels()

    def _fillLabels(self, index=None):
        from deepseg_core.model_card import ModelCard
        from deepseg_core.model_store import CARD_FILE, resolve_model

        self.labelComboBox.clear()
        ref = self.modelComboBox.currentData
        if not ref:
            return
        card = ModelCard.read(resolve_model(ref) / CARD_FILE)
        for label in card.labels:
            self.labelComboBox.addItem(label.name, label.name)

    def onApply(self):
        from DeepSegLib.mrml_bridge import volume_from_node
        from DeepSegLib.segment_job import SegmentRequest, start_segmentation

        source = self.scriptedEffect.parameterSetNode().GetSourceVolumeNode()
        with slicer.util.tryWithErrorDisplay("DeepSeg could not start.", waitCursor=True):
            request = SegmentRequest(model=self.modelComboBox.currentData, measurements=False)
            self._job = start_segmentation([volume_from_node(source)], request)
            self._grid = volume_from_node(source)
            self.applyButton.enabled = False
            self.statusLabel.text = "Running..."
            self._timer.start()

    def _poll(self):
        from DeepSegLib.panel_support import progress_text

        for event in self._job.poll():
            _, text = progress_text(event)
            if text:
                self.statusLabel.text = text
        if not self._job.finished:
            return
        self._timer.stop()
        job, self._job = self._job, None
        self.applyButton.enabled = True
        try:
            if job.wait(5) != 0:
                self.statusLabel.text = f"Failed: {job.error}"
                return
            self._write(job.output)
            if job.domain_check is not None:
                from DeepSegLib.result_review import domain_check_text

                verdict, text = domain_check_text(job.domain_check)
                if verdict != "ok":
                    self.statusLabel.text += f" {text}"
        finally:
            job.cleanup()

    def _write(self, seg_path):
        from deepseg_core import io
        from DeepSegLib.mrml_bridge import oriented_mask

        result = io.read_segmentation(seg_path)
        mask = result.mask(self.labelComboBox.currentData)
        self.scriptedEffect.saveStateForUndo()
        modifier = oriented_mask(mask, self._grid)
        self.scriptedEffect.modifySelectedSegmentByLabelmap(
            modifier, slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet
        )
        self.statusLabel.text = f"{int(mask.sum())} voxels of {self.labelComboBox.currentText} written (masking applied)."
