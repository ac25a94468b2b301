"""A real image with a real label map, exported as a DeepSeg dataset case and as a Slicer ``.seg.nrrd``.

The label map is the MNI152 2009a tissue classification made from nilearn's probability maps:
inside nilearn's brain mask (T1 above 20 % of its maximum, as ``load_mni152_brain_mask``), each voxel
gets the argmax of (grey matter, white matter, rest = 1 - grey - white) after probabilities below
0.2 are set to 0; "rest" inside the brain is labelled CSF. The ``.seg.nrrd`` is loaded by Slicer's
own reader (``vtkMRMLSegmentationStorageNode`` from the slicer-core wheel, on a real MRML scene).
"""

from __future__ import annotations

import numpy as np
import pytest
from real_images import MNI_T1

from deepseg_core import io
from deepseg_core.compare import compare_files
from deepseg_core.datasets import CaseProvenance, Dataset, validate_dataset
from deepseg_core.model_card import LabelSpec

THRESHOLD = 0.2
TISSUES = (
    LabelSpec(1, "grey matter", (0.47, 0.47, 0.47)),
    LabelSpec(2, "white matter", (0.96, 0.96, 0.86)),
    LabelSpec(3, "cerebrospinal fluid", (0.34, 0.58, 0.87)),
)


@pytest.fixture(scope="module")
def mni_tissues(mni_t1_path, mni_gm_path, mni_wm_path):
    t1 = io.read_image(mni_t1_path)
    grey = io.read_image(mni_gm_path).array_zyx / 255.0
    white = io.read_image(mni_wm_path).array_zyx / 255.0
    rest = np.clip(1.0 - grey - white, 0.0, 1.0)
    probabilities = np.stack([rest, grey, white])
    probabilities[probabilities < THRESHOLD] = 0.0
    tissue = np.argmax(probabilities, axis=0)
    brain = t1.array_zyx > THRESHOLD * float(t1.array_zyx.max())
    labels = np.zeros(t1.shape_zyx, dtype=np.uint8)
    labels[brain & (tissue == 1)] = 1
    labels[brain & (tissue == 2)] = 2
    labels[brain & (tissue == 0)] = 3
    return t1, labels


def test_tissue_labelmap_is_plausible(mni_tissues, record_property):
    t1, labels = mni_tissues
    counts = np.bincount(labels.ravel(), minlength=4)
    ml = counts * t1.voxel_volume_ml
    record_property("realdata", f"MNI152 tissues: grey {ml[1]:.0f} ml, white {ml[2]:.0f} ml, CSF/other {ml[3]:.0f} ml")
    # MNI152 space is larger than the average brain (total here about 1.9 l); grey exceeds white in adults
    assert 500 < ml[1] < 1300 and 400 < ml[2] < 900 and ml[1] > ml[2] and ml[3] > 0
    assert t1.array_zyx[labels == 2].mean() > t1.array_zyx[labels == 1].mean() > t1.array_zyx[labels == 3].mean()  # T1 contrast


def test_dataset_case_validates_and_reads_back_equal(mni_tissues, tmp_path):
    t1, labels = mni_tissues
    dataset = Dataset.create(tmp_path / "mni", "MNI152 tissues", TISSUES, channel_names=("T1",))
    dataset.add_case(
        "mni152_2009a", [t1], labels, provenance=CaseProvenance(source=f"nilearn 0.14.1 {MNI_T1}; tissues from its GM/WM maps")
    )
    assert validate_dataset(dataset.root) == []
    reopened = Dataset.open(dataset.root)
    assert [label.name for label in reopened.labels] == [label.name for label in TISSUES]
    images, label_volume = reopened.load_case("mni152_2009a")
    assert images[0].same_grid(t1, tolerance_mm=1e-6) and label_volume.same_grid(t1, tolerance_mm=1e-6)
    np.testing.assert_array_equal(images[0].array_zyx, t1.array_zyx)
    assert images[0].array_zyx.dtype == t1.array_zyx.dtype
    np.testing.assert_array_equal(label_volume.array_zyx, labels)


def test_compare_scores_a_seg_nrrd_against_the_datasets_label_map(mni_tissues, tmp_path):
    # deepseg compare on a real label map: the dataset's labelsTr case (names from its dataset.json)
    # against a .seg.nrrd in which the grey matter of the upper half became CSF
    t1, labels = mni_tissues
    dataset = Dataset.create(tmp_path / "mni", "MNI152 tissues", TISSUES, channel_names=("T1",))
    dataset.add_case("mni152_2009a", [t1], labels)
    predicted = labels.copy()
    upper = predicted[predicted.shape[0] // 2 :]
    upper[upper == 1] = 3
    seg_path = io.write_segmentation(tmp_path / "edited.seg.nrrd", t1.with_array(predicted), [t.segment_info() for t in TISSUES])
    scores = compare_files(seg_path, dataset.label_path("mni152_2009a"))
    assert sorted(scores) == sorted(t.name for t in TISSUES)
    for tissue in TISSUES:
        ours, reference = predicted == tissue.value, labels == tissue.value
        expected = 2 * np.count_nonzero(ours & reference) / (np.count_nonzero(ours) + np.count_nonzero(reference))
        assert scores[tissue.name]["dice"] == pytest.approx(expected)
        assert scores[tissue.name]["ref_ml"] == pytest.approx(np.count_nonzero(reference) * t1.voxel_volume_ml)
    assert scores["white matter"]["dice"] == 1.0 and 0.5 < scores["grey matter"]["dice"] < 0.9


@pytest.fixture(scope="module")
def slicer_scene():
    """A real MRML scene, brought up as Testing/mrml/conftest.py does.

    The Segmentations logic registers the segmentation converter rules; that is done only when no
    rules are registered yet in this process (each registration would add them again).
    """
    import slicer

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    color_logic = slicer.vtkMRMLColorLogic()
    color_logic.SetMRMLScene(scene)
    app_logic.SetColorLogic(color_logic)
    logic = None
    if not slicer.vtkSegmentationConverterFactory.GetInstance().GetConverterRules():
        logic = slicer.vtkSlicerSegmentationsModuleLogic()
        logic.SetMRMLApplicationLogic(app_logic)
        logic.SetMRMLScene(scene)
        app_logic.SetModuleLogic("Segmentations", logic)
    yield scene
    scene.Clear(0)
    del logic, app_logic


def slicer_segments(scene, path, grid: io.Volume) -> dict[str, tuple[tuple[float, float, float], np.ndarray]]:
    """Segment name -> (colour, mask (Z, Y, X) on ``grid``) as Slicer's segmentation reader loads them."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "read back")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer could not read {path}"
    segmentation = node.GetSegmentation()
    out = {}
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        labelmap = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
        matrix = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(matrix)
        image_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
        np.testing.assert_allclose(image_to_ras, grid.ijk_to_ras(), atol=1e-6)  # same grid: extents index it directly
        x0, x1, y0, y1, z0, z1 = labelmap.GetExtent()
        full = np.zeros(grid.shape_zyx, dtype=np.int32)
        if x1 >= x0:
            scalars = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
            full[z0 : z1 + 1, y0 : y1 + 1, x0 : x1 + 1] = scalars.reshape(z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1)
        out[segment.GetName()] = (tuple(segment.GetColor()), full == segment.GetLabelValue())
    return out


def test_seg_nrrd_loads_in_slicer_with_names_colours_and_masks(mni_tissues, slicer_scene, tmp_path):
    t1, labels = mni_tissues
    path = io.write_segmentation(tmp_path / "mni_tissues.seg.nrrd", t1.with_array(labels), [t.segment_info() for t in TISSUES])
    loaded = slicer_segments(slicer_scene, path, t1)
    assert list(loaded) == [t.name for t in TISSUES]
    for tissue in TISSUES:
        colour, mask = loaded[tissue.name]
        np.testing.assert_allclose(colour, tissue.color, atol=1e-6)
        assert mask.any()
        np.testing.assert_array_equal(mask, labels == tissue.value)


def test_aal_regions_load_in_slicer_with_mricron_colours(aal_path, aal_names, aal_colors, slicer_scene, tmp_path):
    """A few AAL regions on Colin27 with MRIcron's own colours, through the same Slicer reader."""
    atlas = io.read_image(aal_path)
    chosen = [value for value, name in aal_names.items() if name.startswith(("Hippocampus", "Amygdala", "Precentral"))]
    labels = np.where(np.isin(atlas.array_zyx, chosen), atlas.array_zyx, 0).astype(np.uint8)
    segments = [io.SegmentInfo(name=aal_names[v], label_value=v, color_rgb=aal_colors[v]) for v in chosen]
    path = io.write_segmentation(tmp_path / "aal.seg.nrrd", atlas.with_array(labels), segments)
    loaded = slicer_segments(slicer_scene, path, atlas)
    assert sorted(loaded) == sorted(aal_names[v] for v in chosen) and len(chosen) == 6
    for value in chosen:
        colour, mask = loaded[aal_names[value]]
        np.testing.assert_allclose(colour, aal_colors[value], atol=1e-6)
        np.testing.assert_array_equal(mask, atlas.array_zyx == value)
