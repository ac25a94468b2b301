"""A call with fewer tiles than the exported graph's batch: run one tile at a time, or pad with copies.

    python Testing/Benchmarks/bench_partial_batches.py [--json] [--repeats 3] [--device cpu]

The bundled model (tile batch 4) on a 24 x 64 x 64 phantom, which is one tile, segmented in one process
with ``Segmenter.segment``: without and with test-time augmentation (8 passes of one tile each). Rows:
OpenVINO as DeepSeg runs it (a graph of one tile, one request per tile since 2026-11-29, so it never
pads; the row with padding switched off, ``openvino_padded``, was dropped then), ONNX Runtime as DeepSeg
runs it (a second graph exported for one tile, since b3ffa0e) and with that switched off (the partial
batch padded with copies), and torch. Each figure is the best of
``--repeats`` warm runs (the first run of each row, which compiles, is not counted); ``network_s``
is ``timings_s.network``. Another ``--device`` prints a JSON reason and nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepSeg"))

from bench_sliding_window import cpu_description

from deepseg_core import phantoms
from deepseg_core.demo import DEFAULT_MODEL
from deepseg_core.inference import Segmenter, SegmentOptions, backends


def best_network_seconds(segmenter: Segmenter, image, backend: str, tta: bool, repeats: int) -> dict:
    options = SegmentOptions(device="cpu", backend=backend, tta=tta, check_modality=False)
    segmenter.segment([image], options)  # compiles (and, for one tile, makes the single-tile graph)
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        result = segmenter.segment([image], options)
        runs.append({"seconds": time.perf_counter() - started, "network_s": result.timings_s["network"]})
    best = min(runs, key=lambda run: run["network_s"])
    return {**best, "backend": result.backend, "tiles": result.window_stats.get("tiles")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu only: the exported runtimes are CPU runtimes (run_all.py passes it)")
    args = parser.parse_args()
    if args.device != "cpu":
        print(json.dumps({"skipped": f"the exported runtimes run on the CPU only, not on {args.device}"}))
        return 0
    image = phantoms.generate_phantom(seed=11, shape_zyx=(24, 64, 64)).image
    rows: dict[str, dict] = {}
    single_tile_runner = backends.ExportedTiles._single_tile_runner
    for name, backend, padded in (
        ("openvino", "openvino", False),
        ("onnxruntime", "onnxruntime", False),
        ("onnxruntime_padded", "onnxruntime", True),
        ("torch", "torch", False),
    ):
        if backend != "torch" and not backends.installed(backend):
            continue
        # a fresh segmenter per row: its tile functions are made anew under the switch
        segmenter = Segmenter.load(DEFAULT_MODEL, device="cpu")
        backends.ExportedTiles._single_tile_runner = (lambda self: None) if padded else single_tile_runner
        try:
            rows[name] = {
                "batch": segmenter.window_config(SegmentOptions()).batch_size,
                "one_tile": best_network_seconds(segmenter, image, backend, False, args.repeats),
                "tta": best_network_seconds(segmenter, image, backend, True, args.repeats),
            }
        finally:
            backends.ExportedTiles._single_tile_runner = single_tile_runner
    result = {
        "cpu": cpu_description(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "image_zyx": [24, 64, 64],
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for name, row in rows.items():
            print(f"{name:16s} one tile {row['one_tile']['network_s']:.3f} s   TTA {row['tta']['network_s']:.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
