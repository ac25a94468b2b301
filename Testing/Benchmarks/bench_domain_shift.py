"""Does the domain-shift verdict rise as Dice falls? The bundled model on phantoms of growing shift.

    python Testing/Benchmarks/bench_domain_shift.py [--json] [--cases 4] [--device cpu]

The bundled ``phantom-liver`` model was trained on scanner profile ct-A. Each row is a set of
held-out phantoms (seeds never used in training) rendered by a profile further from ct-A:
interpolations ct-A -> ct-B and ct-A -> ct-C (``phantoms.interpolate_profiles``), an extrapolation
past ct-C, coarser voxels, an MR phantom given to the CT model, and fields of view cut down to a few
slices or a small in-plane box around the liver's centre (the model's tile is 32 x 64 x 64 voxels,
80 x 96 x 96 mm). For each case the domain check (``Segmenter.check_inputs``) runs before inference,
then the case is segmented and scored against its truth (a cut case against the same cut of it).
Reports per row: mean intensity distance, the verdicts, mean Dice (1 for a label absent from both).
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


def rows() -> list[tuple[str, object, tuple[float, float, float], tuple[float, float, float] | None]]:
    """``(name, profile, spacing_xyz_mm, field_zyx_mm)``: a field of view cuts the phantom to that box (mm)."""
    a, b, c = PROFILES["ct-A"], PROFILES["ct-B"], PROFILES["ct-C"]
    same = SAMPLE_SPACING_XYZ_MM
    z_mm, yx_mm = same[2], same[0]
    return [
        ("ct-A (training profile)", a, same, None),
        ("ct-A -> ct-B, 25 %", interpolate_profiles(a, b, 0.25), same, None),
        ("ct-A -> ct-B, 50 %", interpolate_profiles(a, b, 0.5), same, None),
        ("ct-B", b, same, None),
        ("ct-A -> ct-C, 50 %", interpolate_profiles(a, c, 0.5), same, None),
        ("ct-C", c, same, None),
        ("ct-A -> ct-C, 150 %", interpolate_profiles(a, c, 1.5), same, None),
        ("ct-A, voxels 2x coarser", a, tuple(2 * s for s in same), None),
        ("ct-A, voxels 4x coarser", a, tuple(4 * s for s in same), None),
        ("mr-A given to the CT model", PROFILES["mr-A"], same, None),
        *(
            (f"ct-A, {n} slice{'s' if n > 1 else ''} ({n * z_mm:g} mm)", a, same, (n * z_mm, SHAPE_MM[1], SHAPE_MM[2]))
            for n in (24, 16, 12, 8, 4, 1)
        ),
        *(
            (f"ct-A, {n} x {n} voxels in-plane ({n * yx_mm:g} mm)", a, same, (SHAPE_MM[0], n * yx_mm, n * yx_mm))
            for n in (40, 24, 12)
        ),
    ]


def cut_to_field(case, field_zyx_mm: tuple[float, float, float]):
    """The phantom's image and labels cut to a box of ``field_zyx_mm`` centred on the liver's centre."""
    from deepseg_core.io import Volume

    spacing_zyx = case.image.spacing_xyz_mm[::-1]
    centre = np.round(np.argwhere(case.labels.array_zyx == 1).mean(axis=0)).astype(int)
    box = []
    for axis, (mm, step, size) in enumerate(zip(field_zyx_mm, spacing_zyx, case.image.shape_zyx, strict=True)):
        n = min(size, max(1, round(mm / step)))
        start = int(np.clip(centre[axis] - n // 2, 0, size - n))
        box.append(slice(start, start + n))
    image, labels = case.image, case.labels
    start_xyz = np.asarray([b.start for b in box[::-1]])
    origin = np.asarray(image.origin_lps) + image.direction_lps @ (start_xyz * np.asarray(image.spacing_xyz_mm))

    def cut(volume):
        return Volume(volume.array_zyx[tuple(box)].copy(), volume.spacing_xyz_mm, tuple(origin), volume.direction_lps)

    return cut(image), cut(labels)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", type=int, default=4)
    args = parser.parse_args()
    segmenter = Segmenter.load(DEFAULT_MODEL, device=args.device)
    table = []
    for name, profile, spacing, field in rows():
        verdicts: collections.Counter[str] = collections.Counter()
        distances, dice = [], {label.name: [] for label in PHANTOM_LABELS}
        for i in range(args.cases):
            shape = tuple(max(8, round(mm / s)) for mm, s in zip(SHAPE_MM, spacing[::-1], strict=True))
            case = generate_phantom(seed=SEED0 + i, profile=profile, shape_zyx=shape, spacing_xyz_mm=spacing)
            image, truth = (case.image, case.labels) if field is None else cut_to_field(case, field)
            report = segmenter.check_inputs([image])
            verdicts[report.verdict] += 1
            if report.intensity_distance is not None:
                distances.append(report.intensity_distance)
            labels = segmenter.segment(
                [image], SegmentOptions(device=args.device, check_modality=False), domain_check=report
            ).labels.array_zyx
            for label in PHANTOM_LABELS:
                dice[label.name].append(metrics.dice(labels == label.value, truth.array_zyx == label.value))
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
    print(f"{'input':<42}{'distance':>9}  {'verdicts':<34}{'liver':>7}{'lesion':>8}")
    for row in table:
        verdict_text = ", ".join(f"{v} x{n}" for v, n in sorted(row["verdicts"].items()))
        distance = "-" if row["intensity_distance"] is None else f"{row['intensity_distance']:.2f}"
        print(f"{row['row']:<42}{distance:>9}  {verdict_text:<34}{row['dice']['liver']:>7.3f}{row['dice']['liver lesion']:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
