"""Score a segmentation against a reference, per segment (``deepseg compare``).

Either side may be a Slicer ``.seg.nrrd`` (segments by name) or a label map image (NIfTI, NRRD, MHA:
one integer value per voxel), such as a case of a DeepSeg or nnU-Net dataset (``labelsTr/*.nii.gz``)
or an nnU-Net prediction. A label map's values are named by an nnU-Net / DeepSeg ``dataset.json``
(labels, or nnU-Net's regions: a name for several values, such as BraTS's tumour core):
given with ``labels_json``, or found two folders up when the label map sits in the dataset's
``labelsTr`` / ``labelsTs``; a predicted label map elsewhere takes the reference's table. Segments
are matched by name. Voxels that the reference marks with the
dataset's ``ignore`` label are left out of every metric, as nnU-Net's evaluation does.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from . import io, metrics
from .errors import DeepSegError, ImageError

log = logging.getLogger("deepseg.compare")

#: the folders of an nnU-Net / DeepSeg dataset that hold label maps; ``dataset.json`` is beside them
LABEL_FOLDERS = ("labelsTr", "labelsTs", "labelsVal")


@dataclasses.dataclass(frozen=True)
class LabelTable:
    """What a ``dataset.json`` says about label values.

    Attributes:
        segments: label values by segment name, in the file's order (background excluded): one value
            for a label, several for an nnU-Net region (the union of those labels' voxels).
        ignore_value: the value of nnU-Net's ``ignore`` label, or None.
        source: the file it was read from.
    """

    segments: dict[str, tuple[int, ...]]
    ignore_value: int | None
    source: Path

    @property
    def region_based(self) -> bool:
        """True when a segment is a region of several values (nnU-Net's region-based training, e.g.
        BraTS's whole tumour, tumour core, enhancing tumour): its segments then overlap."""
        return any(len(values) > 1 for values in self.segments.values())

    @property
    def values(self) -> set[int]:
        """Every value a label map named by this table may hold: background, the segments', ignore."""
        ignore = {self.ignore_value} if self.ignore_value is not None else set()
        return {0, *ignore, *(v for values in self.segments.values() for v in values)}


def _label_values(path: Path, name: str, value: Any) -> tuple[int, ...]:
    """A label's value(s) as a tuple: an integer, or (nnU-Net regions) a non-empty list of integers."""
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise ImageError(
            f"label {name!r} is not a label value or a region",
            subject=path,
            expected="an integer >= 0, or a non-empty list of them (an nnU-Net region)",
            found=repr(value),
        )
    return tuple(dict.fromkeys(values))


def read_label_table(dataset_json: str | Path) -> LabelTable:
    """The label names of an nnU-Net v2 / DeepSeg ``dataset.json``: ``"labels": {name: value}``, or
    nnU-Net's region-based ``{name: [value, ...]}`` (a name for the union of those labels), with an
    optional integer ``ignore``. Entries whose values are all 0 (background) name no segment, as in
    nnU-Net's ``LabelManager``.

    Raises:
        ImageError: the file is missing or not JSON, has no label table, a label is neither an
            integer nor a list of them, ``ignore`` is not one integer, or two names name the same values.
    """
    path = Path(dataset_json)
    try:
        table = json.loads(path.read_text(encoding="utf-8")).get("labels")
    except FileNotFoundError:
        raise ImageError("file not found", subject=path, hint="Pass the dataset's dataset.json with --labels.") from None
    except (OSError, ValueError, AttributeError) as exc:
        raise ImageError("cannot be read as a dataset.json", subject=path, found=str(exc).splitlines()[0]) from exc
    if not isinstance(table, dict) or not table:
        raise ImageError(
            "has no label table", subject=path, expected='"labels": {"background": 0, "liver": 1, ...}', found=repr(table)
        )
    segments: dict[str, tuple[int, ...]] = {}
    named: dict[tuple[int, ...], str] = {}
    ignore_value = None
    for name, value in table.items():
        values = _label_values(path, name, value)
        if name == "ignore":
            if len(values) != 1 or isinstance(value, list):
                raise ImageError("the ignore label is not one integer", subject=path, found=repr(value))
            ignore_value = values[0]
            continue
        if set(values) == {0}:
            continue
        same = tuple(sorted(values))
        if same in named:
            raise ImageError(f"values {list(same)} have two names", subject=path, found=f"{named[same]!r} and {name!r}")
        named[same] = str(name)
        segments[str(name)] = values
    return LabelTable(segments=segments, ignore_value=ignore_value, source=path)


def _table_for(path: Path, labels_json: Path | None, fallback: LabelTable | None = None) -> LabelTable:
    if labels_json is not None:
        return read_label_table(labels_json)
    beside = path.parent.parent / "dataset.json"
    if path.parent.name in LABEL_FOLDERS and beside.is_file():
        log.info("%s: label names from %s", path, beside)
        return read_label_table(beside)
    if fallback is not None:
        log.info("%s: label names from %s (the reference's)", path, fallback.source)
        return fallback
    raise ImageError(
        "is a label map, and nothing names its values",
        subject=path,
        expected=f"a dataset.json (given with --labels, or beside the {' / '.join(LABEL_FOLDERS)} folder that holds it)",
        found="neither",
        hint="Pass --labels path/to/dataset.json, or compare .seg.nrrd files, which name their segments.",
    )


def read_labelmap_segmentation(path: str | Path, table: LabelTable) -> io.Segmentation:
    """A label map image as an :class:`io.Segmentation`, one segment per name of ``table``.

    Layer 0 keeps every voxel value, ``ignore`` included (``array_zyx`` ``(L, Z, Y, X)``, int32). With
    labels, each segment is its value in layer 0 (``L = 1``). With nnU-Net regions, which overlap,
    segment ``i`` is layer ``i + 1``: 1 where the voxel's value is one of the region's, as nnU-Net's
    ``region_or_label_to_mask`` (``L`` = regions + 1).

    Raises:
        ImageError: the voxels are not whole numbers, or a value is neither named nor background/ignore.
    """
    path = Path(path)
    volume = io.read_image(path)
    array = volume.array_zyx
    if not np.issubdtype(array.dtype, np.integer):
        if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
            raise ImageError(
                "is not a label map", subject=path, expected="whole-number voxel values", found=f"{array.dtype} with fractions"
            )
    label_map = array.astype(np.int32)
    known = table.values
    unknown = sorted(v for v in _values_present(label_map) if v not in known)
    if unknown:
        raise ImageError(
            "holds label values its label table does not name",
            subject=path,
            expected=f"values {sorted(known)} ({table.source})",
            found=f"{unknown}",
            hint="Pass the dataset.json of the dataset this label map belongs to with --labels.",
        )
    if not table.region_based:
        by_value = sorted(table.segments.items(), key=lambda item: item[1])
        segments = tuple(io.SegmentInfo(name=name, label_value=values[0]) for name, values in by_value)
        return io.Segmentation(layers=volume.with_array(label_map[np.newaxis]), segments=segments)
    layers = np.zeros((len(table.segments) + 1, *label_map.shape), dtype=np.int32)
    layers[0] = label_map
    for layer, region in enumerate(table.segments.values(), start=1):
        layers[layer] = np.isin(label_map, region)
    segments = tuple(io.SegmentInfo(name=name, label_value=1, layer=layer) for layer, name in enumerate(table.segments, start=1))
    return io.Segmentation(layers=volume.with_array(layers), segments=segments)


def _values_present(label_map: np.ndarray) -> list[int]:
    """The values in an integer label map, ascending. Where they are small and not negative, from the
    classes' boxes, one pass (0.3 s for a 512 x 512 x 300 CT; ``np.unique`` sorts or hashes: 1.2 s)."""
    if not label_map.size:
        return []
    lowest, highest = int(label_map.min()), int(label_map.max())
    if lowest < 0 or highest >= 1 << 16:
        return [int(v) for v in np.unique(label_map)]
    return [0] * (lowest == 0) + sorted(io.class_boxes(label_map, range(1, highest + 1)))


def read_for_compare(
    path: str | Path, labels_json: str | Path | None = None, fallback: LabelTable | None = None
) -> tuple[io.Segmentation, LabelTable | None]:
    """A ``.seg.nrrd`` or a label map as a segmentation, and the label table that named the label
    map (None for a ``.seg.nrrd``). ``fallback`` names a label map that nothing else names."""
    path = Path(path)
    if io.is_segmentation_file(path):
        return io.read_segmentation(path), None
    table = _table_for(path, Path(labels_json) if labels_json is not None else None, fallback)
    return read_labelmap_segmentation(path, table), table


def compare_files(
    prediction: str | Path,
    reference: str | Path,
    *,
    labels_json: str | Path | None = None,
    tolerance_mm: float = 2.0,
) -> dict[str, dict[str, Any]]:
    """Per reference segment, the metrics of the prediction's segment of the same name
    (:func:`metrics.compute_all`: Dice, IoU, precision, recall, HD95 and ASSD in mm, surface Dice at
    ``tolerance_mm``, volumes in ml). A segment the prediction lacks is scored as empty (logged).

    Either file may be cropped to its segments' extent (Slicer's "Crop to minimum extent"): both are
    then compared on the box of their shared voxel lattice that covers both.

    Raises:
        ImageError: a file cannot be read, a label map cannot be named, or the grids share no lattice.
    """
    ref, reference_table = read_for_compare(reference, labels_json)
    pred, _ = read_for_compare(prediction, labels_json, fallback=reference_table)
    ignore_value = reference_table.ignore_value if reference_table is not None else None
    if not pred.grid.same_grid(ref.grid):
        common = io.union_grid(ref.grid, pred.grid)
        if common is None:
            raise DeepSegError(
                "the two segmentations are on different voxel grids",
                expected=f"the reference's grid (spacing {ref.grid.spacing_xyz_mm}, origin {ref.grid.origin_lps}) "
                "or a box of it (same spacing and direction, origin a whole number of voxels away)",
                found=f"shape {pred.grid.shape_zyx}, spacing {pred.grid.spacing_xyz_mm}, origin {pred.grid.origin_lps}",
                hint="Resample the prediction onto the reference image first.",
            )
        pred = dataclasses.replace(pred, layers=io.place_on_grid(pred.layers, common, prediction))
        ref = dataclasses.replace(ref, layers=io.place_on_grid(ref.layers, common, reference))
    scored = None if ignore_value is None else ref.layers.array_zyx[0] != ignore_value
    if scored is not None:
        log.info("%d voxels carry the ignore label %d: left out", int(scored.size - np.count_nonzero(scored)), ignore_value)
    predicted_names = {s.name for s in pred.segments}
    reference_boxes, predicted_boxes = _segment_boxes(ref), _segment_boxes(pred)
    result: dict[str, dict[str, Any]] = {}
    for segment in ref.segments:
        if segment.name not in predicted_names:
            log.warning("segment %r is missing from the prediction; scored as empty", segment.name)
        # Outside the box around both segments both masks are empty, so every metric is the whole
        # array's (a pass over a 512 x 512 x 300 CT per segment and mask is what this saves). Two empty
        # segments are scored on one empty voxel: the same numbers as on any empty array.
        box = _union_box(reference_boxes.get(segment.name), predicted_boxes.get(segment.name)) or (slice(0, 1),) * 3
        reference_mask = _mask_in_box(ref, segment.name, box)
        predicted_mask = (
            _mask_in_box(pred, segment.name, box) if segment.name in predicted_names else np.zeros_like(reference_mask)
        )
        if scored is not None:
            predicted_mask, reference_mask = predicted_mask & scored[box], reference_mask & scored[box]
        scores = metrics.compute_all(predicted_mask, reference_mask, ref.grid.spacing_zyx_mm, tolerance_mm)
        result[segment.name] = scores.as_dict()
    return result


def _segment_boxes(segmentation: io.Segmentation) -> dict[str, tuple[slice, ...]]:
    """Segment name -> the bounding box of its voxels (segments without voxels are left out), one pass per layer."""
    boxes: dict[str, tuple[slice, ...]] = {}
    layers = segmentation.layers.array_zyx
    for layer in range(layers.shape[0]):
        held = [s for s in segmentation.segments if s.layer == layer]
        found = io.class_boxes(layers[layer], [s.label_value for s in held]) if held else {}
        boxes.update({s.name: found[s.label_value] for s in held if s.label_value in found})
    return boxes


def _union_box(first: tuple[slice, ...] | None, second: tuple[slice, ...] | None) -> tuple[slice, ...] | None:
    if first is None or second is None:
        return first or second
    return tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(first, second, strict=True))


def _mask_in_box(segmentation: io.Segmentation, name: str, box: tuple[slice, ...]) -> np.ndarray:
    segment = segmentation.segment(name)
    return segmentation.layers.array_zyx[segment.layer][box] == segment.label_value


#: what a case's file may end with, longest first (``CASE.seg.nrrd`` before ``CASE.nrrd``)
CASE_SUFFIXES = (".seg.nrrd", *io.LABELMAP_SUFFIXES)


def _case_files(folder: Path) -> dict[str, Path]:
    """Case id (file name without its suffix) -> file, for the segmentation files directly in ``folder``.

    A ``CASE.seg.nrrd`` beside another ``CASE`` file is the segmentation: DeepSeg writes its results
    beside the images it segmented (``deepseg segment in/ --output in/``)."""
    cases: dict[str, Path] = {}
    for path in sorted(folder.iterdir(), key=lambda p: (not io.is_segmentation_file(p), p.name)):
        suffix = next((s for s in CASE_SUFFIXES if path.name.lower().endswith(s)), None)
        if suffix is None or not path.is_file():
            continue
        case = path.name[: -len(suffix)]
        if case in cases and io.is_segmentation_file(cases[case]):
            log.info("%s: %s is taken as the segmentation of case %r, not %s", folder, cases[case].name, case, path.name)
            continue
        if case in cases:
            raise ImageError(
                f"case {case!r} has two files",
                subject=folder,
                expected="one segmentation file per case",
                found=f"{cases[case].name} and {path.name}",
                hint="Move one of them out of the folder.",
            )
        cases[case] = path
    return cases


def compare_folders(
    prediction_folder: str | Path,
    reference_folder: str | Path,
    *,
    labels_json: str | Path | None = None,
    tolerance_mm: float = 2.0,
    workers: int = 1,
) -> dict[str, Any]:
    """:func:`compare_files` for every case of ``reference_folder`` that ``prediction_folder`` holds
    (matched by file name without its suffix: DeepSeg's ``CASE.seg.nrrd`` or nnU-Net's ``CASE.nii.gz``
    against a dataset's ``labelsTr/CASE.nii.gz``), as nnU-Net's ``evaluate_folder`` does.

    ``workers``: cases scored at once, in threads (reading, numpy, scipy's erosion and k-d tree
    release the GIL; ``Testing/Benchmarks/bench_compare.py`` times 1 and 2). Each holds its two label
    maps (a 512 x 512 x 300 CT: about 0.7 GB) while it scores them. The result does not depend on it.

    Returns:
        ``{"cases": {case: {segment: metrics}}, "mean": {segment: {metric: mean}}, "foreground_mean":
        {metric: mean of the segments' means}, "cases_scored": n, "missing_predictions": [case, ...]}``;
        a mean is over the cases where that metric is finite (HD95 and ASSD are infinite where one side
        is empty), and ``"finite_cases"`` says how many. ``foreground_mean`` is nnU-Net's
        ``summary.json`` headline, over the segments whose mean is finite.

    Raises:
        ImageError: a folder holds two files for one case, or no reference case has a prediction.
        DeepSegError: ``workers`` is below 1.
    """
    if workers < 1:
        raise DeepSegError("invalid number of workers", expected="1 or more", found=str(workers))
    predictions, references = _case_files(Path(prediction_folder)), _case_files(Path(reference_folder))
    scored = [case for case in references if case in predictions]
    missing = [case for case in references if case not in predictions]
    if not scored:
        raise ImageError(
            "no reference case has a prediction",
            subject=prediction_folder,
            expected=f"files named as the reference's cases ({', '.join(list(references)[:3]) or 'none found'}, ...)",
            found=f"{len(predictions)} segmentation files ({', '.join(list(predictions)[:3]) or 'none'})",
        )
    if missing:
        log.warning("%d reference case(s) have no prediction and are not scored: %s", len(missing), ", ".join(missing))

    def score(case: str) -> dict[str, dict[str, Any]]:
        return compare_files(predictions[case], references[case], labels_json=labels_json, tolerance_mm=tolerance_mm)

    with ThreadPoolExecutor(max_workers=min(workers, len(scored))) as pool:
        cases = dict(zip(scored, pool.map(score, scored), strict=True))
    mean: dict[str, dict[str, Any]] = {}
    for segment in dict.fromkeys(name for scores in cases.values() for name in scores):
        rows = [scores[segment] for scores in cases.values() if segment in scores]
        summary: dict[str, Any] = {"finite_cases": {}}
        for metric in rows[0]:
            finite = [float(row[metric]) for row in rows if np.isfinite(row[metric])]
            summary[metric] = float(np.mean(finite)) if finite else float("nan")
            summary["finite_cases"][metric] = len(finite)
        mean[segment] = summary
    metric_names = [metric for metric in next(iter(mean.values())) if metric != "finite_cases"] if mean else []
    foreground_mean = {}
    for metric in metric_names:
        finite = [summary[metric] for summary in mean.values() if np.isfinite(summary[metric])]
        foreground_mean[metric] = float(np.mean(finite)) if finite else float("nan")
    return {
        "cases": cases,
        "mean": mean,
        "foreground_mean": foreground_mean,
        "cases_scored": len(scored),
        "missing_predictions": missing,
    }
