"""Time the clean-up after Segment (largest component, fill holes, lesion instances) on a CT-sized label map.

    python Testing/Benchmarks/bench_postprocessing.py [--json] [--device cpu] [--skip-whole-array]

Label map: 512 x 512 x 300 at 0.8 x 0.8 x 1.5 mm with 10 classes: an ellipsoid "liver" of about
9.6 M voxels and 9 balls (radius 5-30 voxels), each with a small second piece. Times
``keep_largest_component`` and ``fill_holes`` over the 10 classes and ``label_instances`` over the
9 balls (what ``SegmentOptions(largest_component=True, fill_holes=True, instances=True)`` runs; the
panel asks for instances by default), each class inside its box, and ``uncertainty.segment_uncertainty``
(the per-segment summary of an uncertainty run) on a random entropy map, then ``io.write_segmentation``
of the 10 classes (``write_segmentation_s``; each segment's extent in the header is taken from its
box, ``seconds.segment_extents``), and the voxels training patches are centred on
(``TrainingCase``, ``seconds.training_class_voxels``, once per case when a fine-tune starts). Unless
``--skip-whole-array``, the same steps are also timed as
they ran before 2026-11-27, one pass over the whole array per class (``Testing/whole_array.py``), with
whether the outputs are identical. ``--device`` is accepted for
``run_all.py`` and ignored.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepSeg"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Testing/whole_array.py

import whole_array

from deepseg_core import io, postprocessing, uncertainty
from deepseg_core.io import SegmentInfo, Volume
from deepseg_core.training.patches import TrainingCase

SHAPE_ZYX = (300, 512, 512)
SPACING_ZYX_MM = (1.5, 0.8, 0.8)


def ct_sized_labels() -> np.ndarray:
    zz, yy, xx = np.ogrid[: SHAPE_ZYX[0], : SHAPE_ZYX[1], : SHAPE_ZYX[2]]
    labels = np.zeros(SHAPE_ZYX, np.uint8)
    labels[((zz - 150) / 90.0) ** 2 + ((yy - 250) / 150.0) ** 2 + ((xx - 260) / 170.0) ** 2 < 1] = 1
    rng = np.random.default_rng(0)
    for value in range(2, 11):
        centre, radius = rng.integers([40, 100, 100], [260, 420, 420]), int(rng.integers(5, 30))
        labels[(zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 < radius * radius] = value
        labels[(zz - centre[0] - radius) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 < 9] = value
    return labels


def whole_array_steps(
    labels: np.ndarray, values: list[int], things: list[int]
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], dict[str, float]]:
    """The three clean-up steps as their definitions (``Testing/whole_array.py``): (largest, filled,
    instance ids) and the seconds of each."""
    seconds, outputs = {}, []
    for name, step in (
        ("keep_largest_component", lambda: whole_array.largest_component(labels, values)),
        ("fill_holes", lambda: whole_array.holes_filled(labels, values)),
        ("label_instances", lambda: whole_array.instances(labels, things, float(np.prod(SPACING_ZYX_MM)), 0.0)[0]),
    ):
        started = time.perf_counter()
        outputs.append(step())
        seconds[name] = round(time.perf_counter() - started, 2)
    return (outputs[0], outputs[1], outputs[2]), seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-whole-array", action="store_true")
    args = parser.parse_args()
    labels = ct_sized_labels()
    values, things = list(range(1, 11)), list(range(2, 11))
    seconds, outputs = {}, []
    for name, step in (
        ("keep_largest_component", lambda: postprocessing.keep_largest_component(labels, values)),
        ("fill_holes", lambda: postprocessing.fill_holes(labels, values)),
        ("label_instances", lambda: postprocessing.label_instances(labels, things, SPACING_ZYX_MM)[0]),
    ):
        started = time.perf_counter()
        outputs.append(step())
        seconds[name] = round(time.perf_counter() - started, 2)
    entropy = np.random.default_rng(1).random(SHAPE_ZYX, dtype=np.float32)
    grid = Volume(labels, tuple(reversed(SPACING_ZYX_MM)))
    started = time.perf_counter()
    summaries = uncertainty.segment_uncertainty(grid, entropy, [SegmentInfo(f"class {v}", v) for v in values])
    seconds["segment_uncertainty"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    training_case = TrainingCase(np.zeros((1, 1, 1, 1), np.float32), labels)
    seconds["training_class_voxels"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    boxes = io.class_boxes(labels, values)
    seconds["segment_extents"] = round(time.perf_counter() - started, 2)
    extents = [tuple(v for b in boxes[c] for v in (b.start, b.stop - 1)) if c in boxes else None for c in values]
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        io.write_segmentation(Path(folder) / "out.seg.nrrd", grid, [SegmentInfo(f"class {v}", v) for v in values])
        write_s = round(time.perf_counter() - started, 2)
    result: dict = {
        "shape_zyx": list(SHAPE_ZYX),
        "classes": len(values),
        "thing_classes": len(things),
        "seconds": seconds,
        "write_segmentation_s": write_s,
    }
    if not args.skip_whole_array:
        reference, result["whole_array_seconds"] = whole_array_steps(labels, values, things)
        started = time.perf_counter()
        reference_summaries = whole_array.segment_uncertainty(labels, entropy, values, uncertainty.DEFAULT_THRESHOLD)
        result["whole_array_seconds"]["segment_uncertainty"] = round(time.perf_counter() - started, 2)
        started = time.perf_counter()
        reference_extents = whole_array.extents(labels, values)
        result["whole_array_seconds"]["segment_extents"] = round(time.perf_counter() - started, 2)
        started = time.perf_counter()
        reference_voxels = whole_array.class_voxels(labels)
        result["whole_array_seconds"]["training_class_voxels"] = round(time.perf_counter() - started, 2)
        same_voxels = sorted(reference_voxels) == training_case.foreground_classes and all(
            np.array_equal(training_case.class_voxels(value), coords) for value, coords in reference_voxels.items()
        )
        ours = [(s.mean_entropy, round(s.uncertain_ml / grid.voxel_volume_ml)) for s in summaries]
        result["identical"] = (
            all(np.array_equal(a, b) for a, b in zip(outputs, reference, strict=True))
            and ours == reference_summaries
            and extents == reference_extents
            and same_voxels
        )
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
