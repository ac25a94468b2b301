"""Time ``deepseg compare``'s metrics on a CT-sized case, against the same metrics over the whole array.

    python Testing/Benchmarks/bench_compare.py [--json] [--device cpu] [--skip-whole-array]

Case: a 512 x 512 x 300 label map at 0.8 x 0.8 x 1.5 mm with an ellipsoid "liver" (about 9.5 M voxels)
and a 20 mm "lesion"; the prediction shifts and resizes both by a few voxels. Per segment it reports
the seconds of ``metrics.compute_all`` (what ``compare`` and ``evaluate`` run per segment) and, unless
``--skip-whole-array``, of the same HD95 / ASSD / surface Dice computed as the definition reads:
surfaces by erosion and scipy's Euclidean distance transform over the whole array (how
``compute_all`` computed them before 2026-11-27), with whether the two gave identical numbers. Then
``compare_files`` end to end on the two label maps written as NIfTI (reading, the value check, both
segments). Last, ``compare_folders`` on 4 cases of 160 x 256 x 256 (an organ and a lesion each)
with 1 and with 2 workers (threads). ``--device`` is accepted for ``run_all.py`` and ignored
(metrics run on the CPU).
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

from deepseg_core import io, metrics
from deepseg_core.compare import compare_files, compare_folders

SHAPE_ZYX = (300, 512, 512)
SPACING_ZYX_MM = (1.5, 0.8, 0.8)


def ellipsoid(centre_zyx: tuple[float, ...], radii_zyx: tuple[float, ...]) -> np.ndarray:
    zz, yy, xx = np.ogrid[: SHAPE_ZYX[0], : SHAPE_ZYX[1], : SHAPE_ZYX[2]]
    return sum(((axis - c) / r) ** 2 for axis, c, r in zip((zz, yy, xx), centre_zyx, radii_zyx, strict=True)) < 1


def case() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Segment name -> (prediction, reference) masks ``(Z, Y, X)`` bool."""
    return {
        "liver": (ellipsoid((152, 253, 258), (88, 150, 172)), ellipsoid((150, 250, 260), (90, 150, 170))),
        "lesion": (ellipsoid((101, 201, 300), (6, 11, 11)), ellipsoid((100, 200, 300), (7, 12.5, 12.5))),
    }


def folder_workers(cases: int = 4, shape_zyx: tuple[int, int, int] = (160, 256, 256)) -> dict[str, float | int]:
    """Seconds of ``compare_folders`` over ``cases`` label-map pairs with 1 and 2 workers."""
    zz, yy, xx = np.ogrid[: shape_zyx[0], : shape_zyx[1], : shape_zyx[2]]
    timings: dict[str, float | int] = {"cases": cases, "case_shape_zyx": list(shape_zyx)}
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "labelsTs").mkdir()
        (root / "predictions").mkdir()
        (root / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "organ": 1, "lesion": 2}}))
        for index in range(cases):
            reference, predicted = np.zeros(shape_zyx, np.uint8), np.zeros(shape_zyx, np.uint8)
            reference[((zz - 80) / 50.0) ** 2 + ((yy - 128) / 80.0) ** 2 + ((xx - 128) / 90.0) ** 2 < 1] = 1
            predicted[((zz - 81 - index) / 49.0) ** 2 + ((yy - 129) / 80.0) ** 2 + ((xx - 127) / 92.0) ** 2 < 1] = 1
            reference[(zz - 60) ** 2 + (yy - 100) ** 2 + (xx - 140) ** 2 < 100] = 2
            predicted[(zz - 61) ** 2 + (yy - 101) ** 2 + (xx - 140) ** 2 < 90] = 2
            io.write_image(io.Volume(reference, (0.8, 0.8, 1.5)), root / "labelsTs" / f"case{index}.nii.gz")
            io.write_image(io.Volume(predicted, (0.8, 0.8, 1.5)), root / "predictions" / f"case{index}.nii.gz")
        results = []
        for workers in (1, 2):
            started = time.perf_counter()
            results.append(compare_folders(root / "predictions", root / "labelsTs", workers=workers))
            timings[f"workers_{workers}_s"] = round(time.perf_counter() - started, 2)
        timings["same_result"] = json.dumps(results[0], sort_keys=True) == json.dumps(results[1], sort_keys=True)
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-whole-array", action="store_true", help="do not time the whole-array reference")
    args = parser.parse_args()
    segments = case()
    rows = {}
    for name, (pred, ref) in segments.items():
        started = time.perf_counter()
        ours = metrics.compute_all(pred, ref, SPACING_ZYX_MM)
        row = {"voxels": int(ref.sum()), "compute_all_s": round(time.perf_counter() - started, 3), "hd95_mm": ours.hd95_mm}
        if not args.skip_whole_array:
            started = time.perf_counter()
            reference = whole_array.distance_metrics(pred, ref, SPACING_ZYX_MM, 2.0)
            row["whole_array_s"] = round(time.perf_counter() - started, 2)
            row["identical"] = reference == (ours.hd95_mm, ours.assd_mm, ours.surface_dice)
        rows[name] = row
    labels_ref, labels_pred = np.zeros(SHAPE_ZYX, np.uint8), np.zeros(SHAPE_ZYX, np.uint8)
    for value, (pred, ref) in enumerate(segments.values(), start=1):
        labels_pred[pred], labels_ref[ref] = value, value
    with tempfile.TemporaryDirectory() as folder:
        spacing_xyz = tuple(reversed(SPACING_ZYX_MM))
        ref_path = io.write_image(io.Volume(labels_ref, spacing_xyz), Path(folder) / "ref.nii.gz")
        pred_path = io.write_image(io.Volume(labels_pred, spacing_xyz), Path(folder) / "pred.nii.gz")
        table = Path(folder) / "dataset.json"
        table.write_text(json.dumps({"labels": {"background": 0, **{name: v for v, name in enumerate(segments, 1)}}}))
        started = time.perf_counter()
        compare_files(pred_path, ref_path, labels_json=table)
        compare_s = time.perf_counter() - started
    folders = folder_workers()
    result = {
        "folders": folders,
        "shape_zyx": list(SHAPE_ZYX),
        "spacing_zyx_mm": list(SPACING_ZYX_MM),
        "segments": rows,
        "compare_files_s": round(compare_s, 2),
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
