"""DeepSeg: deep-learning segmentation of CT and MR volumes (3D Slicer module, thin shell).

The panel keeps its state in a typed parameter node and delegates everything to ``DeepSegLib``
(scene glue, no Qt) and ``deepseg_core`` (the engine, run as a ``deepseg`` subprocess so the GUI
never blocks). The module also registers the **DeepSeg** Segment Editor effect.
"""

import logging
import os
import pathlib

import qt
import slicer
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

EFFECT_SOURCE = os.path.join(os.path.dirname(__file__), "DeepSegLib", "SegmentEditorEffect.py")


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
        slicer.app.connect("startupCompleted()", registerSegmentEditorEffect)


def registerSegmentEditorEffect():
    """Register the DeepSeg scripted effect with the Segment Editor."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    effect = effects.qSlicerSegmentEditorScriptedEffect(None)
    effect.setPythonSource(EFFECT_SOURCE.replace("\\", "/"))
    effect.self().register()


@parameterNodeWrapper
class DeepSegParameterNode:
    """Everything the panel shows; saved with the scene."""

    inputVolume: slicer.vtkMRMLScalarVolumeNode
    additionalVolume: slicer.vtkMRMLScalarVolumeNode
    outputSegmentation: slicer.vtkMRMLSegmentationNode
    model: str = ""
    device: str = "auto"
    overlap: float = 0.5
    tta: bool = False
    instances: bool = True
    uncertainty: bool = False
    measurements: bool = True
    datasetFolder: pathlib.Path = pathlib.Path()
    caseId: str = ""
    overwriteCase: bool = False


class DeepSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._job = None
        self._snapshot = None
        self._review = None
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.connect("timeout()", self.onPoll)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DeepSegLogic()
        self.ui.engineVersionLabel.text = self.logic.engineVersion()
        self.ui.deviceInfoLabel.text = self.logic.deviceInfo()
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshModels)
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
        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self):
        self.onCancel()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def onSceneStartClose(self, caller, event):
        self.onCancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(DeepSegParameterNode(self.logic.getParameterNode()))
        if not self._parameterNode.inputVolume:
            self._parameterNode.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def setParameterNode(self, parameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._guiConnections)
        self._parameterNode = parameterNode
        if self._parameterNode:
            self._guiConnections = self._parameterNode.connectGui(self.ui)
            index = self.ui.modelComboBox.findData(self._parameterNode.model)
            if index >= 0:
                self.ui.modelComboBox.currentIndex = index

    def refreshModels(self):
        from DeepSegLib.panel_support import available_models

        self._entries = {entry.ref: entry for entry in available_models()}
        self.ui.modelComboBox.clear()
        for entry in self._entries.values():
            self.ui.modelComboBox.addItem(entry.label, entry.ref)
            self.ui.modelComboBox.setItemData(self.ui.modelComboBox.count - 1, entry.description, qt.Qt.ToolTipRole)

    def onModelChanged(self, index):
        ref = self.ui.modelComboBox.itemData(index)
        entry = self._entries.get(ref) if ref else None
        self.ui.modelDescriptionLabel.text = entry.description if entry else ""
        multi = entry is not None and len(entry.channels) > 1
        self.ui.additionalVolumeSelector.visible = multi
        self.ui.additionalVolumeLabel.visible = multi
        if self._parameterNode and ref:
            self._parameterNode.model = ref

    def onSegment(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("DeepSeg could not start.", waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            if not p.outputSegmentation:
                p.outputSegmentation = slicer.mrmlScene.AddNewNodeByClass(
                    "vtkMRMLSegmentationNode", f"{p.inputVolume.GetName()} DeepSeg"
                )
                p.outputSegmentation.CreateDefaultDisplayNodes()
            extra = [p.additionalVolume] if self.ui.additionalVolumeSelector.visible and p.additionalVolume else []
            self._job = self.logic.startSegmentation(p, extra)
            self.ui.segmentButton.enabled = False
            self.ui.cancelButton.enabled = True
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Starting..."
            self.ui.domainCheckLabel.text = ""
            self._timer.start()

    def onPoll(self):
        from DeepSegLib.panel_support import progress_text
        from DeepSegLib.result_review import domain_check_text

        if self._job is None:
            self._timer.stop()
            return
        for event in self._job.poll():
            if event.get("event") == "domain_check":
                verdict, text = domain_check_text(event)
                colour = {"ok": "green", "caution": "darkorange", "out_of_distribution": "red"}.get(verdict, "black")
                self.ui.domainCheckLabel.text = text
                self.ui.domainCheckLabel.setStyleSheet(f"color: {colour}")
            percent, text = progress_text(event)
            if percent is not None:
                self.ui.progressBar.value = percent
            if text:
                self.ui.statusLabel.text = text
        if not self._job.finished:
            return
        self._timer.stop()
        job, self._job = self._job, None
        job.wait(5)
        self.ui.segmentButton.enabled = True
        self.ui.cancelButton.enabled = False
        try:
            if job.returncode == 0:
                p = self._parameterNode
                self._snapshot = self.logic.applyResult(job, p)
                self.ui.undoButton.enabled = True
                self.ui.statusLabel.text += f" Segments written to {p.outputSegmentation.GetName()}."
                with slicer.util.tryWithErrorDisplay("The uncertainty map or the measurements could not be shown."):
                    self._review = self.logic.loadReview(job, p, self._review)
                navigator = self._review.navigator if self._review else None
                self.ui.nextUncertainButton.enabled = navigator is not None and len(navigator) > 0
                self.ui.showMeasurementsButton.enabled = self._review is not None and self._review.table_node is not None
                self.ui.uncertainRegionLabel.text = f"{len(navigator)} uncertain region(s)." if navigator is not None else ""
            elif job.returncode == 130:
                self.ui.statusLabel.text = "Cancelled; the scene is unchanged."
            else:
                self.ui.statusLabel.text = f"Failed: {job.error}"
        finally:
            job.cleanup()

    def onNextUncertain(self):
        if self._review is None or self._review.navigator is None:
            return
        region = self._review.navigator.next_region(slicer.mrmlScene)
        self.ui.uncertainRegionLabel.text = self._review.navigator.status(region)

    def onShowMeasurements(self):
        if self._review is None or self._review.table_node is None:
            return
        layout_manager = slicer.app.layoutManager()
        layout_manager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        slicer.app.applicationLogic().GetSelectionNode().SetActiveTableID(self._review.table_node.GetID())
        slicer.app.applicationLogic().PropagateTableSelection()

    def onCancel(self):
        if self._job is not None:
            self._job.cancel()

    def onUndo(self):
        from DeepSegLib.result_review import remove_review

        if self._snapshot is not None:
            self._snapshot.restore()
            self._snapshot = None
            remove_review(slicer.mrmlScene, self._review)
            self._review = None
            self.ui.nextUncertainButton.enabled = False
            self.ui.showMeasurementsButton.enabled = False
            self.ui.uncertainRegionLabel.text = ""
            self.ui.undoButton.enabled = False
            self.ui.statusLabel.text = "Last Segment undone."

    def onEdit(self):
        p = self._parameterNode
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(p.outputSegmentation)
        editor.setSourceVolumeNode(p.inputVolume)

    def onExport(self):
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Export failed; nothing was written.", waitCursor=True):
            record = self.logic.exportCorrected(p)
            effort = record.provenance
            changed = f"{effort.changed_voxels} voxels changed" if effort.changed_voxels is not None else "no prediction"
            self.ui.exportStatusLabel.text = f"Case {record.case_id} added to {record.split} ({changed})."

    def onLoadSample(self):
        with slicer.util.tryWithErrorDisplay("Failed to load the DeepSeg sample case.", waitCursor=True):
            volumeNode = self.logic.loadSampleVolume()
            self._parameterNode.inputVolume = volumeNode
            slicer.util.setSliceViewerLayers(background=volumeNode)


class DeepSegLogic(ScriptedLoadableModuleLogic):
    """Facade of the panel, the Segment Editor effect and scripts; delegates to DeepSegLib."""

    def getParameterNode(self):
        return ScriptedLoadableModuleLogic.getParameterNode(self)

    def engineVersion(self):
        import deepseg_core

        return f"deepseg_core {deepseg_core.__version__}"

    def deviceInfo(self):
        try:
            import torch
        except ImportError:
            return "PyTorch is not installed yet; it is offered on the first Segment."
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            return f"CUDA: {torch.cuda.get_device_name(0)}, {free / 2**30:.1f} of {total / 2**30:.1f} GB free"
        return "No CUDA GPU: segmentation runs on the CPU."

    def ensureDependencies(self):
        """Offer to install missing packages (never silently). True when everything is importable."""
        from DeepSegLib.panel_support import install_plan, missing_packages, nvidia_cuda_version

        missing = missing_packages()
        if not missing:
            return True
        plans = install_plan(missing, nvidia_cuda_version())
        commands = "\n".join("pip install " + " ".join(args) for args in plans)
        if not slicer.util.confirmOkCancelDisplay(
            f"DeepSeg needs Python packages that are not installed in Slicer: {', '.join(missing)}.\n\n"
            f"Install them now? This runs:\n{commands}\n\nIt can take several minutes and downloads up to a few GB.",
            "DeepSeg: install dependencies",
        ):
            return False
        for args in plans:
            logging.info("DeepSeg: pip install %s", " ".join(args))
            slicer.util.pip_install(args)
        return not missing_packages()

    def startSegmentation(self, p, additionalVolumeNodes=()):
        from DeepSegLib.mrml_bridge import volume_from_node
        from DeepSegLib.segment_job import SegmentRequest, start_segmentation

        if not p.model:
            raise ValueError("Choose a model first.")
        channels = [volume_from_node(p.inputVolume)] + [volume_from_node(n) for n in additionalVolumeNodes]
        request = SegmentRequest(
            model=p.model,
            device=p.device,
            overlap=p.overlap,
            tta=p.tta,
            instances=p.instances,
            uncertainty=p.uncertainty,
            measurements=p.measurements,
        )
        return start_segmentation(channels, request)

    def applyResult(self, job, p):
        from DeepSegLib.scene_logic import apply_segmentation_file

        model = next((e.get("model") for e in job.events if e.get("event") == "start"), p.model)
        _, snapshot = apply_segmentation_file(job.output, p.outputSegmentation, p.inputVolume, model)
        return snapshot

    def loadReview(self, job, p, previous=None):
        from DeepSegLib.result_review import load_review

        return load_review(slicer.mrmlScene, job.workdir, p.inputVolume, previous)

    def exportCorrected(self, p):
        from DeepSegLib.scene_logic import export_corrected_case

        if not p.caseId:
            raise ValueError("Enter a case id for the exported case.")
        extra = [p.additionalVolume] if p.additionalVolume else []
        return export_corrected_case(
            str(p.datasetFolder),
            p.caseId,
            p.inputVolume,
            p.outputSegmentation,
            overwrite=p.overwriteCase,
            additional_volume_nodes=extra,
        )

    def loadSampleVolume(self):
        from deepseg_core.demo import SAMPLE_VOLUME

        return slicer.util.loadVolume(str(SAMPLE_VOLUME))

    def segmentBlocking(self, volumeNode, model, outputSegmentation=None, **options):
        """Scripting: segment ``volumeNode`` and wait (for the self-test and the Python console)."""
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
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentSample()

    def test_SegmentSample(self):
        from deepseg_core.demo import DEFAULT_MODEL

        self.delayDisplay("Segmenting the DeepSeg sample with the bundled model")
        logic = DeepSegLogic()
        volumeNode = logic.loadSampleVolume()
        segmentationNode = logic.segmentBlocking(volumeNode, str(DEFAULT_MODEL), device="cpu")
        segmentation = segmentationNode.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        self.assertEqual(names, ["liver", "liver lesion"])
        self.assertEqual(volumeNode.GetImageData().GetDimensions(), (112, 112, 48))
