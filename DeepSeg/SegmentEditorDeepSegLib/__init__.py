"""The DeepSeg Segment Editor effect, in its own folder as Slicer's effect template has it.

Slicer loads ``SegmentEditorEffect.py`` as a module named after this folder and puts it into
``sys.modules`` (``qSlicerSegmentEditorScriptedEffect::setPythonSource``, Slicer 5.10), which
replaces this package there; nothing else of DeepSeg may live in this folder for that reason.
"""

from SegmentEditorEffects.AbstractScriptedSegmentEditorEffect import *  # noqa: F403

from .SegmentEditorEffect import *  # noqa: F403
