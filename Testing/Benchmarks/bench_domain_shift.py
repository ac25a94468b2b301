"""Does the domain-shift verdict rise as Dice falls? The bundled model on phantoms of growing shift.

    python Testing/Benchmarks/bench_domain_shift.py [--json] [--cases 4] [--device cpu]

The bundled ``phantom-liver`` model was trained on scanner profile ct-A. Each row is a set of
held-out phantoms (seeds never used in training) rendered by a profile further from ct-A:
interpolations ct-A -> ct-B and ct-A -> ct-C (``phantoms.interpolate_profiles``), an extrapolation
past ct-C, coarser voxels, and an MR phantom given to the CT model. For each case the domain check
(:func:`deepseg_core.domain_shift.check_input`) runs before inference, then the case is segmented
and scored against its truth. Reports per row: mean intensity distance, the verdicts, mean Dice.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepSeg"))

from deepseg_core import metrics
from deepseg_core.demo import DEFAULT_MODEL, SAMPLE_SPACING_XYZ_MM
from deepseg_core.inference import Segmenter, SegmentOptions
from deepseg_core.phantoms import PHANTOM_LABELS, PROFILES, generate_phantom, interpolate_profiles

SHAPE_MM = (100.0, 144.0, 144.0)
SEED0 = 1200


def rows() -> list[tuple[str, object, tuple[float, float, float]]]:
    a, b, c = PROFILES["ct-A"], PROFILES["ct-B"], PROFILES["ct-C"]
    same = SAMPLE_SPACING_XYZ_MM
    return [
        ("ct-A (training profile)", a, same),
        ("ct-A -> ct-B, 25 %", interpolate_profiles(a, b, 0.25), same),
        ("ct-A -> ct-B, 50 %", interpolate_profiles(a, b, 0.5), same),
        ("ct-B", b, same),
        ("ct-A -> ct-C, 50 %", interpolate_profiles(a, c, 0.5), same),
        ("ct-C", c, same),
        ("ct-A -> ct-C, 150 %", interpolate_profiles(a, c, 1.5), same),
        ("ct-A, voxels 2x coarser", a, tuple(2 * s for s in same)),
        ("ct-A, voxels 4x coarser", a, tuple(4 * s for s in same)),
        ("mr-A given to the CT model", PROFILES["mr-A"], same),
    ]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", type=int, default=4)
    args = parser.parse_args()
    segmenter = Segmenter.load(DEFAULT_MODEL, device=args.device)
    table = []
    for name, profile, spacing in rows():
        verdicts: collections.Counter[str] = collections.Counter()
        distances, dice = [], {label.name: [] for label in PHANTOM_LABELS}
        for i in range(args.cases):
            shape = tuple(max(8, round(mm / s)) for mm, s in zip(SHAPE_MM, spacing[::-1], strict=True))
            case = generate_phantom(seed=SEED0 + i, profile=profile, shape_zyx=shape, spacing_xyz_mm=spacing)
            report = segmenter.check_inputs([case.image])
            verdicts[report.verdict] += 1
            if report.intensity_distance is not None:
                distances.append(report.intensity_distance)
            labels = segmenter.segment(
                [case.image], SegmentOptions(device=args.device, check_modality=False), domain_check=report
            ).labels.array_zyx
            for label in PHANTOM_LABELS:
                dice[label.name].append(metrics.dice(labels == label.value, case.labels.array_zyx == label.value))
        table.append(
            {
                "row": name,
                "intensity_distance": float(np.mean(distances)) if distances else None,
                "verdicts": dict(verdicts),
                "dice": {k: float(np.mean(v)) for k, v in dice.items()},
                "reasons_example": report.reasons,
            }
        )
        print(json.dumps({"event": "row_done", **table[-1]}), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"model": str(DEFAULT_MODEL), "cases_per_row": args.cases, "rows": table}))
        return 0
    print(f"{'input':<30}{'distance':>9}  {'verdicts':<34}{'liver':>7}{'lesion':>8}")
    for row in table:
        verdict_text = ", ".join(f"{v} x{n}" for v, n in sorted(row["verdicts"].items()))
        distance = "-" if row["intensity_distance"] is None else f"{row['intensity_distance']:.2f}"
        print(f"{row['row']:<30}{distance:>9}  {verdict_text:<34}{row['dice']['liver']:>7.3f}{row['dice']['liver lesion']:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
