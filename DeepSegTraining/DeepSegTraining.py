"""DeepSegTraining: retrain DeepSeg models on corrected segmentations (3D Slicer module, thin shell).

Training runs as a ``deepseg train --json`` subprocess (the GUI never freezes); its events fill a
table + plot (live loss and Dice) and, at the end, an old-vs-new comparison with Promote / Keep old.
The logic lives in ``DeepSegTrainingLib.training_run`` and is tested on real MRML.
"""

import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

SCRATCH = "(from scratch)"


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
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DeepSegTrainingLogic()
        self._job = None
        self._curves = None
        self._done = None
        self._timer = qt.QTimer()
        self._timer.setInterval(500)
        self._timer.connect("timeout()", self.onPoll)
        self.ui.datasetPathLineEdit.connect("currentPathChanged(QString)", self.onDatasetChanged)
        self.ui.startButton.connect("clicked(bool)", self.onStart)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.promoteButton.connect("clicked(bool)", self.onPromote)
        self.ui.keepOldButton.connect("clicked(bool)", self.onKeepOld)
        self.ui.baseModelComboBox.addItem(SCRATCH, "")
        from DeepSegLib.panel_support import available_models

        for entry in available_models():
            self.ui.baseModelComboBox.addItem(entry.label, entry.ref)

    def cleanup(self):
        self.onStop()

    def onDatasetChanged(self, path):
        self.ui.datasetInfoLabel.text = self.logic.describeDataset(path)

    def onStart(self):
        from deepseg_core.datasets import Dataset
        from DeepSegTrainingLib.training_run import (
            TrainingCurves,
            TrainingRequest,
            parse_label_mapping_text,
            start_training,
        )

        with slicer.util.tryWithErrorDisplay("Training could not start.", waitCursor=True):
            dataset = Dataset.open(self.ui.datasetPathLineEdit.currentPath)
            base = self.ui.baseModelComboBox.currentData or None
            name = self.ui.nameLineEdit.text.strip() or (base.split(":")[0].split("/")[-1] if base else "")
            if not name:
                raise ValueError("Enter a name for the new model.")
            request = TrainingRequest(
                dataset=str(dataset.root),
                name=name,
                base=base,
                epochs=self.ui.epochsSpinBox.value,
                loss=self.ui.lossComboBox.currentText,
                arch=self.ui.archComboBox.currentText,
                freeze_encoder_epochs=self.ui.freezeSpinBox.value,
                label_mapping=parse_label_mapping_text(self.ui.labelMappingLineEdit.text),
                resume=self.ui.resumeCheckBox.checked,
            )
            self._curves = TrainingCurves(slicer.mrmlScene, [label.name for label in dataset.labels])
            slicer.modules.plots.logic().ShowChartInLayout(self._curves.chart)
            self._job = start_training(request)
            self._epochs = request.epochs
            self.ui.startButton.enabled = False
            self.ui.stopButton.enabled = True
            self.ui.promoteButton.enabled = self.ui.keepOldButton.enabled = False
            self.ui.statusLabel.text = "Starting..."
            self._timer.start()

    def onPoll(self):
        from DeepSegTrainingLib.training_run import comparison_table, status_text

        for event in self._job.poll():
            self._curves.add_event(event)
            if event.get("event") == "epoch_end":
                self.ui.progressBar.value = round(100 * event["epoch"] / self._epochs)
            if event.get("event") == "done":
                self._done = event
                self.ui.comparisonTableView.setMRMLTableNode(comparison_table(slicer.mrmlScene, event))
                self.ui.promoteButton.enabled = self.ui.keepOldButton.enabled = True
            text = status_text(event)
            if text:
                self.ui.statusLabel.text = text
        if not self._job.finished:
            return
        self._timer.stop()
        job, self._job = self._job, None
        job.wait(10)
        job.cleanup()
        self.ui.startButton.enabled = True
        self.ui.stopButton.enabled = False
        if job.returncode == 130:
            self.ui.statusLabel.text = "Stopped; the last finished epoch is checkpointed. Tick Resume and Start to continue."
            self.ui.resumeCheckBox.checked = True
        elif job.returncode != 0:
            self.ui.statusLabel.text = f"Failed: {job.error}"

    def onStop(self):
        if self._job is not None:
            self._job.cancel()

    def onPromote(self):
        from DeepSegTrainingLib.training_run import promote

        previous = promote(self._done["model"])
        self.ui.statusLabel.text = f"{self._done['model']} is now active (was {previous}; deepseg models rollback undoes it)."
        self.ui.promoteButton.enabled = self.ui.keepOldButton.enabled = False

    def onKeepOld(self):
        self.ui.statusLabel.text = f"Kept the active version; {self._done['model']} stays in the store, not active."
        self.ui.promoteButton.enabled = self.ui.keepOldButton.enabled = False


class DeepSegTrainingLogic(ScriptedLoadableModuleLogic):
    def describeDataset(self, path):
        """One line about a dataset folder: cases, split, labels, channels (or what is wrong)."""
        from DeepSegTrainingLib.dataset_summary import describe_dataset_folder

        return describe_dataset_folder(path)


class DeepSegTrainingTest(ScriptedLoadableModuleTest):
    def runTest(self):
        self.test_DescribeMissingFolder()

    def test_DescribeMissingFolder(self):
        self.assertIn("not found", DeepSegTrainingLogic().describeDataset("/nonexistent/dataset"))
