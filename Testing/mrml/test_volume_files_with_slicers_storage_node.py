"""Volume files between DeepSeg and Slicer's own reader and writer (``vtkMRMLVolumeArchetypeStorageNode`` of the
slicer-core wheel, what *Add data* and *Save* use): an oblique, anisotropic volume written by ``io.write_image``
loads in Slicer on the same IJK-to-RAS matrix with the same voxels, and a volume Slicer saves reads back in
DeepSeg the same way, in every format DeepSeg writes."""

from __future__ import annotations

import numpy as np
import pytest
import slicer
import vtk
from vtk.util import numpy_support

from deepseg_core import io
from DeepSegLib.mrml_bridge import node_from_volume

#: NIfTI stores the orientation as a float32 quaternion
MATRIX_TOLERANCE = {".nrrd": 1e-9, ".mha": 1e-9, ".nii.gz": 1e-6}


def oblique_volume() -> io.Volume:
    about_z, about_x = np.deg2rad(20.0), 0.3
    rotation_z = np.array([[np.cos(about_z), -np.sin(about_z), 0], [np.sin(about_z), np.cos(about_z), 0], [0, 0, 1]])
    rotation_x = np.array([[1, 0, 0], [0, np.cos(about_x), -np.sin(about_x)], [0, np.sin(about_x), np.cos(about_x)]])
    voxels = (np.random.default_rng(0).normal(size=(5, 6, 7)) * 100).astype(np.int16)
    return io.Volume(voxels, (0.7, 0.9, 2.5), (-12.5, 30.25, 101.0), rotation_z @ rotation_x)


def ijk_to_ras(node: slicer.vtkMRMLScalarVolumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)])


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_a_volume_deepseg_writes_loads_in_slicer_on_the_same_grid_and_back(mrml_scene, tmp_path, suffix):
    volume = oblique_volume()
    path = io.write_image(volume, tmp_path / f"written{suffix}")
    node = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = mrml_scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    np.testing.assert_allclose(ijk_to_ras(node), volume.ijk_to_ras(), rtol=0, atol=MATRIX_TOLERANCE[suffix])
    voxels = numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars()).reshape(volume.shape_zyx)
    np.testing.assert_array_equal(voxels, volume.array_zyx)

    saved = node_from_volume(mrml_scene, volume, "to save")
    writer = mrml_scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    writer.SetFileName(str(tmp_path / f"saved{suffix}"))
    assert writer.WriteData(saved) == 1
    back = io.read_image(tmp_path / f"saved{suffix}")
    np.testing.assert_allclose(back.ijk_to_ras(), volume.ijk_to_ras(), rtol=0, atol=MATRIX_TOLERANCE[suffix])
    np.testing.assert_array_equal(back.array_zyx, volume.array_zyx)
