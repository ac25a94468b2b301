"""The DICOM SEG ``liver.dcm`` (pydicom-data 1.0.0) through ``deepseg_core.dicom_seg``.

What the file is: one BINARY segment "Liver" (SRT T-62000, drawn with Slicer's Editor), three
512 x 512 frames of 0.810547 mm pixels, 1 mm apart, axial (identity orientation), derived from
three CT images of series 1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1. That CT series
is NOT in the pydicom-data wheel (nor in pydicom's own test files), so only the SEG's own geometry
can be checked; the frames are checked against the tags read independently with pydicom and against
SimpleITK/GDCM's reading of the same file.
"""

from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from deepseg_core import io
from deepseg_core.dicom_seg import cielab_to_rgb, read_dicom_seg
from deepseg_core.errors import ImageError

REFERENCED_CT_SERIES = "1.2.392.200103.20080913.113635.1.2009.6.22.21.43.10.23430.1"
#: Slicer's colour for "Liver" (GenericAnatomyColors 221, 130, 101), which the SEG's CIELab encodes.
SLICER_LIVER_RGB = (221 / 255, 130 / 255, 101 / 255)


@pytest.fixture(scope="module")
def seg(liver_seg_path):
    return read_dicom_seg(liver_seg_path)


@pytest.fixture(scope="module")
def dataset(liver_seg_path):
    return pydicom.dcmread(str(liver_seg_path))


def test_segments_names_codes_and_colour(seg, record_property):
    assert len(seg.segments) == 1
    liver = seg.segments[0]
    assert (liver.name, liver.label_value, liver.layer) == ("Liver", 1, 0)
    assert liver.terminology["type"] == ["SRT", "T-62000", "Liver"]
    assert liver.terminology["category"] == ["SRT", "T-D0050", "Tissue"]
    np.testing.assert_allclose(liver.color_rgb, SLICER_LIVER_RGB, atol=0.5 / 255)
    assert seg.segmentation_type == "BINARY"
    assert seg.referenced_series_uid == REFERENCED_CT_SERIES
    record_property(
        "realdata",
        f"liver.dcm: {len(seg.segments)} segment {liver.name!r}, {len(seg.frames)} frames, grid (z, y, x) "
        f"{seg.grid.shape_zyx}, spacing {seg.grid.spacing_xyz_mm} mm, origin {seg.grid.origin_lps} LPS, "
        f"voxels per frame {[int(n) for n in (seg.labelmap().array_zyx == 1).sum(axis=(1, 2))]}, "
        f"colour {tuple(round(c * 255) for c in liver.color_rgb)}",
    )


def test_frame_count_and_grid(seg, dataset):
    assert len(seg.frames) == int(dataset.NumberOfFrames) == 3
    grid = seg.grid
    assert grid.shape_zyx == (3, 512, 512)
    assert grid.spacing_xyz_mm == (0.810547, 0.810547, 1.0)
    assert grid.origin_lps == (-235.2, -226.8, -128.69)
    np.testing.assert_array_equal(grid.direction_lps, np.eye(3))
    assert [f.slice_index for f in seg.frames] == [0, 1, 2]
    assert all(f.segment_number == 1 and f.source_sop_instance_uid for f in seg.frames)


def test_every_frame_lies_on_the_computed_grid(seg, dataset):
    """Each frame's ImagePositionPatient (read here with pydicom) is voxel (0, 0, k) of the grid."""
    lps_to_ijk = np.linalg.inv(seg.grid.ijk_to_lps())
    orientation = np.asarray(dataset.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient, float)
    np.testing.assert_allclose(seg.grid.direction_lps[:, 0], orientation[:3])
    np.testing.assert_allclose(seg.grid.direction_lps[:, 1], orientation[3:])
    for frame, groups in zip(seg.frames, dataset.PerFrameFunctionalGroupsSequence, strict=True):
        position = np.asarray(groups.PlanePositionSequence[0].ImagePositionPatient, float)
        ijk = (lps_to_ijk @ np.r_[position, 1.0])[:3]
        np.testing.assert_allclose(ijk, [0, 0, frame.slice_index], atol=1e-6)
        assert groups.SegmentIdentificationSequence[0].ReferencedSegmentNumber == frame.segment_number


def test_masks_are_the_frames_pixels(seg, dataset):
    pixels = dataset.pixel_array.astype(bool)
    labelmap = seg.labelmap().array_zyx
    assert labelmap.dtype == np.uint8 and set(np.unique(labelmap)) == {0, 1}
    for frame in seg.frames:
        mask = labelmap[frame.slice_index] == frame.segment_number
        assert mask.any()
        np.testing.assert_array_equal(mask, pixels[frame.index])
    assert [int(n) for n in (labelmap == 1).sum(axis=(1, 2))] == [36233, 35645, 35220]


def test_simpleitk_agrees_with_the_reader_on_this_contiguous_seg(seg, liver_seg_path):
    """GDCM (no pydicom) sees the same grid and the same voxels (0/255) on this SEG, whose frames are
    contiguous and in order; it stacks frames as slices, so only such a SEG is an independent check."""
    volume = io.Volume.from_sitk(sitk.ReadImage(str(liver_seg_path)))
    assert volume.same_grid(seg.grid, tolerance_mm=1e-6)
    np.testing.assert_array_equal(volume.array_zyx > 0, seg.labelmap().array_zyx == 1)
    raw = sitk.ReadImage(str(liver_seg_path))
    np.testing.assert_allclose(raw.GetOrigin(), seg.grid.origin_lps, atol=1e-6)


def test_seg_converts_to_a_slicer_segmentation_file(seg, tmp_path):
    path = io.write_segmentation(tmp_path / "liver.seg.nrrd", seg.labelmap(), seg.segments)
    back = io.read_segmentation(path)
    assert back.grid.same_grid(seg.grid, tolerance_mm=1e-6)
    assert [(s.name, s.label_value) for s in back.segments] == [("Liver", 1)]
    np.testing.assert_allclose(back.segments[0].color_rgb, seg.segments[0].color_rgb, atol=1e-6)
    np.testing.assert_array_equal(back.mask("Liver"), seg.labelmap().array_zyx == 1)


def test_a_seg_given_as_an_image_is_refused(liver_seg_path):
    """``deepseg segment``, ``info``, ``compare`` and ``dataset add`` read images through ``io.read_image``:
    GDCM would stack a SEG's frames as contiguous slices (sparse frames, per-segment frames and the spacing
    lost), so a SEG is refused there, naming what it is."""
    with pytest.raises(ImageError, match=r"holds a DICOM Segmentation object, not an image") as caught:
        io.read_image(liver_seg_path)
    assert "1.2.840.10008.5.1.4.1.1.66.4" in str(caught.value) and "Give the image series it segments" in str(caught.value)


def test_cielab_white_and_black():
    np.testing.assert_allclose(cielab_to_rgb((65535, 32896, 32896)), (1.0, 1.0, 1.0), atol=2e-3)
    np.testing.assert_allclose(cielab_to_rgb((0, 32896, 32896)), (0.0, 0.0, 0.0), atol=1e-6)


def test_a_ct_image_is_refused_as_not_a_seg(tmp_path):
    from pydicom.data import get_testdata_file

    with pytest.raises(ImageError, match="is not a DICOM Segmentation object"):
        read_dicom_seg(get_testdata_file("CT_small.dcm"))
    junk = tmp_path / "junk.dcm"
    junk.write_text("not DICOM")
    with pytest.raises(ImageError, match="cannot be read as DICOM"):
        read_dicom_seg(junk)


def test_frames_off_the_slice_grid_are_refused(liver_seg_path, tmp_path):
    """A frame moved half a slice along the normal no longer lies on the grid: refused, not misplaced."""
    moved = pydicom.dcmread(str(liver_seg_path))
    position = moved.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0]
    position.ImagePositionPatient = [-235.2, -226.8, -127.19]
    moved.save_as(tmp_path / "moved.dcm")
    with pytest.raises(ImageError, match="do not lie on one regular slice grid"):
        read_dicom_seg(tmp_path / "moved.dcm")


def test_overlapping_segments_go_to_separate_layers(liver_seg_path, dataset, tmp_path):
    """Frame 1 re-assigned to a second segment and moved onto slice 0, where it overlaps segment 1."""
    edited = pydicom.dcmread(str(liver_seg_path))
    second = copy.deepcopy(edited.SegmentSequence[0])
    second.SegmentNumber, second.SegmentLabel = 2, "Liver copy"
    edited.SegmentSequence.append(second)
    frame = edited.PerFrameFunctionalGroupsSequence[1]
    frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber = 2
    frame.PlanePositionSequence[0].ImagePositionPatient = [-235.2, -226.8, -128.69]
    edited.save_as(tmp_path / "two.dcm")
    result = read_dicom_seg(tmp_path / "two.dcm")
    assert [(s.name, s.label_value, s.layer) for s in result.segments] == [("Liver", 1, 0), ("Liver copy", 2, 1)]
    assert result.grid.shape_zyx == (3, 512, 512) and [f.slice_index for f in result.frames] == [0, 0, 2]
    pixels = dataset.pixel_array.astype(bool)
    np.testing.assert_array_equal(result.segmentation.mask("Liver copy")[0], pixels[1])
    np.testing.assert_array_equal(result.segmentation.mask("Liver")[0], pixels[0])
    assert not result.segmentation.mask("Liver")[1].any()
    with pytest.raises(ImageError, match="overlaps another segment"):
        result.labelmap()
