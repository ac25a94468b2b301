"""A real MRML scene from the ``slicer-core`` wheel, brought up once per test process.

What Slicer's application does at start-up, minus Qt: a scene, a ``vtkSlicerApplicationLogic`` with
a colour logic, and the module logics DeepSeg touches (the Segmentations logic registers the
labelmap/closed-surface converter rules). The scene is cleared between tests.
"""

from __future__ import annotations

import pytest
import slicer


class _SlicerCore:
    def __init__(self) -> None:
        self.scene = slicer.vtkMRMLScene()
        self.app_logic = slicer.vtkSlicerApplicationLogic()
        self.app_logic.SetMRMLScene(self.scene)
        color_logic = slicer.vtkMRMLColorLogic()
        color_logic.SetMRMLScene(self.scene)
        self.app_logic.SetColorLogic(color_logic)
        self.logics = {}
        for name, cls in (
            ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
            ("Volumes", slicer.vtkSlicerVolumesLogic),
            ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
            ("Tables", slicer.vtkSlicerTablesLogic),
        ):
            logic = cls()
            logic.SetMRMLApplicationLogic(self.app_logic)
            logic.SetMRMLScene(self.scene)
            self.app_logic.SetModuleLogic(name, logic)
            self.logics[name] = logic


_CORE: _SlicerCore | None = None


@pytest.fixture()
def mrml_scene():
    """The process's MRML scene, empty."""
    global _CORE
    if _CORE is None:
        _CORE = _SlicerCore()
    _CORE.scene.Clear(0)
    yield _CORE.scene
    _CORE.scene.Clear(0)
