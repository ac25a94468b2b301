"""DeepSegTraining: retrain DeepSeg models on corrected segmentations (3D Slicer module, thin shell).

Every decision lives in ``DeepSegTrainingLib.training_panel_logic.TrainingPanelLogic`` (Qt-free,
tested on real MRML scenes); this file binds widgets to it. Training runs as a ``deepseg train``
process tree, so the GUI never freezes; its events fill a table and plot (live loss and Dice) and,
at the end, an old-vs-new comparison with Promote / Keep old / Roll back.

This file is parsed by Python 3.9 too (Slicer 5.8), so that an unsupported Slicer shows one clear
message: keep its syntax 3.9-compatible.
"""

import pathlib
import sys
from typing import Annotated

import qt
import slicer
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def unsupportedReason():
    """None in a supported Slicer, else the one message shown instead of the panel."""
    from DeepSegLib.compatibility import unsupported_reason

    return unsupported_reason(sys.version_info[:2], (slicer.app.majorVersion, slicer.app.minorVersion))


class DeepSegTraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "DeepSeg Training"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["DeepSeg"]
        self.parent.contributors = ["DeepSeg developers"]
        self.parent.helpText = "Fine-tune a DeepSeg model on a dataset of corrected segmentations."
        self.parent.acknowledgementText = "DeepSeg is an open-source 3D Slicer extension."


@parameterNodeWrapper
class DeepSegTrainingParameterNode:
    """The panel's settings; saved with the scene (same fields as ``training_panel_logic.TrainingSettings``)."""

    datasetFolder: pathlib.Path = pathlib.Path()
    baseModel: str = ""
    modelName: str = ""
    architecture: Annotated[str, Choice(["3d", "2.5d", "2d"])] = "3d"
    loss: Annotated[str, Choice(["dice_ce", "dice_focal", "dice", "ce", "focal", "tversky", "dice_boundary"])] = "dice_ce"
    epochs: Annotated[int, WithinRange(1, 1000)] = 12
    stepsPerEpoch: Annotated[int, WithinRange(1, 10000)] = 20
    frozenEncoderEpochs: Annotated[int, WithinRange(0, 100)] = 0
    labelMapping: str = ""
    resume: bool = False
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    setDropout: bool = False
    dropout: Annotated[float, WithinRange(0.0, 0.9)] = 0.1


class DeepSegTrainingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.panel = None
        self._parameterNode = None
        self._guiConnections = None
        self._timer = qt.QTimer()
        self._timer.setInterval(500)
        self._timer.connect("timeout()", self.onPoll)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        reason = unsupportedReason()
        if reason:
            label = qt.QLabel(reason)
            label.wordWrap = True
            self.layout.addWidget(label)
            return
        from DeepSegTrainingLib.training_panel_logic import TrainingPanelLogic

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepSegTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DeepSegTrainingLogic()
        self.panel = TrainingPanelLogic(slicer.mrmlScene)
        self.ui.datasetPathLineEdit.connect("currentPathChanged(QString)", self.onDatasetChanged)
        self.ui.baseModelComboBox.connect("currentIndexChanged(int)", self.onBaseChanged)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.onRefreshModels)
        self.ui.startButton.connect("clicked(bool)", self.onStart)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.promoteButton.connect("clicked(bool)", self.onPromote)
        self.ui.keepOldButton.connect("clicked(bool)", self.onKeepOld)
        self.ui.rollbackButton.connect("clicked(bool)", self.onRollback)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
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
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()
            self.render()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        self.panel.refresh_models(self._parameterNode)
        self.panel.dataset_changed(self._parameterNode)

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
        combo = self.ui.baseModelComboBox
        wasBlocked = combo.blockSignals(True)
        if [combo.itemData(i) for i in range(combo.count)] != [ref for _, ref in view.base_models]:
            combo.clear()
            for label, ref in view.base_models:
                combo.addItem(label, ref)
        combo.currentIndex = view.base_index
        combo.blockSignals(wasBlocked)
        self.ui.datasetInfoLabel.text = view.dataset_info
        self.ui.startButton.enabled = view.start_enabled
        self.ui.stopButton.enabled = view.stop_enabled
        self.ui.promoteButton.enabled = view.promote_enabled
        self.ui.keepOldButton.enabled = view.keep_old_enabled
        self.ui.rollbackButton.enabled = view.rollback_enabled
        self.ui.progressBar.value = view.progress_percent
        self.ui.statusLabel.text = view.status
        if view.comparison_table is not None:
            self.ui.comparisonTableView.setMRMLTableNode(view.comparison_table)

    def onDatasetChanged(self, path):
        self.panel.dataset_changed(self._parameterNode)
        self.render()

    def onBaseChanged(self, index):
        self.panel.choose_base(self._parameterNode, index)
        self.render()

    def onRefreshModels(self):
        self.panel.refresh_models(self._parameterNode)
        self.render()

    def onStart(self):
        try:
            with slicer.util.tryWithErrorDisplay("Training could not start.", waitCursor=True):
                offer = self.panel.install_offer()
                if offer is not None:
                    from DeepSeg import DeepSegLogic

                    if not DeepSegLogic().installDependencies(offer):
                        return
                self.panel.start(self._parameterNode)
                slicer.modules.plots.logic().ShowChartInLayout(self.panel.view.chart)
                self._timer.start()
        finally:
            self.render()

    def onPoll(self):
        try:
            with slicer.util.tryWithErrorDisplay("Training events could not be shown."):
                if not self.panel.poll(self._parameterNode):
                    self._timer.stop()
        finally:
            self.render()

    def onStop(self):
        self.panel.stop()
        self.render()

    def onPromote(self):
        with slicer.util.tryWithErrorDisplay("Promote failed; the active version is unchanged."):
            self.panel.promote(self._parameterNode)
        self.render()

    def onKeepOld(self):
        self.panel.keep_old()
        self.render()

    def onRollback(self):
        with slicer.util.tryWithErrorDisplay("Roll back failed; the active version is unchanged."):
            self.panel.rollback(self._parameterNode)
        self.render()


class DeepSegTrainingLogic(ScriptedLoadableModuleLogic):
    def getParameterNode(self):
        return DeepSegTrainingParameterNode(super().getParameterNode())

    def describeDataset(self, path):
        """One line about a dataset folder: cases, split, labels, channels (or what is wrong)."""
        from DeepSegTrainingLib.dataset_summary import describe_dataset_folder

        return describe_dataset_folder(path)


class DeepSegTrainingTest(ScriptedLoadableModuleTest):
    """In Slicer (``ctest -R py_DeepSegTraining``); the end-to-end run is DeepSeg's self-test."""

    def runTest(self):
        self.test_DescribeMissingFolder()
        self.test_PanelOpensWithModels()

    def test_DescribeMissingFolder(self):
        self.assertIn("not found", DeepSegTrainingLogic().describeDataset("/nonexistent/dataset"))

    def test_PanelOpensWithModels(self):
        slicer.util.selectModule("DeepSegTraining")
        widget = slicer.modules.deepsegtraining.widgetRepresentation().self()
        self.assertGreater(widget.ui.baseModelComboBox.count, 1)
        self.assertTrue(widget._parameterNode.baseModel)
