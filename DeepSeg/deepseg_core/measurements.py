"""Per-segment and per-instance measurements: size, shape, position and the input's intensities.

Conventions follow Slicer's Segment Statistics module so numbers can be compared with it:

- volumes from the voxel count (labelmap representation): ``Volume [mm3]`` and ``Volume [cm3]``
  (1 cm^3 = 1 ml);
- ``Surface area [mm2]``: ITK's estimate from the binary labelmap (Crofton / Cauchy formula on the
  voxel boundary, as Segment Statistics' labelmap plugin), not the area of the blocky voxel faces;
- ``Feret diameter [mm]``: the largest distance between two boundary voxel centres (the maximum 3D
  diameter, as RECIST-style measurements want it in 3D), found on their convex hull (the same
  number as ITK's all-pairs search, in seconds instead of minutes for an organ);
- ``Sphericity``: ``pi^(1/3) (6 V)^(2/3) / A`` (1 for a sphere, lower for elongated or ragged shapes);
- centroids are given both in RAS (Slicer's world coordinates) and LPS (DICOM / ITK), in mm;
- intensity statistics are of the input image voxels inside the segment, in the image's units (HU
  for CT); percentiles use linear interpolation. An image of several channels (MR sequences) gets
  them per channel, titled with the channel's name (``Mean (FLAIR)``).

Instances of "thing" classes (lesions) are measured one by one; a class row carries the instance
count of that class.
"""

from __future__ import annotations

import csv
import io as _io
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import ImageError
from .fileutil import atomic_path
from .io import SegmentInfo, Volume
from .model_card import region_title

#: percentiles reported for intensities (Segment Statistics' scalar plugin reports 5 and 95 too).
PERCENTILES = (5.0, 25.0, 50.0, 75.0, 95.0)
_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class SegmentMeasurement:
    """One row: a whole segment (``instance == 0``), one instance of a thing class, or a region of
    several label values (a region-based nnU-Net model's "whole tumor": ``label_value`` None).

    Lengths in mm, areas in mm^2, volumes in mm^3 and ml; intensities in the input image's units.
    Intensity fields are NaN when no input image was given. With several input channels the
    ``intensity_*`` fields are the first channel's and ``channel_intensities`` holds every channel's
    (channel name -> the same ``intensity_*`` keys); with one it is empty.
    """

    segment: str
    label_value: int | None
    instance: int
    instance_count: int
    voxel_count: int
    volume_mm3: float
    volume_ml: float
    surface_area_mm2: float
    feret_diameter_mm: float
    sphericity: float
    centroid_r_mm: float
    centroid_a_mm: float
    centroid_s_mm: float
    centroid_l_mm: float
    centroid_p_mm: float
    centroid_s_lps_mm: float
    intensity_mean: float
    intensity_std: float
    intensity_min: float
    intensity_max: float
    intensity_p05: float
    intensity_p25: float
    intensity_median: float
    intensity_p75: float
    intensity_p95: float
    channel_intensities: dict[str, dict[str, float]] = field(default_factory=dict, hash=False)

    @property
    def centroid_ras_mm(self) -> tuple[float, float, float]:
        return (self.centroid_r_mm, self.centroid_a_mm, self.centroid_s_mm)


#: display titles (Slicer Segment Statistics style, with units), in column order.
COLUMN_TITLES: dict[str, str] = {
    "segment": "Segment",
    "label_value": "Label value",
    "instance": "Instance",
    "instance_count": "Instance count",
    "voxel_count": "Number of voxels [voxels]",
    "volume_mm3": "Volume [mm3]",
    "volume_ml": "Volume [cm3]",
    "surface_area_mm2": "Surface area [mm2]",
    "feret_diameter_mm": "Feret diameter [mm]",
    "sphericity": "Sphericity",
    "centroid_r_mm": "Centroid R [mm] (RAS)",
    "centroid_a_mm": "Centroid A [mm] (RAS)",
    "centroid_s_mm": "Centroid S [mm] (RAS)",
    "centroid_l_mm": "Centroid L [mm] (LPS)",
    "centroid_p_mm": "Centroid P [mm] (LPS)",
    "centroid_s_lps_mm": "Centroid S [mm] (LPS)",
    "intensity_mean": "Mean",
    "intensity_std": "Standard deviation",
    "intensity_min": "Minimum",
    "intensity_max": "Maximum",
    "intensity_p05": "Percentile 5",
    "intensity_p25": "Percentile 25",
    "intensity_median": "Median",
    "intensity_p75": "Percentile 75",
    "intensity_p95": "Percentile 95",
}


#: the intensity fields, in column order; with several channels each gets one column per channel.
INTENSITY_KEYS: tuple[str, ...] = tuple(key for key in COLUMN_TITLES if key.startswith("intensity_"))
_CHANNEL_TITLE = re.compile(r"(.+?) \((.+)\)")


def measurement_record(row: SegmentMeasurement) -> dict[str, Any]:
    """The row as the CSV and Slicer's table give it: field name -> value, in column order. With several channels
    the intensity columns are per channel, keyed ``"intensity_mean (FLAIR)"``, in the channels' order."""
    record = asdict(row)
    by_channel = record.pop("channel_intensities")
    if by_channel:
        for key in INTENSITY_KEYS:
            del record[key]
        for name, stats in by_channel.items():
            record.update({f"{key} ({name})": stats[key] for key in INTENSITY_KEYS})
    return record


def column_title(key: str) -> str:
    """The display title of a :func:`measurement_record` key: :data:`COLUMN_TITLES`, or for a channel's
    intensity column its title and the channel (``"intensity_mean (FLAIR)"`` -> ``"Mean (FLAIR)"``)."""
    if key in COLUMN_TITLES:
        return COLUMN_TITLES[key]
    match = _CHANNEL_TITLE.fullmatch(key)
    if match is None or match[1] not in INTENSITY_KEYS:
        raise KeyError(f"no measurement column {key!r}")
    return f"{COLUMN_TITLES[match[1]]} ({match[2]})"


def intensity_statistics(values: np.ndarray) -> dict[str, float]:
    """Mean, standard deviation, min, max and :data:`PERCENTILES` of ``values`` (NaN when empty).

    The standard deviation is the sample one (n - 1), 0 for a single value, as Slicer's Segment Statistics
    (``vtkImageAccumulate``) gives it. Percentiles interpolate linearly between values (numpy's default);
    Slicer's are read from a histogram with unit-wide bins, and come out about one bin lower (README: Measurements).
    """
    keys = ("intensity_mean", "intensity_std", "intensity_min", "intensity_max")
    pct_keys = ("intensity_p05", "intensity_p25", "intensity_median", "intensity_p75", "intensity_p95")
    if values.size == 0:
        return dict.fromkeys(keys + pct_keys, math.nan)
    values = values.astype(np.float64, copy=False)
    pct = np.percentile(values, PERCENTILES)
    return {
        "intensity_mean": float(values.mean()),
        "intensity_std": float(values.std(ddof=1)) if values.size > 1 else 0.0,
        "intensity_min": float(values.min()),
        "intensity_max": float(values.max()),
        **{k: float(v) for k, v in zip(pct_keys, pct, strict=True)},
    }


def _shape_rows(ids_zyx: np.ndarray, grid: Volume) -> dict[int, dict[str, float]]:
    """Volume, surface, sphericity and centroid of every non-zero id in ``ids_zyx`` (one ITK pass).

    ITK's own Feret diameter is not asked for: it compares every pair of boundary voxels (minutes on
    a liver-sized segment); :func:`feret_diameter_mm` gives the same number from the convex hull.
    """
    image = grid.with_array(ids_zyx.astype(np.uint32)).to_sitk()
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.ComputePerimeterOn()
    shape.Execute(image)
    out = {}
    for label in shape.GetLabels():
        volume = float(shape.GetPhysicalSize(label))
        area = float(shape.GetPerimeter(label))
        centroid_lps = np.array(shape.GetCentroid(label), dtype=float)
        centroid_ras = centroid_lps * _LPS_TO_RAS
        sphericity = math.pi ** (1 / 3) * (6 * volume) ** (2 / 3) / area if area > 0 else math.nan
        out[int(label)] = {
            "voxel_count": int(shape.GetNumberOfPixels(label)),
            "volume_mm3": volume,
            "volume_ml": volume / 1000.0,
            "surface_area_mm2": area,
            "sphericity": float(sphericity),
            "centroid_r_mm": float(centroid_ras[0]),
            "centroid_a_mm": float(centroid_ras[1]),
            "centroid_s_mm": float(centroid_ras[2]),
            "centroid_l_mm": float(centroid_lps[0]),
            "centroid_p_mm": float(centroid_lps[1]),
            "centroid_s_lps_mm": float(centroid_lps[2]),
        }
    return out


#: largest number of hull vertices compared pairwise at once (bounds the distance matrix's memory).
_FERET_CHUNK = 2048


def feret_diameter_mm(mask_zyx: np.ndarray, grid: Volume, offset_zyx: Sequence[int] = (0, 0, 0)) -> float:
    """Largest distance in mm between the centres of two voxels of ``mask_zyx`` (maximum 3D diameter).

    The same quantity as ITK's ``GetFeretDiameter`` (boundary voxel centres in physical space), found
    on the convex hull of the boundary voxels: the farthest pair of a point set is a pair of its
    hull vertices, so the cost is that of the hull (seconds for a whole liver), not of all pairs.

    Args:
        mask_zyx: boolean mask ``(Z, Y, X)``, usually the segment's bounding box crop.
        grid: the image geometry the mask's voxel indices refer to.
        offset_zyx: index of ``mask_zyx[0, 0, 0]`` in ``grid`` (the crop's start).
    """
    from scipy.spatial import ConvexHull, QhullError

    mask = np.asarray(mask_zyx, bool)
    boundary = mask & ~ndimage.binary_erosion(mask, border_value=0)
    index_zyx = np.argwhere(boundary) + np.asarray(offset_zyx, dtype=np.int64)
    if len(index_zyx) < 2:
        return 0.0
    spacing = np.asarray(grid.spacing_xyz_mm, dtype=float)
    points = (index_zyx[:, ::-1] * spacing) @ np.asarray(grid.direction_lps, dtype=float).reshape(3, 3).T
    if len(points) > 64:
        try:
            points = points[ConvexHull(points).vertices]
        except QhullError:  # flat or collinear sets (one slice, one row): joggled input finds the hull
            points = points[ConvexHull(points, qhull_options="QJ").vertices]
    best = 0.0
    for start in range(0, len(points), _FERET_CHUNK):
        block = points[start : start + _FERET_CHUNK]
        squared = ((block[:, None, :] - points[None, start:, :]) ** 2).sum(axis=-1)
        best = max(best, float(squared.max()))
    return math.sqrt(best)


def _empty_shape() -> dict[str, float]:
    return {
        "voxel_count": 0,
        "volume_mm3": 0.0,
        "volume_ml": 0.0,
        **dict.fromkeys(
            (
                "surface_area_mm2",
                "feret_diameter_mm",
                "sphericity",
                "centroid_r_mm",
                "centroid_a_mm",
                "centroid_s_mm",
                "centroid_l_mm",
                "centroid_p_mm",
                "centroid_s_lps_mm",
            ),
            math.nan,
        ),
    }


def measure_segments(
    labels: Volume,
    segments: Sequence[SegmentInfo],
    *,
    intensity: Volume | None = None,
    intensity_channels: Sequence[tuple[str, Volume]] = (),
    instance_ids_zyx: np.ndarray | None = None,
    thing_values: Sequence[int] = (),
    regions: Sequence[tuple[str, Sequence[int]]] = (),
) -> list[SegmentMeasurement]:
    """Measure every segment of a labelmap, every instance of the thing classes, and each region.

    Args:
        labels: label values on the image grid, ``array_zyx`` of shape ``(Z, Y, X)``.
        segments: the segments to report (name and label value); a segment with no voxel gets a
            row with zero volume and NaN shape values.
        intensity: the input image on the same grid, for intensity statistics (optional).
        intensity_channels: instead of ``intensity``, every channel of a multi-channel input as ``(name,
            image)``, each on the same grid: the rows' ``intensity_*`` are the first's, and
            ``channel_intensities`` holds each channel's.
        instance_ids_zyx: instance ids ``(Z, Y, X)`` (0 = none) of the thing classes, or None.
        thing_values: label values whose instances are measured one by one.
        regions: ``(name, label values)`` of regions measured as the union of their values (a region-based
            nnU-Net model's "whole tumor": 1, 2, 3); each row is named ``"<name> (values 1, 2, 3)"`` and has
            no label value.

    Returns:
        One row per segment, in ``segments`` order, each followed by its instances (largest first);
        then one row per region.
    """
    if intensity is not None and intensity_channels:
        raise ImageError("give the intensity image or its channels, not both", hint="Pass intensity_channels alone.")
    channels = list(intensity_channels) or ([("", intensity)] if intensity is not None else [])
    names = [name for name, _ in channels]
    if len(channels) > 1 and (len(set(names)) != len(names) or not all(names)):
        raise ImageError("the intensity channels need distinct names", expected="one name per channel", found=str(names))
    for name, image in channels:
        if not image.same_grid(labels):
            raise ImageError(
                f"the intensity image{f' (channel {name})' if name else ''} is not on the segmentation's grid",
                expected=f"shape {labels.shape_zyx}, spacing {labels.spacing_xyz_mm} mm",
                found=f"shape {image.shape_zyx}, spacing {image.spacing_xyz_mm} mm",
                hint="Measure against the image that was segmented (or resample it first).",
            )
    if instance_ids_zyx is not None and instance_ids_zyx.shape != labels.shape_zyx:
        raise ImageError("instance ids and labels differ in shape", found=f"{instance_ids_zyx.shape} vs {labels.shape_zyx}")
    array = labels.array_zyx
    if instance_ids_zyx is not None and len(thing_values):
        # components below the instance size floor are no instance, and the instance segmentation drops their
        # voxels: the class row measures what its instances show, so that it equals their sum
        dropped = np.isin(array, list(thing_values)) & (instance_ids_zyx == 0)
        if dropped.any():
            array = np.where(dropped, 0, array).astype(array.dtype, copy=False)
    values = [(name, np.asarray(image.array_zyx)) for name, image in channels]
    class_shapes = _shape_rows(array, labels)
    class_boxes = ndimage.find_objects(array.astype(np.int32, copy=False))
    instance_shapes = _shape_rows(instance_ids_zyx, labels) if instance_ids_zyx is not None else {}
    instance_boxes = ndimage.find_objects(instance_ids_zyx.astype(np.int32, copy=False)) if instance_ids_zyx is not None else []
    rows: list[SegmentMeasurement] = []
    for seg in segments:
        box = class_boxes[seg.label_value - 1] if 0 < seg.label_value <= len(class_boxes) else None
        shape = dict(class_shapes.get(seg.label_value, _empty_shape()))
        stats = _intensities(values, None)
        instance_rows = []
        if box is not None:
            mask = array[box] == seg.label_value
            shape["feret_diameter_mm"] = feret_diameter_mm(mask, labels, [s.start for s in box])
            stats = _intensities(values, lambda voxels, box=box, mask=mask: voxels[box][mask])
            if instance_ids_zyx is not None and seg.label_value in thing_values:
                ids = np.unique(instance_ids_zyx[box][mask])
                for instance_id in ids[ids > 0]:
                    instance_rows.append(
                        _instance_row(int(instance_id), instance_ids_zyx, instance_boxes, instance_shapes, labels, values)
                    )
                instance_rows.sort(key=lambda r: -r[0]["volume_mm3"])
        rows.append(
            SegmentMeasurement(
                segment=seg.name,
                label_value=seg.label_value,
                instance=0,
                instance_count=len(instance_rows),
                **shape,
                **stats,
            )
        )
        for number, (inst_shape, inst_stats) in enumerate(instance_rows, start=1):
            rows.append(
                SegmentMeasurement(
                    segment=f"{seg.name} {number}",
                    label_value=seg.label_value,
                    instance=number,
                    instance_count=0,
                    **inst_shape,
                    **inst_stats,
                )
            )
    for name, region_values in regions:
        rows.append(_region_row(name, [int(v) for v in region_values], array, labels, values))
    return rows


ChannelVoxels = list[tuple[str, np.ndarray]]


def _intensities(channels: ChannelVoxels, select: Callable[[np.ndarray], np.ndarray] | None) -> dict[str, Any]:
    """The ``intensity_*`` fields (the first channel's) and ``channel_intensities`` (every channel's, when there
    are several) of the voxels ``select`` takes from each channel's array (None: no voxel)."""
    by_channel = {name: intensity_statistics(select(voxels) if select else np.empty(0)) for name, voxels in channels}
    first = next(iter(by_channel.values()), None) or intensity_statistics(np.empty(0))
    return {**first, "channel_intensities": by_channel if len(channels) > 1 else {}}


def _region_row(
    name: str, region_values: list[int], array: np.ndarray, grid: Volume, values: ChannelVoxels
) -> SegmentMeasurement:
    """The row of the union of ``region_values`` in ``array`` (one more pass over the labels per region)."""
    mask = np.isin(array, region_values)
    shape = dict(_shape_rows(mask, grid).get(1, _empty_shape()))
    stats = _intensities(values, None)
    box = ndimage.find_objects(mask.astype(np.int8))
    if box:
        crop = mask[box[0]]
        shape["feret_diameter_mm"] = feret_diameter_mm(crop, grid, [s.start for s in box[0]])
        stats = _intensities(values, lambda voxels: voxels[box[0]][crop])
    return SegmentMeasurement(
        segment=region_title(name, region_values), label_value=None, instance=0, instance_count=0, **shape, **stats
    )


def _instance_row(
    instance_id: int,
    instance_ids_zyx: np.ndarray,
    boxes: list,
    shapes: dict[int, dict[str, float]],
    grid: Volume,
    values: ChannelVoxels,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Shape (with Feret diameter) and intensity statistics of one instance, from its bounding box."""
    box = boxes[instance_id - 1]
    mask = instance_ids_zyx[box] == instance_id
    shape = {**shapes[instance_id], "feret_diameter_mm": feret_diameter_mm(mask, grid, [s.start for s in box])}
    return shape, _intensities(values, lambda voxels: voxels[box][mask])


def measurements_csv(rows: Sequence[SegmentMeasurement]) -> str:
    """CSV text with the :data:`COLUMN_TITLES` header, the intensity titles per channel with several channels
    (:func:`column_title`); floats with 6 significant digits."""
    records = [measurement_record(row) for row in rows]
    keys = list(records[0]) if records else list(COLUMN_TITLES)
    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(column_title(key) for key in keys)
    for record in records:
        writer.writerow(_format(record[key]) for key in keys)
    return buffer.getvalue()


def _format(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def write_measurements_csv(path: str | Path, rows: Sequence[SegmentMeasurement]) -> Path:
    """Write :func:`measurements_csv` to ``path`` all at once (a failed write leaves no partial file)."""
    path = Path(path)
    if not path.name.lower().endswith(".csv"):
        raise ImageError("unsupported measurement file type", subject=path, expected="a .csv file", found=path.name)
    if not path.parent.is_dir():
        raise ImageError("the output folder does not exist", subject=path.parent, hint="Create it first.")
    with atomic_path(path) as tmp:
        tmp.write_text(measurements_csv(rows), encoding="utf-8")
    return path


def read_measurements_csv(path: str | Path) -> list[dict[str, str]]:
    """Rows of a measurement CSV keyed as :func:`measurement_record` keys them (the inverse of the titles), values
    as text."""
    by_title = {title: key for key, title in COLUMN_TITLES.items()}

    def key_of(title: str) -> str:
        if title in by_title:
            return by_title[title]
        match = _CHANNEL_TITLE.fullmatch(title)
        if match is not None and by_title.get(match[1]) in INTENSITY_KEYS:
            return f"{by_title[match[1]]} ({match[2]})"
        raise ImageError(
            f"unknown measurement column {title!r}",
            subject=path,
            expected="a table written by DeepSeg (deepseg segment --stats)",
            found=title,
        )

    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        keys = {title: key_of(title) for title in reader.fieldnames or []}
        return [{keys[title]: value for title, value in row.items()} for row in reader]
