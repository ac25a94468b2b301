"""``measure_segments`` on all 116 AAL regions of Colin27: counts, volumes and mean intensities against numpy.

The atlas and the T1 share one 1 mm grid, so a region's volume is its voxel count times 1 mm^3.
The wall time of the 116-label measurement is printed (not asserted): the lead reports it.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from deepseg_core import io
from deepseg_core.measurements import measure_segments


@pytest.fixture(scope="module")
def aal_measured(aal_path, colin_t1_path, aal_names, aal_colors):
    atlas, t1 = io.read_image(aal_path), io.read_image(colin_t1_path)
    segments = [io.SegmentInfo(name=name, label_value=value, color_rgb=aal_colors[value]) for value, name in aal_names.items()]
    started = time.perf_counter()
    rows = measure_segments(atlas, segments, intensity=t1)
    seconds = time.perf_counter() - started
    return atlas, t1, segments, rows, seconds


def test_116_regions_measured(aal_measured, aal_names, record_property):
    atlas, _, segments, rows, seconds = aal_measured
    assert len(aal_names) == 116 and sorted(aal_names) == list(range(1, 117))
    assert set(np.unique(atlas.array_zyx)) == set(range(117))
    assert [r.segment for r in rows] == [s.name for s in segments]
    assert all(r.instance == 0 for r in rows)
    what = "116 AAL labels on Colin27 (181 x 217 x 181, with intensities)"
    record_property("realdata", f"measure_segments: {what} in {seconds:.2f} s")


def test_voxel_counts_and_volumes_equal_numpy(aal_measured):
    atlas, _, _, rows, _ = aal_measured
    counts = np.bincount(atlas.array_zyx.ravel(), minlength=117)
    voxel_mm3 = float(np.prod(atlas.spacing_xyz_mm))
    assert voxel_mm3 == 1.0
    for row in rows:
        assert row.voxel_count == counts[row.label_value]
        assert row.volume_mm3 == counts[row.label_value] * voxel_mm3
        assert row.volume_ml == counts[row.label_value] * voxel_mm3 / 1000.0
    assert sum(r.voxel_count for r in rows) == int(np.count_nonzero(atlas.array_zyx))


def test_intensity_means_equal_numpy(aal_measured):
    atlas, t1, _, rows, _ = aal_measured
    labels = atlas.array_zyx.ravel()
    counts = np.bincount(labels, minlength=117)
    sums = np.bincount(labels, weights=t1.array_zyx.ravel().astype(np.float64), minlength=117)
    # uint8 intensities: every partial sum is an integer below 2**53, so both sums are exact
    means = sums / counts
    for row in rows:
        assert row.intensity_mean == means[row.label_value], row.segment
        values = t1.array_zyx[atlas.array_zyx == row.label_value]
        assert (row.intensity_min, row.intensity_max) == (float(values.min()), float(values.max()))


def test_centroids_put_left_regions_left(aal_measured):
    """Measured RAS centroids: ``*_L`` regions at R < 0, ``*_R`` at R > 0 (LPS: the opposite sign)."""
    _, _, _, rows, _ = aal_measured
    for row in rows:
        if row.segment.endswith(("_L", "_R")):
            sign = -1 if row.segment.endswith("_L") else 1
            assert sign * row.centroid_r_mm > 5.0 and -sign * row.centroid_l_mm > 5.0, row


def test_two_channels_are_measured_each_under_its_name(aal_measured, tmp_path):
    """The real T1 and the same T1 inverted (an image whose regions' means all differ from the T1's) as two
    channels of one image: each channel's means equal numpy's, the first channel's equal the one-channel
    measurement, and the CSV titles each intensity column with its channel and reads back to the same numbers."""
    from deepseg_core.measurements import measurements_csv, read_measurements_csv

    atlas, t1, segments, one_channel, _ = aal_measured
    inverted = t1.with_array(255.0 - t1.array_zyx.astype(np.float64))
    rows = measure_segments(atlas, segments, intensity_channels=[("T1", t1), ("T1 (inverted)", inverted)])
    labels = atlas.array_zyx.ravel()
    counts = np.bincount(labels, minlength=117)
    for name, image in (("T1", t1), ("T1 (inverted)", inverted)):
        means = np.bincount(labels, weights=image.array_zyx.ravel().astype(np.float64), minlength=117) / counts
        for row in rows:
            assert row.channel_intensities[name]["intensity_mean"] == pytest.approx(means[row.label_value], rel=1e-12)
    for row, single in zip(rows, one_channel, strict=True):
        assert row.intensity_mean == single.intensity_mean and row.intensity_p95 == single.intensity_p95
        assert row.channel_intensities["T1"]["intensity_std"] == single.intensity_std
    header = measurements_csv(rows[:1]).splitlines()[0].split(",")
    assert "Mean" not in header and "Mean (T1)" in header and "Mean (T1 (inverted))" in header
    path = tmp_path / "stats.csv"
    path.write_text(measurements_csv(rows), encoding="utf-8")
    back = read_measurements_csv(path)
    assert float(back[5]["intensity_mean (T1 (inverted))"]) == pytest.approx(
        rows[5].channel_intensities["T1 (inverted)"]["intensity_mean"], rel=1e-5
    )
    assert float(back[5]["intensity_mean (T1)"]) == pytest.approx(rows[5].intensity_mean, rel=1e-5)


def test_percentiles_against_slicers_segment_statistics_filter(aal_measured, record_property):
    """Slicer's Segment Statistics reads the 5th and 95th percentiles and the median from
    ``vtkImageHistogramStatistics`` over the segment's stencil (unit-wide bins on integer images). On the 116
    regions they come out one bin below DeepSeg's exact sample percentiles: VTK's median is the last bin whose
    cumulative count is still at most half, the bin below the one that holds the median."""
    import vtk
    from vtk.util import numpy_support

    atlas, t1, _, rows, _ = aal_measured

    def vtk_image(array_zyx: np.ndarray) -> vtk.vtkImageData:
        image = vtk.vtkImageData()
        z, y, x = array_zyx.shape
        image.SetDimensions(x, y, z)
        flat = np.ascontiguousarray(array_zyx).ravel()
        image.GetPointData().SetScalars(
            numpy_support.numpy_to_vtk(flat, deep=True, array_type=numpy_support.get_vtk_array_type(flat.dtype))
        )
        return image

    intensities, labels = vtk_image(t1.array_zyx), vtk_image(atlas.array_zyx.astype(np.int16))
    differences: dict[str, list[float]] = {"p05": [], "median": [], "p95": []}
    for row in rows:
        stencil = vtk.vtkImageToImageStencil()
        stencil.SetInputData(labels)
        stencil.ThresholdBetween(row.label_value - 0.5, row.label_value + 0.5)
        stencil.Update()
        histogram = vtk.vtkImageHistogramStatistics()  # as ScalarVolumeSegmentStatisticsPlugin sets it up
        histogram.SetInputData(intensities)
        histogram.SetStencilData(stencil.GetOutput())
        histogram.SetAutoRangePercentiles(5, 95)
        histogram.SetAutoRangeExpansionFactors(0, 0)
        histogram.Update()
        assert histogram.GetTotal() == row.voxel_count and histogram.GetMean() == pytest.approx(row.intensity_mean, abs=1e-9)
        low, high = histogram.GetAutoRange()
        differences["p05"].append(row.intensity_p05 - low)
        differences["median"].append(row.intensity_median - histogram.GetMedian())
        differences["p95"].append(row.intensity_p95 - high)
    for name, values in differences.items():
        assert 0.0 <= min(values) and max(values) <= 1.5, name  # never above DeepSeg's, at most a bin and a half below
        record_property(
            "realdata",
            f"116 AAL regions, DeepSeg minus Slicer's Segment Statistics {name}: {min(values):.2f} to {max(values):.2f}"
            f" (mean {np.mean(values):.3f}) intensity units",
        )
    assert all(value == 1.0 for value in differences["median"])
