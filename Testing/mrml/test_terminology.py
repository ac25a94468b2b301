"""Terminology for imported models' labels, matched by name through Slicer's own terminology logic.

The ``slicer-core`` wheel has Slicer's ``vtkSlicerTerminologiesModuleLogic`` but not Slicer's tables;
``data/test-anatomy.term.json`` is a small table in the same format (dcmqi segment-context schema),
written for this test with SNOMED CT codes. In Slicer the loaded General Anatomy and DICOM tables
are used the same way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import slicer
import vtk

from deepseg_core import io
from DeepSegLib.mrml_bridge import SegmentSpec, write_result_segments
from DeepSegLib.terminology import GENERIC_ENTRY, TerminologyIndex, name_variants

TABLE = Path(__file__).with_name("data") / "test-anatomy.term.json"


@pytest.fixture(scope="module")
def index() -> TerminologyIndex:
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    assert logic.LoadTerminologyFromFile(str(TABLE)) == "DeepSeg test anatomy"
    return TerminologyIndex.build(logic)


def test_totalsegmentator_style_names_are_normalised():
    assert name_variants("kidney_left") == ["kidney left", "left kidney"]
    assert name_variants("vertebrae_L1") == ["vertebrae l1", "l1 vertebra"]
    assert name_variants("liver lesion 3")[-1] == "liver lesion"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("liver", "SCT^10200004^Liver~^^"),
        ("Spleen", "SCT^78961009^Spleen~^^"),
        ("kidney_left", "SCT^64033007^Kidney~SCT^7771000^Left"),
        ("Right kidney", "SCT^64033007^Kidney~SCT^24028007^Right"),
        ("vertebrae_L1", "SCT^66794005^First lumbar vertebra~^^"),
    ],
)
def test_names_match_the_loaded_terminology(index, name, expected):
    entry = index.entry_for(name)
    assert entry is not None and entry.startswith("DeepSeg test anatomy~SCT^123037004^Anatomical Structure~")
    assert expected in entry


def test_an_unknown_name_gets_the_generic_tissue_entry(index):
    assert index.entry_for("gross tumour volume") is None
    assert index.entry_or_default("gross tumour volume") == GENERIC_ENTRY


def test_result_segments_without_codes_get_the_matched_entry_and_coded_ones_keep_theirs(mrml_scene, index):
    grid = io.Volume(np.zeros((4, 5, 6), np.int16), (1.0, 1.0, 2.0))
    mask = np.zeros(grid.shape_zyx, bool)
    mask[1:3, 1:3, 1:3] = True
    own = "DeepSeg test anatomy~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~~^^~^^"
    segments = [
        (SegmentSpec("kidney_left", (1, 0, 0)), mask),
        (SegmentSpec("liver", (0, 1, 0), terminology=own), mask),
        (SegmentSpec("mystery", (0, 0, 1)), mask),
    ]
    node = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    ids = write_result_segments(node, segments, grid, "imported:1", terminology=index)
    tags = []
    for segment_id in ids:
        value = vtk.mutable("")
        node.GetSegmentation().GetSegment(segment_id).GetTag("TerminologyEntry", value)
        tags.append(str(value))
    assert "SCT^7771000^Left" in tags[0] and tags[1] == own and tags[2] == GENERIC_ENTRY
