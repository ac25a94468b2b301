"""DeepSegTraining: retrain DeepSeg models on corrected segmentations (3D Slicer module, thin shell)."""

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)


class DeepSegTraining(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "DeepSeg Training"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["DeepSeg"]
        self.parent.contributors = ["DeepSeg developers"]
        self.parent.helpText = "Fine-tune a DeepSeg model on a dataset of corrected segmentations."
        self.parent.acknowledgementText = "DeepSeg is an open-source 3D Slicer extension."


class DeepSegTrainingWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepSegTraining.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        self.logic = DeepSegTrainingLogic()
        self.ui.datasetPathLineEdit.connect("currentPathChanged(QString)", self.onDatasetChanged)

    def onDatasetChanged(self, path):
        self.ui.datasetInfoLabel.text = self.logic.describeDataset(path)


class DeepSegTrainingLogic(ScriptedLoadableModuleLogic):
    def describeDataset(self, path):
        """One line about an nnU-Net-layout dataset folder: how many training cases it holds."""
        from DeepSegTrainingLib.dataset_summary import describe_dataset_folder

        return describe_dataset_folder(path)


class DeepSegTrainingTest(ScriptedLoadableModuleTest):
    def runTest(self):
        self.test_DescribeMissingFolder()

    def test_DescribeMissingFolder(self):
        self.assertIn("not found", DeepSegTrainingLogic().describeDataset("/nonexistent/dataset"))
