"""Time of nnU-Net's export in DeepSeg (``NnUNetExportCollector``): network-grid logits back to a 512 x 512 x 300 CT.

    python Testing/Benchmarks/bench_nnunet_export.py [--json] [--device cpu] [--threads 2] [--classes 3 14]
        [--transpose 0 1 2] [--repeats 3] [--labels-only]

The geometry of ``bench_vs_nnunet.py``'s largest case: logits on the network grid (200 x 273 x 273 at
1.5 mm) go back to the cropped input grid (300 x 512 x 512 at 1.0 x 0.8 x 0.8 mm), linear along every
axis (no separate axis), then argmax, crop reverted and ``transpose_forward`` undone. The logits are
random normal float32 (the export's cost does not depend on their values), handed over in z slabs of
64 then 32 slices as the sliding window finishes them. Reported for each class count, with labels only
and with float16 probabilities and the entropy map as well (``--probabilities`` in ``deepseg segment``):
the best of ``--repeats`` seconds, and seconds per output slice. The export runs while the sliding
window does, so on the CPU this time is part of ``timings_s.network`` in ``bench_vs_nnunet.py``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepSeg"))

NETWORK_SHAPE = (200, 273, 273)
CROP_SHAPE = (300, 512, 512)
SLAB_DEPTHS = (64, 32)


def context() -> dict:
    return {
        "shape_before_crop": CROP_SHAPE,
        "bbox": [[0, s] for s in CROP_SHAPE],
        "shape_after_crop": CROP_SHAPE,
        "network_shape": NETWORK_SHAPE,
        "network_spacing": [1.5, 1.5, 1.5],
        "spacing_transposed": [1.0, 0.8, 0.8],
    }


def slabs(classes: int) -> list[tuple[int, int, np.ndarray]]:
    """``(z0, z1, logits (K, z1 - z0, 273, 273))`` in z order, as the sliding window hands them over."""
    rng = np.random.default_rng(classes)
    out, z = [], 0
    while z < NETWORK_SHAPE[0]:
        depth = min(SLAB_DEPTHS[0] if z == 0 else SLAB_DEPTHS[1], NETWORK_SHAPE[0] - z)
        out.append((z, z + depth, rng.normal(size=(classes, depth, *NETWORK_SHAPE[1:])).astype(np.float32)))
        z += depth
    return out


def time_export(classes: int, transpose: list[int], probabilities: bool, repeats: int) -> dict:
    from deepseg_core.pipelines.nnunet import NnUNetExportCollector

    pieces = slabs(classes)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        collector = NnUNetExportCollector(
            context(),
            list(range(classes)),
            transpose,
            {"order": 1, "order_z": 0, "force_separate_z": None},
            keep_probabilities=probabilities,
            uncertainty=probabilities,
        )
        for z0, z1, logits in pieces:
            collector.add(z0, z1, logits)
        collector.finish()
        best = min(best, time.perf_counter() - start)
    return {"seconds": best, "seconds_per_output_slice": best / CROP_SHAPE[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="the export runs on the CPU either way")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--classes", type=int, nargs="+", default=[3, 14])
    parser.add_argument("--transpose", type=int, nargs=3, default=[0, 1, 2], help="the plans' transpose_forward")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--labels-only",
        action="store_true",
        help="skip the runs with probabilities (they hold every class on the output grid: 118 classes need 100 GB)",
    )
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {
        "network_shape_zyx": NETWORK_SHAPE,
        "output_shape_zyx": CROP_SHAPE,
        "transpose_forward": args.transpose,
        "torch_threads": torch.get_num_threads(),
        "runs": {},
    }
    for classes in args.classes:
        for probabilities in (False,) if args.labels_only else (False, True):
            key = f"{classes}_classes" + ("_with_probabilities" if probabilities else "")
            result["runs"][key] = time_export(classes, args.transpose, probabilities, args.repeats)
            if not args.json:
                print(f"{key:>32}: {result['runs'][key]['seconds']:.3f} s", flush=True)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
