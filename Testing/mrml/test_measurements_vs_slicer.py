"""DeepSeg's intensity statistics against the VTK filter Slicer's Segment Statistics uses for them
(``ScalarVolumeSegmentStatisticsPlugin``: ``vtkImageAccumulate`` on the segment's voxels), from the
slicer-core wheel."""

from __future__ import annotations

import numpy as np
import pytest
import vtk
from vtk.util import numpy_support

from deepseg_core import measurements


@pytest.mark.parametrize("count", [2, 8, 57, 5000])
def test_mean_standard_deviation_minimum_and_maximum_are_vtk_image_accumulates(count):
    values = np.random.default_rng(count).normal(40.0, 25.0, count).round().astype(np.int16)  # HU-like integers
    image = vtk.vtkImageData()
    image.SetDimensions(count, 1, 1)
    image.GetPointData().SetScalars(numpy_support.numpy_to_vtk(values.astype(np.float64)))
    accumulate = vtk.vtkImageAccumulate()
    accumulate.SetInputData(image)
    accumulate.IgnoreZeroOff()
    accumulate.Update()
    ours = measurements.intensity_statistics(values)
    assert accumulate.GetVoxelCount() == count
    assert ours["intensity_mean"] == pytest.approx(accumulate.GetMean()[0], rel=1e-12, abs=1e-9)
    assert ours["intensity_std"] == pytest.approx(accumulate.GetStandardDeviation()[0], rel=1e-12)
    assert ours["intensity_min"] == accumulate.GetMin()[0] and ours["intensity_max"] == accumulate.GetMax()[0]
