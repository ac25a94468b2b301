"""Image and segmentation I/O through SimpleITK and slicerio: exact geometry, clear errors."""

from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from deepseg_core import io
from deepseg_core.errors import DeepSegError, ImageError
from deepseg_core.io import SegmentInfo, Volume


def oblique_direction(angle_deg: float = 20.0) -> np.ndarray:
    a = np.deg2rad(angle_deg)
    rot_z = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(a / 2), -np.sin(a / 2)], [0, np.sin(a / 2), np.cos(a / 2)]])
    return rot_z @ rot_x


def sample_volume(dtype=np.float32) -> Volume:
    rng = np.random.default_rng(0)
    return Volume(
        array_zyx=(rng.normal(size=(5, 6, 7)) * 100).astype(dtype),
        spacing_xyz_mm=(0.7, 0.9, 2.5),
        origin_lps=(-12.5, 30.25, 101.0),
        direction_lps=oblique_direction(),
    )


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".nii", ".mha"])
def test_round_trip_preserves_voxels_and_geometry(tmp_path, suffix):
    volume = sample_volume()
    path = io.write_image(volume, tmp_path / f"img{suffix}")
    back = io.read_image(path)
    np.testing.assert_array_equal(back.array_zyx, volume.array_zyx)
    # NIfTI stores geometry as float32 qform/sform; the others as text / double
    tolerance = 1e-4 if suffix.startswith(".nii") else 1e-9
    np.testing.assert_allclose(back.ijk_to_lps(), volume.ijk_to_lps(), atol=tolerance)
    assert back.same_grid(volume)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def test_ras_is_lps_with_x_and_y_negated():
    volume = sample_volume()
    lps, ras = volume.ijk_to_lps(), volume.ijk_to_ras()
    np.testing.assert_allclose(ras[:2], -lps[:2])
    np.testing.assert_allclose(ras[2:], lps[2:])
    # voxel (i, j, k) = (x, y, z) index into array_zyx[k, j, i]
    point = volume.ijk_to_lps() @ np.array([1, 2, 3, 1])
    expected = np.array(volume.origin_lps) + volume.direction_lps @ (np.array([1, 2, 3]) * np.array(volume.spacing_xyz_mm))
    np.testing.assert_allclose(point[:3], expected)
    image = volume.to_sitk()
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((1, 2, 3)), expected)


def write_dicom_series(volume: Volume, folder: Path, series_uid: str = "1.2.826.0.1.3680043.2.1125.1") -> None:
    """A real CT DICOM series written by SimpleITK/GDCM, one file per slice."""
    folder.mkdir()
    image = sitk.Cast(volume.to_sitk(), sitk.sitkInt16)
    direction = image.GetDirection()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        slice_k = image[:, :, k]
        tags = {
            "0008|0060": "CT",
            "0020|000d": "1.2.826.0.1.3680043.2.1125.2",
            "0020|000e": series_uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k))),
            "0020|0037": "\\".join(
                f"{v:.6f}" for v in (direction[0], direction[3], direction[6], direction[1], direction[4], direction[7])
            ),
            "0018|0050": f"{volume.spacing_xyz_mm[2]:.6f}",
            "0008|0018": f"{series_uid}.{k + 1}",
        }
        for tag, value in tags.items():
            slice_k.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(slice_k)


def test_dicom_series_folder(tmp_path):
    volume = sample_volume(np.int16)
    write_dicom_series(volume, tmp_path / "dicom")
    back = io.read_image(tmp_path / "dicom")
    np.testing.assert_array_equal(back.array_zyx, volume.array_zyx)
    np.testing.assert_allclose(back.ijk_to_lps(), volume.ijk_to_lps(), atol=1e-4)


def test_dicom_folder_with_two_series_asks_which(tmp_path):
    volume = sample_volume(np.int16)
    write_dicom_series(volume, tmp_path / "dicom", series_uid="1.2.3.4")
    write_dicom_series(volume, tmp_path / "other", series_uid="1.2.3.5")
    for f in (tmp_path / "other").iterdir():
        f.rename(tmp_path / "dicom" / f"b_{f.name}")
    with pytest.raises(ImageError, match="several DICOM series.*1.2.3.4.*--series-uid"):
        io.read_image(tmp_path / "dicom")
    assert io.read_image(tmp_path / "dicom", series_uid="1.2.3.5").shape_zyx == volume.shape_zyx


def test_missing_file(tmp_path):
    with pytest.raises(ImageError, match=r"missing\.nrrd: file not found"):
        io.read_image(tmp_path / "missing.nrrd")


def test_corrupt_file(tmp_path):
    path = tmp_path / "junk.nrrd"
    path.write_bytes(os.urandom(256))
    with pytest.raises(ImageError, match="junk.nrrd: cannot be read as an image"):
        io.read_image(path)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_truncated_file(tmp_path, suffix):
    """ITK itself zero-fills a truncated NIfTI silently; DeepSeg must refuse it."""
    path = io.write_image(sample_volume(), tmp_path / f"img{suffix}")
    if suffix == ".nii.gz":
        data = gzip.decompress(path.read_bytes())
        path.write_bytes(gzip.compress(data[: len(data) // 2]))
    else:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) - 100])
    with pytest.raises(ImageError, match=f"img{suffix}: (is truncated|cannot be read as an image)"):
        io.read_image(path)


def test_cut_gzip_stream(tmp_path):
    path = io.write_image(sample_volume(), tmp_path / "img.nii.gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="img.nii.gz: cannot be read as an image"):
        io.read_image(path)


def test_4d_image_is_refused_with_advice(tmp_path):
    path = tmp_path / "series.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 3, 4, 5), np.float32), isVector=False), str(path))
    with pytest.raises(ImageError, match="4D image.*one 3D file per channel"):
        io.read_image(path)


def test_2d_image_is_refused(tmp_path):
    path = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4), np.float32)), str(path))
    with pytest.raises(ImageError, match="2D image"):
        io.read_image(path)


def test_vector_image_is_refused(tmp_path):
    path = tmp_path / "rgb.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5, 3), np.uint8), isVector=True), str(path))
    with pytest.raises(ImageError, match="3 components per voxel"):
        io.read_image(path)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_voxels_are_refused(tmp_path, bad):
    array = np.zeros((3, 4, 5), np.float32)
    array[1, 2, 3] = bad
    path = tmp_path / "nan.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    with pytest.raises(ImageError, match="NaN or Inf.*1 non-finite voxel"):
        io.read_image(path)


def test_zero_sized_axis_is_refused(tmp_path):
    path = tmp_path / "empty.mha"
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4 0 4\nElementType = MET_FLOAT\nElementDataFile = LOCAL\n")
    with pytest.raises(ImageError, match="empty.mha: has a zero-sized axis"):
        io.read_image(path)


def test_sheared_direction_is_refused(tmp_path):
    import nrrd

    path = tmp_path / "sheared.nrrd"
    directions = np.array([[1.0, 0, 0], [0.5, 1.0, 0], [0, 0, 1.0]])
    nrrd.write(
        str(path),
        np.zeros((4, 4, 4), np.float32),
        {"space": "left-posterior-superior", "space directions": directions, "space origin": np.zeros(3)},
    )
    with pytest.raises(ImageError, match="non-orthogonal"):
        io.read_image(path)


def test_write_errors_leave_nothing_behind(tmp_path):
    with pytest.raises(DeepSegError, match="output folder does not exist"):
        io.write_image(sample_volume(), tmp_path / "nope" / "x.nrrd")
    with pytest.raises(ImageError, match="unsupported output file type"):
        io.write_image(sample_volume(), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    with pytest.raises(DeepSegError, match="not writable"):
        io.write_image(sample_volume(), folder / "x.nrrd")


def test_failed_write_keeps_the_existing_file(tmp_path):
    good = io.write_image(sample_volume(), tmp_path / "x.nrrd")
    before = good.read_bytes()
    bad = sample_volume().with_array(np.full((5, 6, 7), np.nan, np.float32))
    with pytest.raises(ImageError, match="NaN"):
        io.write_image(bad, good)
    assert good.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.nrrd"]


SEGMENTS = (
    SegmentInfo(
        "liver",
        1,
        (0.87, 0.51, 0.4),
        {
            "contextName": "Segmentation category and type - 3D Slicer General Anatomy list",
            "category": ["SCT", "123037004", "Anatomical Structure"],
            "type": ["SCT", "10200004", "Liver"],
        },
    ),
    SegmentInfo("liver lesion", 2, (0.56, 0.93, 0.56)),
)


def test_seg_nrrd_round_trip(tmp_path):
    volume = sample_volume()
    labels = np.zeros(volume.shape_zyx, np.uint8)
    labels[1:4, 2:5, 1:6] = 1
    labels[2, 3, 3] = 2
    path = io.write_segmentation(tmp_path / "out.seg.nrrd", volume.with_array(labels), SEGMENTS)
    seg = io.read_segmentation(path)
    assert [s.name for s in seg.segments] == ["liver", "liver lesion"]
    assert seg.segment("liver").label_value == 1
    assert seg.segment("liver").color_rgb == pytest.approx((0.87, 0.51, 0.4))
    assert seg.segment("liver").terminology["type"] == ["SCT", "10200004", "Liver"]
    np.testing.assert_array_equal(seg.to_labelmap().array_zyx, labels)
    np.testing.assert_array_equal(seg.mask("liver lesion"), labels == 2)
    np.testing.assert_allclose(seg.grid.ijk_to_lps(), volume.ijk_to_lps(), atol=1e-9)
    header = path.read_bytes()[:4000].decode("latin-1")
    assert "Segment0_Name:=liver" in header and "Segment1_LabelValue:=2" in header
    assert "Segment0_Extent:=1 5 2 4 1 3" in header  # i (x), j (y), k (z) ranges
    assert "Segment1_Extent:=3 3 3 3 2 2" in header
    empty = io.write_segmentation(tmp_path / "empty.seg.nrrd", volume.with_array(labels * (labels == 1)), SEGMENTS)
    assert "Segment1_Extent:=0 -1 0 -1 0 -1" in empty.read_bytes()[:4000].decode("latin-1")  # no voxels


def test_seg_nrrd_overlapping_segments_in_layers(tmp_path):
    volume = sample_volume()
    layers = np.zeros((2, *volume.shape_zyx), np.uint8)
    layers[0, 1:4] = 1
    layers[1, 2:5] = 1
    segments = (SegmentInfo("a", 1, layer=0), SegmentInfo("b", 1, layer=1))
    path = io.write_segmentation(tmp_path / "ov.seg.nrrd", volume.with_array(layers), segments)
    seg = io.read_segmentation(path)
    np.testing.assert_array_equal(seg.mask("a"), layers[0] == 1)
    np.testing.assert_array_equal(seg.mask("b"), layers[1] == 1)
    with pytest.raises(ImageError, match="overlaps"):
        seg.to_labelmap()
    header = path.read_bytes()[:4000].decode("latin-1")
    x_stop, y_stop = volume.shape_zyx[2] - 1, volume.shape_zyx[1] - 1
    assert f"Segment0_Extent:=0 {x_stop} 0 {y_stop} 1 3" in header and f"Segment1_Extent:=0 {x_stop} 0 {y_stop} 2 4" in header


def test_seg_nrrd_bad_segments_refused(tmp_path):
    volume = sample_volume()
    labels = volume.with_array(np.zeros(volume.shape_zyx, np.uint8))
    with pytest.raises(ImageError, match="duplicate segment names"):
        io.write_segmentation(tmp_path / "d.seg.nrrd", labels, (SegmentInfo("a", 1), SegmentInfo("a", 2)))
    with pytest.raises(ImageError, match="invalid layer"):
        io.write_segmentation(tmp_path / "d.seg.nrrd", labels, (SegmentInfo("a", 1, layer=1),))
    with pytest.raises(ImageError, match="integer voxels"):
        io.write_segmentation(tmp_path / "d.seg.nrrd", volume, SEGMENTS)
    assert list(tmp_path.iterdir()) == []


def test_corrupt_seg_nrrd(tmp_path):
    path = tmp_path / "bad.seg.nrrd"
    path.write_text("NRRD0004\ntype: what\n")
    with pytest.raises(ImageError, match="bad.seg.nrrd: cannot be read as a Slicer segmentation"):
        io.read_segmentation(path)


def test_written_files_get_ordinary_permissions(tmp_path):
    """Atomic writes go through a private temporary file; the result must not stay private (0600)."""
    import stat as stat_module

    from deepseg_core.fileutil import default_mode

    path = io.write_image(sample_volume(), tmp_path / "x.nrrd")
    assert stat_module.S_IMODE(path.stat().st_mode) == default_mode()


def _rotated_grid() -> io.Volume:
    a = np.deg2rad(20.0)
    direction = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    return io.Volume(np.zeros((6, 10, 12), np.uint8), (0.7, 0.8, 2.5), (-30.0, 12.5, 100.0), direction)


def _box_of(grid: io.Volume, start_zyx, array: np.ndarray) -> io.Volume:
    """``array`` placed at voxel ``start_zyx`` of ``grid`` (same lattice)."""
    origin = grid.ijk_to_lps() @ np.array([*start_zyx[::-1], 1.0])
    return io.Volume(array, grid.spacing_xyz_mm, tuple(origin[:3]), grid.direction_lps)


def test_labels_on_a_box_of_the_image_grid_are_placed_without_interpolation():
    grid = _rotated_grid()
    box = np.arange(1, 2 * 3 * 4 + 1, dtype=np.uint8).reshape(2, 3, 4)
    placed = io.place_on_grid(_box_of(grid, (3, 5, 7), box), grid)
    assert placed.same_grid(grid)
    np.testing.assert_array_equal(placed.array_zyx[3:5, 5:8, 7:11], box)
    assert int(placed.array_zyx.sum()) == int(box.sum())
    # layers (L, Z, Y, X) move together; a box reaching past the image is fine where it holds zeros
    layers = np.zeros((2, 2, 3, 4), np.uint8)
    layers[:, :, 1:, :2] = [[[[1]]], [[[2]]]]  # the box's first row and last columns lie outside
    placed = io.place_on_grid(_box_of(grid, (4, -1, 10), layers), grid)
    assert placed.array_zyx.shape == (2, *grid.shape_zyx)
    np.testing.assert_array_equal(placed.array_zyx[:, 4:6, 0:2, 10:12], layers[:, :, 1:3, :2])
    assert int(placed.array_zyx.sum()) == int(layers.sum())
    # already on the grid: returned as it is
    same = grid.with_array(np.ones(grid.shape_zyx, np.uint8))
    assert io.place_on_grid(same, grid) is same


def test_labels_off_the_image_lattice_or_outside_it_are_refused_clearly():
    grid = _rotated_grid()
    box = np.ones((2, 3, 4), np.uint8)
    between = _box_of(grid, (0.5, 2, 2), box)  # half a slice off: would need interpolation
    with pytest.raises(io.ImageError, match="is not on the image's voxel grid") as caught:
        io.place_on_grid(between, grid, subject="corrected.seg.nrrd")
    assert "corrected.seg.nrrd" in str(caught.value) and "whole number of voxels" in str(caught.value)
    finer = io.Volume(box, (0.35, 0.8, 2.5), grid.origin_lps, grid.direction_lps)
    with pytest.raises(io.ImageError, match="another spacing or direction"):
        io.place_on_grid(finer, grid)
    past = _box_of(grid, (5, 0, 0), box)  # its second slice lies past the image's last one
    with pytest.raises(io.ImageError, match="has labelled voxels outside the image") as caught:
        io.place_on_grid(past, grid)
    assert "12 labelled voxel(s) outside it" in str(caught.value)


def test_two_boxes_of_one_lattice_have_a_grid_covering_both():
    grid = _rotated_grid()
    a = _box_of(grid, (1, 2, 3), np.ones((2, 3, 4), np.uint8))
    b = _box_of(grid, (2, -1, 5), np.full((3, 2, 2), 2, np.uint8))
    union = io.union_grid(a, b)
    assert union.shape_zyx == (4, 6, 4)  # z 1..4, y -1..4, x 3..6
    np.testing.assert_allclose(union.origin_lps, _box_of(grid, (1, -1, 3), np.zeros((1, 1, 1))).origin_lps, atol=1e-9)
    placed = [io.place_on_grid(v, union) for v in (a, b)]
    assert [int(p.array_zyx.sum()) for p in placed] == [24, 24]
    assert io.union_grid(a, io.Volume(np.ones((2, 2, 2)), (1.0, 1.0, 1.0))) is None  # another lattice


def test_a_box_that_misses_the_image_is_refused_even_when_empty():
    grid = _rotated_grid()
    with pytest.raises(io.ImageError, match="does not overlap the image"):
        io.place_on_grid(_box_of(grid, (0, 40, 0), np.zeros((2, 3, 4), np.uint8)), grid)


def _edit_dicom(path: Path, **values: object) -> None:
    import pydicom

    dataset = pydicom.dcmread(str(path))
    for keyword, value in values.items():
        setattr(dataset, keyword, value)
    dataset.save_as(str(path))


def test_a_dicom_series_that_does_not_stack_into_one_regular_volume_is_refused_naming_what_it_found(tmp_path):
    """GDCM sorts and ITK stacks a series on a regular grid whatever its slices say; Slicer's DICOM module splits
    or regularises such series. A missing slice, a gantry tilt and two echoes under one series UID each made a
    wrong volume with at most a warning on stderr."""
    volume = sample_volume(np.int16)  # 2.5 mm slices, oblique
    slices = volume.shape_zyx[0]

    missing = tmp_path / "missing"
    write_dicom_series(volume, missing)
    (missing / f"slice{slices // 2:03d}.dcm").unlink()
    with pytest.raises(ImageError, match=r"unequally spaced slices.*gaps from 2\.5 to 5 mm"):
        io.read_image(missing)

    tilted = tmp_path / "tilted"
    write_dicom_series(volume, tilted)
    shift_per_slice = 2.5 * np.tan(np.radians(20.0))
    column, normal = volume.direction_lps[:, 1], volume.direction_lps[:, 2]
    for k in range(slices):  # a 20 degree gantry tilt: each slice moves along its column direction with its position
        position = np.array(volume.origin_lps) + k * 2.5 * normal + k * shift_per_slice * column
        _edit_dicom(tilted / f"slice{k:03d}.dcm", ImagePositionPatient=[float(v) for v in position])
    with pytest.raises(ImageError, match=r"gantry tilt.*a tilt of 20\.00 degrees"):
        io.read_image(tilted)

    echoes = tmp_path / "echoes"
    write_dicom_series(volume, echoes)
    write_dicom_series(volume, tmp_path / "second_echo")
    for k, path in enumerate(sorted((tmp_path / "second_echo").iterdir())):
        _edit_dicom(path, EchoNumbers=2, SOPInstanceUID=f"1.2.826.0.1.3680043.2.1125.9.{k + 1}")
        path.rename(echoes / f"echo2_{path.name}")
    for path in sorted(echoes.glob("slice*.dcm")):
        _edit_dicom(path, EchoNumbers=1)
    with pytest.raises(
        ImageError,
        match=rf"several images at one slice position.*{2 * slices} slices at {slices} positions, differing in EchoNumbers",
    ):
        io.read_image(echoes)

    # the positions as scanners write them, to a few micrometres, stack as before
    jitter = tmp_path / "jitter"
    write_dicom_series(volume, jitter)
    rng = np.random.default_rng(0)
    for k in range(slices):
        position = np.array(volume.origin_lps) + k * 2.5 * normal + rng.uniform(-0.004, 0.004, 3)
        _edit_dicom(jitter / f"slice{k:03d}.dcm", ImagePositionPatient=[float(v) for v in position])
    np.testing.assert_array_equal(io.read_image(jitter).array_zyx, volume.array_zyx)


def test_dicom_slices_that_scale_their_values_differently_are_read_as_float(tmp_path):
    """ITK takes the voxel type from the first slice: a later slice's RescaleSlope of 0.5 lost its halves in int16."""
    volume = sample_volume(np.int16)
    folder = tmp_path / "dicom"
    write_dicom_series(volume, folder)
    _edit_dicom(folder / "slice002.dcm", RescaleSlope=0.5, RescaleIntercept=0)
    for path in folder.iterdir():
        if path.name != "slice002.dcm":
            _edit_dicom(path, RescaleSlope=1, RescaleIntercept=0)
    back = io.read_image(folder)
    expected = volume.array_zyx.astype(np.float32)
    expected[2] *= 0.5
    assert back.array_zyx.dtype == np.float32 and np.any(expected[2] % 1 != 0)
    np.testing.assert_array_equal(back.array_zyx, expected)


def test_a_dicom_folder_of_one_slice_is_refused_and_one_multi_frame_file_is_read(tmp_path):
    volume = sample_volume(np.int16)
    folder = tmp_path / "one"
    write_dicom_series(volume, folder)
    for path in sorted(folder.iterdir())[1:]:
        path.unlink()
    with pytest.raises(ImageError, match="holds a single slice"):
        io.read_image(folder)
    frames = np.arange(5 * 6 * 7, dtype=np.uint16).reshape(5, 6, 7)
    image = sitk.GetImageFromArray(frames)
    image.SetSpacing((0.5, 0.6, 2.0))
    (tmp_path / "multi").mkdir()
    sitk.WriteImage(image, str(tmp_path / "multi" / "volume.dcm"))  # GDCM writes one file of 5 frames
    back = io.read_image(tmp_path / "multi")
    np.testing.assert_array_equal(back.array_zyx, frames)
    assert back.spacing_xyz_mm == (0.5, 0.6, 2.0)


def test_a_dicom_series_whose_slices_differ_in_grid_or_repeat_or_lack_geometry_is_refused(tmp_path):
    """From a review: ITK takes the matrix, pixel spacing and voxel type from the first slice (a slice of another
    spacing was stacked silently), a zero orientation made a NaN normal that passed every check, and a copied
    file was reported as several volumes. Positions rounded to 0.1 mm, as some scanners write them, still read."""
    volume = sample_volume(np.int16)

    def series(name: str) -> Path:
        write_dicom_series(volume, tmp_path / name)
        return tmp_path / name

    spacing = series("spacing")
    _edit_dicom(spacing / "slice003.dcm", PixelSpacing=[0.3, 0.3])
    with pytest.raises(ImageError, match=r"mixes slices of different PixelSpacing.*found \(0\.3, 0\.3\) in slice003"):
        io.read_image(spacing)

    copied = series("copied")
    shutil.copy(copied / "slice001.dcm", copied / "slice001 (copy).dcm")
    with pytest.raises(ImageError, match=r"holds two copies of one slice.*slice001 \(copy\)\.dcm"):
        io.read_image(copied)

    flat = series("flat")
    _edit_dicom(flat / "slice002.dcm", ImageOrientationPatient=[0, 0, 0, 0, 0, 0])
    with pytest.raises(ImageError, match=r"without a usable position or orientation.*1 of 5 slices.*slice002"):
        io.read_image(flat)

    volume = dataclasses.replace(volume, spacing_xyz_mm=(0.7, 0.9, 0.625))  # thin slices: rounding is 8 % of one
    rounded = series("rounded")
    normal = volume.direction_lps[:, 2]
    for k in range(volume.shape_zyx[0]):
        position = np.round(np.array(volume.origin_lps) + k * 0.625 * normal, 1)
        _edit_dicom(rounded / f"slice{k:03d}.dcm", ImagePositionPatient=[float(v) for v in position])
    np.testing.assert_array_equal(io.read_image(rounded).array_zyx, volume.array_zyx)


def test_a_multi_frame_cine_file_is_not_read_as_a_volume(tmp_path):
    (tmp_path / "us").mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 6, 7), np.uint16)), str(tmp_path / "us" / "loop.dcm"))
    _edit_dicom(tmp_path / "us" / "loop.dcm", SOPClassUID="1.2.840.10008.5.1.4.1.1.3.1")  # Ultrasound Multi-frame
    with pytest.raises(ImageError, match=r"holds an ultrasound cine loop, not a volume.*4 frames"):
        io.read_image(tmp_path / "us")
    # the same file given directly was read as a 4-slice volume: one refusal serves both paths
    with pytest.raises(ImageError, match=r"loop\.dcm: holds an ultrasound cine loop, not a volume.*found SOP class .*, 4 frames"):
        io.read_image(tmp_path / "us" / "loop.dcm")
    # most cine loops are colour: refused as a loop, not told to split "channels" (the SOP class is checked first)
    colour = sitk.GetImageFromArray(np.zeros((5, 6, 7, 3), np.uint8), isVector=True)
    sitk.WriteImage(colour, str(tmp_path / "colour.dcm"))
    _edit_dicom(tmp_path / "colour.dcm", SOPClassUID="1.2.840.10008.5.1.4.1.1.3.1")
    with pytest.raises(ImageError, match=r"colour\.dcm: holds an ultrasound cine loop, not a volume.*5 frames"):
        io.read_image(tmp_path / "colour.dcm")
