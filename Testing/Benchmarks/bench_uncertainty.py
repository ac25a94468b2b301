"""Does voxel-wise uncertainty point at the errors? AUROC and errors caught in the top 5 %.

    python Testing/Benchmarks/bench_uncertainty.py [--json] [--cases 4] [--device cpu]

The bundled ``phantom-liver`` model segments held-out phantoms of its own profile (ct-A) and of a
shifted one (ct-B and halfway to it). Error voxels are where the predicted label differs from the
truth. For each uncertainty method the benchmark reports, pooled over the cases of a profile:

- ``auroc``: probability that a random error voxel is more uncertain than a random correct voxel;
- ``errors_in_top5``: fraction of all error voxels inside the 5 % most uncertain voxels;

both over all voxels and over the body only (voxels above -500 HU, which excludes the easy air),
plus the seconds per case. Methods: ``tta`` (DeepSeg's default: 8 mirror passes plus 4 intensity
perturbations of the normalised input) and ``mirror`` (the 8 mirror passes alone).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepSeg"))

from deepseg_core.demo import DEFAULT_MODEL, SAMPLE_SPACING_XYZ_MM
from deepseg_core.inference import Segmenter, SegmentOptions
from deepseg_core.phantoms import PROFILES, ScannerProfile, generate_phantom, interpolate_profiles
from deepseg_core.uncertainty import error_detection

SHAPE = (40, 96, 96)
SEED0 = 1300


def run(segmenter: Segmenter, profile: ScannerProfile, cases: int, device: str, mirror_only: bool) -> dict:
    options = SegmentOptions(device=device, uncertainty="tta", **({"uncertainty_perturbations": ()} if mirror_only else {}))
    entropies, errors, body, seconds = [], [], [], []
    for i in range(cases):
        case = generate_phantom(seed=SEED0 + i, profile=profile, shape_zyx=SHAPE, spacing_xyz_mm=SAMPLE_SPACING_XYZ_MM)
        started = time.perf_counter()
        result = segmenter.segment([case.image], options)
        seconds.append(time.perf_counter() - started)
        entropies.append(result.uncertainty.array_zyx.ravel())
        errors.append((result.labels.array_zyx != case.labels.array_zyx).ravel())
        body.append((case.image.array_zyx > -500).ravel())
    u, e, b = np.concatenate(entropies), np.concatenate(errors), np.concatenate(body)
    everywhere = error_detection(u, e)
    in_body = error_detection(u[b], e[b])
    return {
        "auroc_all": everywhere["auroc"],
        "errors_in_top5_all": everywhere["errors_in_top"],
        "auroc_body": in_body["auroc"],
        "errors_in_top5_body": in_body["errors_in_top"],
        "error_rate": everywhere["error_rate"],
        "seconds_per_case": float(np.mean(seconds)),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", type=int, default=4)
    args = parser.parse_args()
    segmenter = Segmenter.load(DEFAULT_MODEL, device=args.device)
    profiles = {
        "ct-A": PROFILES["ct-A"],
        "ct-A -> ct-B, 50 %": interpolate_profiles(PROFILES["ct-A"], PROFILES["ct-B"], 0.5),
        "ct-B": PROFILES["ct-B"],
    }
    table = []
    for method, mirror_only in (("tta", False), ("mirror", True)):
        for name, profile in profiles.items():
            row = {"method": method, "profile": name, **run(segmenter, profile, args.cases, args.device, mirror_only)}
            table.append(row)
            print(json.dumps({"event": "row_done", **row}), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"model": str(DEFAULT_MODEL), "cases_per_row": args.cases, "rows": table}))
        return 0
    header = f"{'method':<8}{'profile':<22}{'errors':>8}{'AUROC all':>11}{'top5 all':>10}"
    print(header + f"{'AUROC body':>12}{'top5 body':>11}{'s/case':>8}")
    for r in table:
        print(
            f"{r['method']:<8}{r['profile']:<22}{r['error_rate']:>8.2%}{r['auroc_all']:>11.3f}{r['errors_in_top5_all']:>10.1%}"
            f"{r['auroc_body']:>12.3f}{r['errors_in_top5_body']:>11.1%}{r['seconds_per_case']:>8.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
