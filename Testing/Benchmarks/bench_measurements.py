"""Time ``measure_segments`` (what ``deepseg segment --stats`` and the panel run after Segment).

    python Testing/Benchmarks/bench_measurements.py [--json] [--device cpu]

1. A 512 x 512 x 300 CT-sized labelmap (0.8 x 0.8 x 1.5 mm): an ellipsoid "liver" of about 9.5 M
   voxels and 20 spherical "lesion" instances (radius 3-14 voxels), measured with intensities.
2. The Feret diameter alone, ITK's all-pairs ``GetFeretDiameter`` against DeepSeg's convex-hull
   search, on balls of growing size (ITK's cost grows with the square of the boundary voxels).

Prints seconds and the peak RSS; with ``--json`` one JSON document. ``--device`` is accepted for
``run_all.py`` and ignored (measurements run on the CPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepSeg"))

from deepseg_core.io import SegmentInfo, Volume
from deepseg_core.measurements import feret_diameter_mm, measure_segments


def ct_sized_case() -> tuple[Volume, Volume, np.ndarray]:
    z, y, x = 300, 512, 512
    zz, yy, xx = np.ogrid[:z, :y, :x]
    labels = np.zeros((z, y, x), np.uint8)
    labels[((zz - 150) / 90.0) ** 2 + ((yy - 250) / 150.0) ** 2 + ((xx - 260) / 170.0) ** 2 < 1] = 1
    rng = np.random.default_rng(0)
    instances = np.zeros((z, y, x), np.int32)
    for index in range(20):
        centre = rng.integers([80, 150, 150], [220, 350, 370])
        radius = int(rng.integers(3, 15))
        ball = (zz - centre[0]) ** 2 + (yy - centre[1]) ** 2 + (xx - centre[2]) ** 2 < radius * radius
        labels[ball] = 2
        instances[ball] = index + 1
    image = rng.normal(40.0, 12.0, (z, y, x)).astype(np.int16)
    spacing = (0.8, 0.8, 1.5)
    return Volume(labels, spacing), Volume(image, spacing), instances


def feret_scaling() -> list[dict]:
    rows = []
    for radius in (16, 32, 64):
        n = 2 * radius + 5
        zz, yy, xx = np.ogrid[:n, :n, :n]
        mask = (zz - n // 2) ** 2 + (yy - n // 2) ** 2 + (xx - n // 2) ** 2 <= radius * radius
        grid = Volume(mask.astype(np.uint8), (1.0, 1.0, 1.0))
        started = time.perf_counter()
        hull = feret_diameter_mm(mask, grid)
        hull_s = time.perf_counter() - started
        itk = sitk.LabelShapeStatisticsImageFilter()
        itk.ComputeFeretDiameterOn()
        started = time.perf_counter()
        itk.Execute(sitk.Cast(grid.to_sitk(), sitk.sitkUInt32))
        itk_s = time.perf_counter() - started
        rows.append(
            {
                "radius_voxels": radius,
                "voxels": int(mask.sum()),
                "hull_s": round(hull_s, 4),
                "itk_all_pairs_s": round(itk_s, 3),
                "same_diameter": abs(hull - itk.GetFeretDiameter(1)) < 1e-9,
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    labels, image, instances = ct_sized_case()
    started = time.perf_counter()
    rows = measure_segments(
        labels,
        [SegmentInfo("liver", 1), SegmentInfo("liver lesion", 2)],
        intensity=image,
        instance_ids_zyx=instances,
        thing_values=[2],
    )
    seconds = time.perf_counter() - started
    result = {
        "shape_zyx": list(labels.shape_zyx),
        "liver_voxels": rows[0].voxel_count,
        "rows": len(rows),
        "measure_segments_s": round(seconds, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "feret_scaling": feret_scaling(),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
