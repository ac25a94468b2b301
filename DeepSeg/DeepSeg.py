"""DeepSeg: deep-learning segmentation of CT and MR volumes (3D Slicer module, thin shell).

Every decision of the panel lives in ``DeepSegLib.panel_logic.DeepSegPanelLogic`` (Qt-free, tested
on real MRML scenes); this file binds widgets to it. The engine runs as a ``deepseg`` process tree
(``PythonSlicer``), so the GUI never blocks and nothing here imports torch. The module also
registers the **DeepSeg** Segment Editor effect (``SegmentEditorDeepSegLib``).

This file is parsed by Python 3.9 too (Slicer 5.8), so that an unsupported Slicer shows one clear
message: keep its syntax 3.9-compatible.
"""

import logging
import os
import pathlib
import sys
from typing import Annotated

import qt
import slicer
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

EFFECT_SOURCE = os.path.join(os.path.dirname(__file__), "SegmentEditorDeepSegLib", "SegmentEditorEffect.py")


def unsupportedReason():
    """None in a supported Slicer, else the one message shown instead of the panel."""
    from DeepSegLib.compatibility import unsupported_reason

    return unsupported_reason(sys.version_info[:2], (slicer.app.majorVersion, slicer.app.minorVersion))


class DeepSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "DeepSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["DeepSeg developers"]
        self.parent.helpText = (
            "Segment CT and MR volumes with trained U-Nets, correct the result in the Segment Editor, "
            "and export corrections for retraining in DeepSegTraining."
        )
        self.parent.acknowledgementText = "DeepSeg is an open-source 3D Slicer extension."
        reason = unsupportedReason()
        if reason:
            self.parent.helpText = reason
            logging.warning("DeepSeg: %s", reason)
            return
        slicer.app.connect("startupCompleted()", registerSegmentEditorEffect)


def registerSegmentEditorEffect():
    """Register the DeepSeg scripted effect (Slicer loads it as module ``SegmentEditorDeepSegLib``)."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    effect = effects.qSlicerSegmentEditorScriptedEffect(None)
    effect.setPythonSource(EFFECT_SOURCE.replace("\\", "/"))
    effect.self().register()


@parameterNodeWrapper
class DeepSegParameterNode:
    """Everything the panel shows; saved with the scene (same fields as ``panel_logic.PanelSettings``)."""

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    additionalVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    model: str = ""
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    overlap: float = 0.5
    tta: bool = False
    instances: bool = True
    uncertainty: bool = False
    measurements: bool = True
    datasetFolder: pathlib.Path = pathlib.Path()
    caseId: str = ""
    overwriteCase: bool = False
    backend: Annotated[str, Choice(["auto", "torch", "openvino", "onnxruntime"])] = "auto"
    precision: Annotated[str, Choice(["float32", "bfloat16"])] = "float32"


class DeepSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.panel = None
        self._parameterNode = None
        self._guiConnections = None
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onPoll)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        reason = unsupportedReason()
        if reason:
            label = qt.QLabel(reason)
            label.wordWrap = True
            self.layout.addWidget(label)
            return
        from DeepSegLib.panel_logic import DeepSegPanelLogic

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DeepSegLogic()
        self.panel = DeepSegPanelLogic(slicer.mrmlScene)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.onRefreshModels)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.segmentButton.connect("clicked(bool)", self.onSegment)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.undoButton.connect("clicked(bool)", self.onUndo)
        self.ui.editButton.connect("clicked(bool)", self.onEdit)
        self.ui.exportButton.connect("clicked(bool)", self.onExport)
        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSample)
        self.ui.nextUncertainButton.connect("clicked(bool)", self.onNextUncertain)
        self.ui.showMeasurementsButton.connect("clicked(bool)", self.onShowMeasurements)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self.panel.refresh_device_info()
        self.panel.refresh_models(self._parameterNode)
        self.render()

    def cleanup(self):
        self._timer.stop()
        if self.panel is not None:
            self.panel.close()
        self.removeObservers()

    def enter(self):
        if self.panel is not None:
            self.initializeParameterNode()
            self.render()

    def exit(self):
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        self.panel.abandon()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()
            self.render()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        self.panel.sync_model(self._parameterNode)

    def setParameterNode(self, parameterNode):
        if self._parameterNode and self._guiConnections is not None:
            self._parameterNode.disconnectGui(self._guiConnections)
            self._guiConnections = None
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._guiConnections = self._parameterNode.connectGui(self.ui)

    def render(self):
        """Copy the panel logic's view into the widgets (the only place widgets change)."""
        view = self.panel.view
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        if [combo.itemData(i) for i in range(combo.count)] != [entry.ref for entry in view.models]:
            combo.clear()
            for entry in view.models:
                combo.addItem(entry.label, entry.ref)
                combo.setItemData(combo.count - 1, entry.description, qt.Qt.ToolTipRole)
        combo.currentIndex = view.model_index
        combo.blockSignals(wasBlocked)
        self.ui.modelDescriptionLabel.text = view.model_description
        self.ui.additionalVolumeSelector.visible = self.ui.additionalVolumeLabel.visible = view.second_channel_visible
        self.ui.deviceInfoLabel.text = view.device_info
        self.ui.segmentButton.enabled = self.ui.importModelButton.enabled = view.segment_enabled
        self.ui.cancelButton.enabled = view.cancel_enabled
        self.ui.undoButton.enabled = view.undo_enabled
        self.ui.nextUncertainButton.enabled = view.next_uncertain_enabled
        self.ui.showMeasurementsButton.enabled = view.show_measurements_enabled
        self.ui.progressBar.value = view.progress_percent
        self.ui.statusLabel.text = view.status
        self.ui.domainCheckLabel.text = view.domain_text
        self.ui.domainCheckLabel.setStyleSheet(f"color: {view.domain_colour}")
        self.ui.uncertainRegionLabel.text = view.uncertain_regions_text
        self.ui.exportStatusLabel.text = view.export_status

    def onModelChanged(self, index):
        self.panel.choose_model(self._parameterNode, index)
        self.render()

    def onRefreshModels(self):
        self.panel.refresh_models(self._parameterNode)
        self.render()

    def onImportModel(self):
        folder = qt.QFileDialog.getExistingDirectory(
            self.parent, "Import a trained model folder (DeepSeg, nnU-Net v2 results, MONAI bundle)"
        )
        if not folder:
            return
        from DeepSegLib.panel_logic import fold_choices

        choices = fold_choices(folder)
        folds = None
        if choices:
            # a QInputDialog object, not getItem(): PythonQt's getItem cannot tell Cancel from OK
            dialog = qt.QInputDialog(self.parent)
            dialog.setWindowTitle("Import an nnU-Net model")
            dialog.setLabelText(f"This model was trained as {len(choices) - 1} folds. Which should DeepSeg run?")
            dialog.setComboBoxItems([choice.label for choice in choices])
            dialog.setComboBoxEditable(False)
            if not dialog.exec_():
                return
            folds = next(choice.folds for choice in choices if choice.label == dialog.textValue())
        try:
            with slicer.util.tryWithErrorDisplay("The model could not be imported.", waitCursor=True):
                offer = self.panel.install_offer()
                if offer is not None and not self.logic.installDependencies(offer):
                    return
                self.panel.start_import(folder, folds=folds)
                self._timer.start()
        finally:
            self.render()

    def onSegment(self):
        try:
            with slicer.util.tryWithErrorDisplay("DeepSeg could not start.", waitCursor=True):
                offer = self.panel.install_offer()
                if offer is not None and not self.logic.installDependencies(offer):
                    return
                self.panel.start_segment(self._parameterNode)
                self._timer.start()
        finally:
            self.render()

    def onPoll(self):
        try:
            with slicer.util.tryWithErrorDisplay("The result could not be put into the scene."):
                if not self.panel.poll(self._parameterNode):
                    self._timer.stop()
        finally:
            self.render()

    def onCancel(self):
        self.panel.cancel()
        self.render()

    def onUndo(self):
        self.panel.undo()
        self.render()

    def onNextUncertain(self):
        self.panel.next_uncertain()
        self.render()

    def onShowMeasurements(self):
        table = self.panel.measurement_table
        if table is None:
            return
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(table.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()

    def onEdit(self):
        p = self._parameterNode
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(p.outputSegmentation)
        editor.setSourceVolumeNode(p.inputVolume)

    def onExport(self):
        try:
            with slicer.util.tryWithErrorDisplay("Export failed; nothing was written.", waitCursor=True):
                self.panel.export(self._parameterNode)
        finally:
            self.render()

    def onLoadSample(self):
        with slicer.util.tryWithErrorDisplay("Failed to load the DeepSeg sample case.", waitCursor=True):
            volumeNode = self.logic.loadSampleVolume()
            self._parameterNode.inputVolume = volumeNode
            slicer.util.setSliceViewerLayers(background=volumeNode, fit=True)


class DeepSegLogic(ScriptedLoadableModuleLogic):
    """Facade for the panel, the Segment Editor effect and scripts: the Slicer-application parts
    (dialogs, pip inside Slicer) and scripting helpers; the rest is in DeepSegLib."""

    def getParameterNode(self):
        return DeepSegParameterNode(super().getParameterNode())

    def installDependencies(self, offer):
        """Ask, then install (PyTorch extension or pip, Slicer's packages pinned). True when done."""
        import importlib

        from DeepSegLib import dependencies

        if not slicer.util.confirmOkCancelDisplay(offer.message(), "DeepSeg: install Python packages"):
            return False
        try:
            import PyTorchUtils
        except ImportError:
            PyTorchUtils = None
        with slicer.util.WaitCursor():
            dependencies.run_install(offer, slicer.util.pip_install, PyTorchUtils)
        importlib.invalidate_caches()
        still = dependencies.missing_packages()
        if still:
            raise RuntimeError(f"These packages are still missing after the install: {', '.join(still)}.")
        return True

    def loadSampleVolume(self):
        from deepseg_core.demo import SAMPLE_VOLUME

        return slicer.util.loadVolume(str(SAMPLE_VOLUME))

    def segmentBlocking(self, volumeNode, model, outputSegmentation=None, **options):
        """Scripting: segment ``volumeNode`` and wait (Python console, self-tests)."""
        from DeepSegLib.mrml_bridge import volume_from_node
        from DeepSegLib.scene_logic import apply_segmentation_file
        from DeepSegLib.segment_job import SegmentRequest, start_segmentation

        output = outputSegmentation or slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
        job = start_segmentation([volume_from_node(volumeNode)], SegmentRequest(model=model, **options))
        try:
            if job.wait() != 0:
                raise RuntimeError(job.error)
            apply_segmentation_file(job.output, output, volumeNode, model)
        finally:
            job.cleanup()
        return output


class DeepSegTest(ScriptedLoadableModuleTest):
    """End to end in Slicer, through the real widgets (``ctest -R py_DeepSeg`` or
    ``Testing/Slicer/run_in_slicer.sh /path/to/Slicer``): sample, Segment, edit, export, train one
    short epoch, promote, roll back."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentEditExportTrainPromoteRollback()

    def waitFor(self, condition, timeout_s=600):
        import time

        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError("timed out")
            slicer.app.processEvents()
            time.sleep(0.05)

    def test_SegmentEditExportTrainPromoteRollback(self):
        import tempfile

        import numpy as np

        from deepseg_core.datasets import Dataset
        from deepseg_core.model_card import LabelSpec

        models = tempfile.mkdtemp(prefix="deepseg-selftest-models-")
        os.environ["DEEPSEG_MODELS"] = models
        slicer.util.selectModule("DeepSeg")
        widget = slicer.modules.deepseg.widgetRepresentation().self()
        self.delayDisplay("Segment the sample through the panel")
        widget.onLoadSample()
        widget.onRefreshModels()
        params = widget._parameterNode
        self.assertTrue(params.model, "the model shown must be saved in the parameter node")
        params.device = "cpu"
        widget.ui.segmentButton.click()
        self.waitFor(lambda: widget.panel.job is None and not widget._timer.isActive())
        self.assertIn("Segments written", widget.ui.statusLabel.text)
        segmentation = params.outputSegmentation.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        self.assertEqual(names[0], "liver")

        self.delayDisplay("Edit: erase the first lesion, then export the case")
        liverId = segmentation.GetSegmentIdBySegmentName("liver")
        mask = slicer.util.arrayFromSegmentBinaryLabelmap(params.outputSegmentation, liverId, params.inputVolume)
        mask[: mask.shape[0] // 2] = 0
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, params.outputSegmentation, liverId, params.inputVolume)
        dataset = os.path.join(tempfile.mkdtemp(prefix="deepseg-selftest-"), "site")
        labels = [LabelSpec(1, "liver", (0.8, 0.5, 0.4)), LabelSpec(2, "liver lesion", (0.5, 0.9, 0.5), thing=True)]
        Dataset.create(dataset, "site", labels, ("CT",))
        params.datasetFolder = pathlib.Path(dataset)
        for caseId in ("case1", "case2"):
            params.caseId = caseId
            widget.ui.exportButton.click()
            self.assertIn(f"Case {caseId} added", widget.ui.exportStatusLabel.text)
        self.assertEqual(len(Dataset.open(dataset).cases), 2)
        self.assertTrue(np.any(mask))

        self.delayDisplay("Train one short epoch in DeepSegTraining, promote, roll back")
        slicer.util.selectModule("DeepSegTraining")
        training = slicer.modules.deepsegtraining.widgetRepresentation().self()
        tparams = training._parameterNode
        tparams.datasetFolder = pathlib.Path(dataset)
        tparams.epochs = 1
        tparams.device = "cpu"
        training.onRefreshModels()
        training.ui.startButton.click()
        self.waitFor(lambda: training.panel.job is None and not training._timer.isActive())
        self.assertTrue(training.ui.promoteButton.enabled, training.ui.statusLabel.text)
        newRef = training.panel.done_event["model"]
        training.ui.promoteButton.click()
        self.assertIn(f"{newRef} is now active", training.ui.statusLabel.text)
        training.ui.rollbackButton.click()
        self.assertIn("active version is", training.ui.statusLabel.text)
        self.delayDisplay("Test passed")
