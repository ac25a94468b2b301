"""The DeepSeg Segment Editor effect: run a model and write one of its labels into a segment.

Loaded by Slicer as the module ``SegmentEditorDeepSegLib`` (named after this folder), so imports
here are absolute. Thin: every decision is in ``DeepSegLib.effect_logic.DeepSegEffectLogic``
(tested with Slicer's editor logic); this file builds the options widgets and forwards to it.
"""

import os

import qt
import slicer
from SegmentEditorEffects.AbstractScriptedSegmentEditorEffect import AbstractScriptedSegmentEditorEffect


class ScriptedEffectTarget:
    """The effect's own editor operations (they forward to ``vtkSlicerSegmentEditorLogic``)."""

    def __init__(self, scriptedEffect):
        self.scriptedEffect = scriptedEffect

    def save_state_for_undo(self):
        self.scriptedEffect.saveStateForUndo()

    def modify_segment(self, segmentationNode, segmentId, labelmap):
        mode = slicer.qSlicerSegmentEditorAbstractEffect.ModificationModeSet
        self.scriptedEffect.modifySegmentByLabelmap(segmentationNode, segmentId, labelmap, mode)

    def select_segment(self, segmentId):
        self.scriptedEffect.parameterSetNode().SetSelectedSegmentID(segmentId)


class SegmentEditorEffect(AbstractScriptedSegmentEditorEffect):
    """Segment Editor effect "DeepSeg"."""

    def __init__(self, scriptedEffect):
        scriptedEffect.name = "DeepSeg"
        scriptedEffect.perSegment = True
        scriptedEffect.requireSegments = True
        AbstractScriptedSegmentEditorEffect.__init__(self, scriptedEffect)
        self.logic = None
        self._timer = None

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        path = os.path.join(os.path.dirname(__file__), "SegmentEditorEffect.png")
        return qt.QIcon(path) if os.path.exists(path) else qt.QIcon()

    def helpText(self):
        return (
            "<html>Run a DeepSeg model on the source volume and write the chosen label into the segment "
            "selected when you click Apply. Masking and overwrite settings apply; one Undo restores the "
            "previous state.</html>"
        )

    def setupOptionsFrame(self):
        from DeepSegLib.effect_logic import DeepSegEffectLogic

        self.logic = DeepSegEffectLogic()
        self.modelComboBox = qt.QComboBox()
        self.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.scriptedEffect.addLabeledOptionsWidget("Model:", self.modelComboBox)
        self.labelComboBox = qt.QComboBox()
        self.labelComboBox.connect("currentIndexChanged(int)", self.onLabelChanged)
        self.scriptedEffect.addLabeledOptionsWidget("Model label:", self.labelComboBox)
        self.applyButton = qt.QPushButton("Apply")
        self.applyButton.connect("clicked()", self.onApply)
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.connect("clicked()", self.onCancel)
        self.statusLabel = qt.QLabel()
        self.statusLabel.wordWrap = True
        for widget in (self.applyButton, self.cancelButton, self.statusLabel):
            self.scriptedEffect.addOptionsWidget(widget)
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onPoll)
        self.logic.refresh_models()
        self.logic.restore_choices(self.scriptedEffect.parameterSetNode())
        self.render()

    def activate(self):
        if self.logic is not None and self.logic.job is None:
            self.logic.refresh_models()
            self.logic.restore_choices(self.scriptedEffect.parameterSetNode())
            self.render()

    def updateGUIFromMRML(self):
        # the editor calls this when effect parameters change (a scene loaded, another editor widget)
        if self.logic is not None:
            self.logic.restore_choices(self.scriptedEffect.parameterSetNode())
            self.render()

    def deactivate(self):
        if self.logic is not None:
            self.logic.cancel("Cancelled because the DeepSeg effect was deactivated; nothing was written.")
            self.render()

    def sourceVolumeNodeChanged(self):
        if self.logic is not None and self.logic.job is not None:
            self.logic.cancel("Cancelled because the source volume changed; nothing was written.")
            self.render()

    def cleanup(self):
        if self._timer is not None:
            self._timer.stop()
        if self.logic is not None:
            self.logic.close()

    def render(self):
        view = self.logic.view
        for combo, items, index in (
            (self.modelComboBox, [entry.label for entry in view.models], view.model_index),
            (self.labelComboBox, list(view.label_names), view.label_index),
        ):
            wasBlocked = combo.blockSignals(True)
            if [combo.itemText(i) for i in range(combo.count)] != items:
                combo.clear()
                for item in items:
                    combo.addItem(item)
            combo.currentIndex = index
            combo.blockSignals(wasBlocked)
        self.applyButton.enabled = view.apply_enabled
        self.cancelButton.enabled = view.cancel_enabled
        self.statusLabel.text = view.status

    def onModelChanged(self, index):
        self.logic.choose_model(index)
        self.logic.save_choices(self.scriptedEffect.parameterSetNode())
        self.render()

    def onLabelChanged(self, index):
        self.logic.choose_label(index)
        self.logic.save_choices(self.scriptedEffect.parameterSetNode())

    def onApply(self):
        if not self.scriptedEffect.confirmCurrentSegmentVisible():
            return
        parameters = self.scriptedEffect.parameterSetNode()
        try:
            with slicer.util.tryWithErrorDisplay("DeepSeg could not start.", waitCursor=True):
                offer = self.logic.install_offer()
                if offer is not None:
                    from DeepSeg import DeepSegLogic

                    if not DeepSegLogic().installDependencies(offer):
                        return
                self.logic.start(
                    parameters.GetSourceVolumeNode(),
                    parameters.GetSegmentationNode(),
                    parameters.GetSelectedSegmentID(),
                    self.logic.view.label_index,
                )
                self._timer.start()
        finally:
            self.render()

    def onCancel(self):
        self.logic.cancel()
        self.render()

    def onPoll(self):
        try:
            with slicer.util.tryWithErrorDisplay("DeepSeg could not write its result."):
                if not self.logic.poll(ScriptedEffectTarget(self.scriptedEffect)):
                    self._timer.stop()
        finally:
            self.render()
