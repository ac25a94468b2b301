"""Per-segment and per-instance measurements against shapes whose answers are known analytically."""

from __future__ import annotations

import math

import numpy as np
import pytest

from deepseg_core import io, measurements, phantoms
from deepseg_core.errors import ImageError
from deepseg_core.io import SegmentInfo, Volume


def ball(shape_zyx, centre_zyx_mm, radius_mm, spacing_xyz_mm) -> np.ndarray:
    sz, sy, sx = spacing_xyz_mm[::-1]
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape_zyx), indexing="ij")
    cz, cy, cx = centre_zyx_mm
    return ((z * sz - cz) ** 2 + (y * sy - cy) ** 2 + (x * sx - cx) ** 2) <= radius_mm**2


def test_sphere_volume_surface_diameter_sphericity_and_centroid():
    spacing = (0.5, 0.5, 0.5)
    mask = ball((60, 60, 60), (15.0, 15.0, 15.0), 10.0, spacing)
    origin = (-20.0, 30.0, 5.0)
    grid = Volume(mask.astype(np.uint8), spacing_xyz_mm=spacing, origin_lps=origin)
    intensity = grid.with_array(np.where(mask, 50.0, -100.0).astype(np.float32))
    (row,) = measurements.measure_segments(grid, [SegmentInfo("ball", 1)], intensity=intensity)
    assert row.volume_ml == pytest.approx(4 / 3 * math.pi * 1000 / 1000, rel=0.01)
    assert row.volume_mm3 == pytest.approx(row.voxel_count * 0.125)
    assert row.surface_area_mm2 == pytest.approx(4 * math.pi * 100, rel=0.02)
    assert row.feret_diameter_mm == pytest.approx(20.0, abs=1.0)
    assert row.sphericity == pytest.approx(1.0, abs=0.03)
    # centre of the ball: origin + 15 mm along each axis (identity direction), LPS then RAS
    assert (row.centroid_l_mm, row.centroid_p_mm, row.centroid_s_lps_mm) == pytest.approx((-5.0, 45.0, 20.0), abs=0.05)
    assert row.centroid_ras_mm == pytest.approx((5.0, -45.0, 20.0), abs=0.05)
    assert row.intensity_mean == 50.0 and row.intensity_std == 0.0 and row.intensity_min == row.intensity_max == 50.0


def test_elongated_shape_is_less_spherical_and_its_diameter_is_its_length():
    mask = np.zeros((20, 20, 80), dtype=np.uint8)
    mask[8:12, 8:12, 10:70] = 1
    grid = Volume(mask, spacing_xyz_mm=(1.0, 1.0, 1.0))
    (row,) = measurements.measure_segments(grid, [SegmentInfo("rod", 1)])
    assert row.sphericity < 0.6
    assert row.feret_diameter_mm == pytest.approx(math.sqrt(59**2 + 3**2 + 3**2), abs=0.01)
    assert math.isnan(row.intensity_mean)


def test_intensity_statistics_match_numpy_on_a_phantom():
    case = phantoms.generate_phantom(seed=4, shape_zyx=(24, 48, 48), n_lesions=3)
    segments = [label.segment_info() for label in phantoms.PHANTOM_LABELS]
    rows = measurements.measure_segments(case.labels, segments, intensity=case.image)
    values = case.image.array_zyx[case.labels.array_zyx == 1].astype(np.float64)
    liver = rows[0]
    assert liver.segment == "liver"
    assert liver.intensity_mean == pytest.approx(values.mean())
    assert liver.intensity_std == pytest.approx(values.std(ddof=1))  # the sample SD, as Slicer's Segment Statistics
    assert liver.intensity_median == pytest.approx(np.median(values))
    assert liver.intensity_p95 == pytest.approx(np.percentile(values, 95))
    assert liver.voxel_count == values.size


def test_instances_are_measured_one_by_one_largest_first():
    case = phantoms.generate_phantom(seed=7, shape_zyx=(30, 64, 64), n_lesions=4, lesion_radius_mm=(3.0, 8.0))
    segments = [label.segment_info() for label in phantoms.PHANTOM_LABELS]
    rows = measurements.measure_segments(
        case.labels, segments, intensity=case.image, instance_ids_zyx=case.instances, thing_values=[2]
    )
    lesion_rows = [r for r in rows if r.label_value == 2]
    whole, instances = lesion_rows[0], lesion_rows[1:]
    count = len(np.unique(case.instances)) - 1
    assert whole.instance_count == count == len(instances)
    assert [r.segment for r in instances] == [f"liver lesion {i}" for i in range(1, count + 1)]
    volumes = [r.volume_mm3 for r in instances]
    assert volumes == sorted(volumes, reverse=True)
    assert sum(r.voxel_count for r in instances) == whole.voxel_count


def test_the_standard_deviation_is_the_sample_one_as_slicers_segment_statistics():
    # vtkImageAccumulate (Slicer's ScalarVolumeSegmentStatisticsPlugin) gives 1.2909944487358056 for 1, 2, 3, 4
    # and 0 for one voxel; Testing/mrml/test_measurements_vs_slicer.py runs it on a larger sample
    stats = measurements.intensity_statistics(np.array([1.0, 2.0, 3.0, 4.0]))
    assert stats["intensity_std"] == pytest.approx(1.2909944487358056, rel=1e-12)
    assert measurements.intensity_statistics(np.array([5.0]))["intensity_std"] == 0.0


def test_a_lesion_class_row_measures_only_the_voxels_its_instances_keep():
    """Components under the instance size floor have instance id 0 and the instance segmentation drops them:
    the class row must not count them, or the lesion burden would not equal the sum of the lesions shown."""
    array = np.zeros((10, 20, 20), np.uint8)
    array[2:5, 2:8, 2:5] = 2  # a 54-voxel lesion
    array[8, 15, 15:17] = 2  # a 2-voxel speck below the floor
    ids = np.zeros(array.shape, np.int32)
    ids[2:5, 2:8, 2:5] = 1
    labels = Volume(array, (1.0, 1.0, 1.0))
    image = Volume(np.arange(array.size, dtype=np.float32).reshape(array.shape), (1.0, 1.0, 1.0))
    segments = [SegmentInfo("liver lesion", 2, (1.0, 1.0, 0.0))]
    rows = measurements.measure_segments(labels, segments, intensity=image, instance_ids_zyx=ids, thing_values=[2])
    whole, lesion = rows
    assert whole.voxel_count == lesion.voxel_count == 54 and whole.instance_count == 1
    assert whole.intensity_max == lesion.intensity_max < image.array_zyx[8, 15, 15]


def test_empty_segment_row_and_csv_round_trip(tmp_path):
    grid = Volume(np.zeros((5, 6, 7), dtype=np.uint8))
    grid.array_zyx[1:3, 1:3, 1:3] = 1
    rows = measurements.measure_segments(grid, [SegmentInfo("a", 1), SegmentInfo("missing", 2)])
    assert rows[1].voxel_count == 0 and rows[1].volume_ml == 0.0 and math.isnan(rows[1].surface_area_mm2)
    path = measurements.write_measurements_csv(tmp_path / "stats.csv", rows)
    header = path.read_text().splitlines()[0]
    assert "Volume [cm3]" in header and "Centroid R [mm] (RAS)" in header and "Surface area [mm2]" in header
    back = measurements.read_measurements_csv(path)
    assert back[0]["segment"] == "a" and int(back[0]["voxel_count"]) == 8 and back[1]["surface_area_mm2"] == ""


def test_bad_inputs_are_refused_and_nothing_is_written(tmp_path):
    grid = Volume(np.ones((4, 4, 4), dtype=np.uint8))
    other = Volume(np.ones((4, 4, 5), dtype=np.float32))
    with pytest.raises(ImageError, match="not on the segmentation's grid"):
        measurements.measure_segments(grid, [SegmentInfo("a", 1)], intensity=other)
    rows = measurements.measure_segments(grid, [SegmentInfo("a", 1)])
    with pytest.raises(ImageError, match="Expected a .csv file"):
        measurements.write_measurements_csv(tmp_path / "stats.txt", rows)
    with pytest.raises(ImageError, match="folder does not exist"):
        measurements.write_measurements_csv(tmp_path / "nope" / "stats.csv", rows)
    assert list(tmp_path.iterdir()) == []


def test_channels_need_distinct_names_and_a_table_with_an_unknown_column_is_refused(tmp_path):
    grid = Volume(np.ones((4, 4, 4), dtype=np.uint8))
    image = grid.with_array(np.ones((4, 4, 4), dtype=np.float32))
    with pytest.raises(ImageError, match="distinct names"):
        measurements.measure_segments(grid, [SegmentInfo("a", 1)], intensity_channels=[("T1", image), ("T1", image)])
    with pytest.raises(ImageError, match="not both"):
        measurements.measure_segments(grid, [SegmentInfo("a", 1)], intensity=image, intensity_channels=[("T1", image)])
    shifted = Volume(np.ones((4, 4, 4), dtype=np.float32), origin_lps=(0.0, 0.0, 0.0), spacing_xyz_mm=(2.0, 1.0, 1.0))
    with pytest.raises(ImageError, match=r"image \(channel T2\) is not on the segmentation's grid"):
        measurements.measure_segments(grid, [SegmentInfo("a", 1)], intensity_channels=[("T1", image), ("T2", shifted)])
    table = tmp_path / "stats.csv"
    table.write_text("Segment,Mean (T1),Colour\na,1,red\n", encoding="utf-8")
    with pytest.raises(ImageError, match="unknown measurement column 'Colour'"):
        measurements.read_measurements_csv(table)


@pytest.mark.parametrize("grown_voxels", [1, 2, 3])
def test_an_oversegmented_lesion_shifts_its_mean_by_eps_times_the_tissue_contrast(grown_voxels):
    """Design note: a fraction eps of background (mean muB) in a tumour ROI (mean muT) moves the measured
    mean by eps (muB - muT). Here the error is a real segmentation error: the phantom's lesion mask grown
    by 1-3 voxels into the surrounding liver, measured with the project's own statistics, against the
    prediction from the two tissues' means (the liver segment, the true lesion)."""
    from scipy import ndimage

    case = phantoms.generate_phantom(seed=11, shape_zyx=(40, 96, 96), n_lesions=1, lesion_radius_mm=(9.0, 10.0))
    truth = case.labels.array_zyx
    lesion = truth == phantoms.LESION_LABEL
    grown = ndimage.binary_dilation(lesion, iterations=grown_voxels)
    assert (truth[grown & ~lesion] == phantoms.ORGAN_LABEL).all()  # the error adds liver only
    segmentation = truth.copy()
    segmentation[grown] = phantoms.LESION_LABEL
    segments = [SegmentInfo("liver", phantoms.ORGAN_LABEL), SegmentInfo("liver lesion", phantoms.LESION_LABEL)]
    liver_true, lesion_true = measurements.measure_segments(case.labels, segments, intensity=case.image)
    _, lesion_measured = measurements.measure_segments(case.labels.with_array(segmentation), segments, intensity=case.image)
    eps = 1.0 - lesion_true.voxel_count / lesion_measured.voxel_count
    shift = lesion_measured.intensity_mean - lesion_true.intensity_mean
    predicted = eps * (liver_true.intensity_mean - lesion_true.intensity_mean)
    # exact for the added voxels' own mean (the identity behind the formula) ...
    ring = case.image.array_zyx[grown & ~lesion].astype(np.float64).mean()
    assert shift == pytest.approx(eps * (ring - lesion_true.intensity_mean), rel=1e-9)
    # ... and within 5 % from the tissue means alone (the rim is partly blurred lesion: partial volume)
    assert shift == pytest.approx(predicted, rel=0.05)
    assert abs(shift) > 15.0  # tens of HU: the bias a clinician's ROI mean carries
    assert lesion_measured.volume_mm3 == pytest.approx(lesion_true.volume_mm3 / (1 - eps), rel=1e-9)


def test_an_undersegmented_lesion_barely_moves_its_mean():
    """Missing the rim removes lesion voxels only: the mean moves by far less than one voxel of overgrowth does."""
    from scipy import ndimage

    case = phantoms.generate_phantom(seed=11, shape_zyx=(40, 96, 96), n_lesions=1, lesion_radius_mm=(9.0, 10.0))
    truth = case.labels.array_zyx
    lesion = truth == phantoms.LESION_LABEL
    segments = [SegmentInfo("liver lesion", phantoms.LESION_LABEL)]
    (true_row,) = measurements.measure_segments(case.labels, segments, intensity=case.image)
    shifts = {}
    for name, mask in (("eroded", ndimage.binary_erosion(lesion)), ("grown", ndimage.binary_dilation(lesion))):
        (row,) = measurements.measure_segments(
            case.labels.with_array(np.where(mask, phantoms.LESION_LABEL, 0).astype(np.uint8)), segments, intensity=case.image
        )
        shifts[name] = row.intensity_mean - true_row.intensity_mean
    assert abs(shifts["eroded"]) < 0.1 * abs(shifts["grown"])


def test_measurement_io_is_on_the_image_grid(tmp_path):
    case = phantoms.generate_phantom(seed=2, shape_zyx=(16, 32, 32), spacing_xyz_mm=(0.8, 0.8, 2.0), origin_lps=(3, 4, 5))
    path = io.write_image(case.labels, tmp_path / "labels.nrrd")
    labels = io.read_image(path)
    (row, _) = measurements.measure_segments(labels, [label.segment_info() for label in phantoms.PHANTOM_LABELS])
    assert row.volume_ml == pytest.approx((case.labels.array_zyx == 1).sum() * 0.8 * 0.8 * 2.0 / 1000)


@pytest.mark.parametrize("shape", ["blob", "flat", "single voxel"])
def test_the_convex_hull_feret_diameter_equals_itks_all_pairs_search(shape):
    """The same number as ITK's GetFeretDiameter (which compares every boundary pair: minutes on an organ)."""
    import SimpleITK as sitk
    from scipy import ndimage

    rng = np.random.default_rng(7)
    if shape == "blob":
        mask = ndimage.gaussian_filter(rng.random((20, 30, 30)), 2) > 0.52
        mask[0] = False
    elif shape == "flat":  # one slice: a plane set of points, where the plain 3D hull fails
        mask = np.zeros((6, 30, 30), bool)
        mask[3, 4:25, 10] = mask[3, 12, 2:28] = True
    else:
        mask = np.zeros((5, 5, 5), bool)
        mask[2, 2, 2] = True
    angle = np.deg2rad(20)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    grid = Volume(mask.astype(np.uint8), (0.7, 0.9, 2.5), (1.0, 2.0, 3.0), tuple(direction.ravel()))
    itk = sitk.LabelShapeStatisticsImageFilter()
    itk.ComputeFeretDiameterOn()
    itk.Execute(sitk.Cast(grid.to_sitk(), sitk.sitkUInt32))
    assert measurements.feret_diameter_mm(mask, grid) == pytest.approx(itk.GetFeretDiameter(1), abs=1e-9)
    # a crop and its offset give the same answer as the whole grid
    box = ndimage.find_objects(mask.astype(int))[0]
    cropped = measurements.feret_diameter_mm(mask[box], grid, [s.start for s in box])
    assert cropped == pytest.approx(itk.GetFeretDiameter(1), abs=1e-9)


def test_a_region_is_measured_as_the_segment_its_values_make_together():
    # a region-based nnU-Net model's "whole tumor" (values 1, 2, 3) measured as one segment of the merged labelmap
    case = phantoms.generate_phantom(seed=4, shape_zyx=(24, 40, 40), spacing_xyz_mm=(1.2, 1.2, 2.5))
    labels = case.labels.array_zyx.astype(np.uint8)
    assert set(np.unique(labels)) == {0, 1, 2}
    segments = [SegmentInfo(name="liver", label_value=1), SegmentInfo(name="liver lesion", label_value=2)]
    rows = measurements.measure_segments(
        case.labels.with_array(labels), segments, intensity=case.image, regions=[("liver and lesions", [1, 2])]
    )
    merged = measurements.measure_segments(
        case.labels.with_array((labels > 0).astype(np.uint8)), [SegmentInfo(name="x", label_value=1)], intensity=case.image
    )[0]
    region = rows[-1]
    assert region.segment == "liver and lesions (values 1, 2)" and region.label_value is None
    for field, value in merged.__dict__.items():
        if field not in ("segment", "label_value"):
            assert getattr(region, field) == pytest.approx(value, rel=1e-12, nan_ok=True), field
    assert measurements.measurements_csv(rows).splitlines()[-1].startswith('"liver and lesions (values 1, 2)",,0,0,')
