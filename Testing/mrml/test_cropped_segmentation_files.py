"""Segmentations Slicer saved cropped to their segments' extent ("Crop to minimum extent" in Slicer's
Save dialog) go into a dataset and into ``deepseg compare`` on the image's grid.

The files are written by ``vtkMRMLSegmentationStorageNode`` from the ``slicer-core`` wheel, as Slicer
writes them; ``deepseg`` runs as the engine subprocess it is in Slicer.
"""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import slicer

from deepseg_core import io
from deepseg_core.demo import DEFAULT_MODEL, SAMPLE_TRUTH, SAMPLE_VOLUME
from DeepSegLib.mrml_bridge import specs_from_segmentation, write_result_segments


def oblique_sample() -> io.Volume:
    """The bundled CT sample placed obliquely (non-zero origin, rotated direction): the crop's voxel offset
    must be found through the rotation."""
    sample = io.read_image(SAMPLE_VOLUME)
    a = np.deg2rad(15.0)
    direction = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    return io.Volume(sample.array_zyx, sample.spacing_xyz_mm, (-80.0, 40.5, -300.0), direction)


def save_with_slicer(scene, grid: io.Volume, path, crop: bool, masks: dict[str, np.ndarray] | None = None) -> None:
    """The sample's truth (or, by name, other masks of its segments) saved by Slicer's storage node."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    specs = specs_from_segmentation(io.read_segmentation(SAMPLE_TRUTH))
    if masks is not None:
        specs = [(spec, masks[spec.name]) for spec, _ in specs if spec.name in masks]
    write_result_segments(node, specs, grid, "truth")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    storage.SetCropToMinimumExtent(crop)
    assert storage.WriteData(node) == 1


def deepseg(engine_python: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([engine_python, "-m", "deepseg_core", *args], capture_output=True, text=True, timeout=300)


def test_a_segmentation_saved_cropped_to_its_extent_is_placed_on_the_image_grid(mrml_scene, tmp_path, engine_python):
    grid = oblique_sample()
    image = io.write_image(grid, tmp_path / "image.nrrd")
    full, cropped = tmp_path / "full.seg.nrrd", tmp_path / "cropped.seg.nrrd"
    save_with_slicer(mrml_scene, grid, full, crop=False)
    save_with_slicer(mrml_scene, grid, cropped, crop=True)
    box = io.read_segmentation(cropped).grid
    assert box.shape_zyx != grid.shape_zyx and all(b <= g for b, g in zip(box.shape_zyx, grid.shape_zyx, strict=True))
    assert not np.allclose(box.origin_lps, grid.origin_lps)  # a real crop: the origin moved with it

    root = tmp_path / "dataset"
    assert deepseg(engine_python, "dataset", "create", str(root), "--labels-from", str(DEFAULT_MODEL)).returncode == 0
    for case, labels in (("full", full), ("cropped", cropped)):
        added = deepseg(
            engine_python, "dataset", "add", str(root), "--case", case, "--image", str(image), "--labels", str(labels)
        )
        assert added.returncode == 0, added.stderr
    stored = {case: io.read_image(root / "labelsTr" / f"{case}.nii.gz") for case in ("full", "cropped")}
    assert stored["cropped"].same_grid(grid)
    np.testing.assert_array_equal(stored["cropped"].array_zyx, stored["full"].array_zyx)
    assert int((stored["cropped"].array_zyx == 2).sum()) > 100  # the lesions came through too

    # either way round: the cropped file is a box of the full one's grid
    for prediction, reference in ((cropped, full), (full, cropped)):
        compared = deepseg(engine_python, "compare", str(prediction), str(reference))
        assert compared.returncode == 0, compared.stderr
        dice = {name: scores["dice"] for name, scores in json.loads(compared.stdout).items()}
        assert dice == {"liver": 1.0, "liver lesion": 1.0}


def test_segmentations_cropped_to_different_extents_are_compared_on_the_box_covering_both(mrml_scene, tmp_path, engine_python):
    # the prediction: the lesions and a false positive past the liver along x; its box is shorter in z than the
    # truth's (the liver's) and longer in x, so neither box holds the other
    grid = oblique_sample()
    truth_masks = {
        info.name: io.read_segmentation(SAMPLE_TRUTH).mask(info.name) for info in io.read_segmentation(SAMPLE_TRUTH).segments
    }
    lesions = truth_masks["liver lesion"].copy()
    z, y, x = (np.flatnonzero(lesions.any(axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    liver_x_end = int(np.flatnonzero(truth_masks["liver"].any(axis=(0, 1)))[-1])
    assert liver_x_end + 4 < grid.shape_zyx[2]
    lesions[z[0] : z[0] + 2, y[0] : y[0] + 2, liver_x_end + 2 : liver_x_end + 4] = True
    prediction, truth = tmp_path / "prediction.seg.nrrd", tmp_path / "truth.seg.nrrd"
    save_with_slicer(mrml_scene, grid, prediction, crop=True, masks={"liver lesion": lesions})
    save_with_slicer(mrml_scene, grid, truth, crop=True)
    pred_layers, truth_layers = (io.read_segmentation(path).layers for path in (prediction, truth))
    for box, other in ((pred_layers, truth_layers), (truth_layers, pred_layers)):  # neither box holds the other
        with pytest.raises(io.ImageError, match="labelled voxels outside"):
            io.place_on_grid(box, other.with_array(other.array_zyx[0]))
    compared = deepseg(engine_python, "compare", str(prediction), str(truth))
    assert compared.returncode == 0, compared.stderr
    scores = json.loads(compared.stdout)
    true_positives = int(truth_masks["liver lesion"].sum())
    assert scores["liver lesion"]["dice"] == 2 * true_positives / (2 * true_positives + 8)  # the 8 false-positive voxels
    assert scores["liver"]["dice"] == 0.0 and "missing from the prediction" in compared.stderr
