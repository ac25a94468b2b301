"""DeepSeg: deep-learning segmentation of CT and MR volumes (3D Slicer module, thin shell).

Module metadata, the panel (Widget -> Logic), the Logic facade over ``deepseg_core`` and the
in-Slicer self-test. The maths lives in ``deepseg_core``; Slicer glue in ``DeepSegLib``.
"""

import logging
import os
import pathlib
import tempfile

import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


class DeepSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "DeepSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["DeepSeg developers"]
        self.parent.helpText = (
            "Segment CT and MR volumes with trained U-Nets, correct the result in the Segment Editor, "
            "and export corrections for retraining in DeepSegTraining."
        )
        self.parent.acknowledgementText = "DeepSeg is an open-source 3D Slicer extension."


class DeepSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DeepSegLogic()
        self.ui.engineVersionLabel.text = self.logic.engineVersion()
        self.ui.loadSampleButton.connect("clicked(bool)", self.onLoadSample)

    def onLoadSample(self):
        with slicer.util.tryWithErrorDisplay("Failed to load the DeepSeg sample case.", waitCursor=True):
            volumeNode, segmentationNode = self.logic.loadSampleCase()
            self.ui.statusLabel.text = (
                f"Loaded {volumeNode.GetName()} with {segmentationNode.GetSegmentation().GetNumberOfSegments()} segments."
            )


class DeepSegLogic(ScriptedLoadableModuleLogic):
    """Facade the panel, the Segment Editor effect and scripts call; delegates to deepseg_core."""

    def engineVersion(self):
        import deepseg_core

        return f"deepseg_core {deepseg_core.__version__}"

    def loadSampleCase(self, folder=None):
        """Write the bundled sample case with its reference segmentation and load both into the scene."""
        from deepseg_core.demo import SAMPLE_VOLUME, run_demo

        folder = folder or os.path.join(tempfile.gettempdir(), "DeepSegSample")
        summary = run_demo(pathlib.Path(folder))
        logging.info("DeepSeg sample written to %s", folder)
        volumeNode = slicer.util.loadVolume(str(SAMPLE_VOLUME))
        segmentationNode = slicer.util.loadSegmentation(str(summary.files["segmentation"]))
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        return volumeNode, segmentationNode


class DeepSegTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_LoadSampleCase()

    def test_LoadSampleCase(self):
        self.delayDisplay("Loading the DeepSeg sample case")
        volumeNode, segmentationNode = DeepSegLogic().loadSampleCase()
        segmentation = segmentationNode.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        self.assertEqual(names, ["liver", "liver lesion"])
        self.assertEqual(volumeNode.GetImageData().GetDimensions(), (112, 112, 48))
        self.delayDisplay("Test passed")
