"""Peak memory and time of `Segmenter.segment` from 128^3 to a 512 x 512 x 300 CT, 10 or 117 classes.

    python Testing/Benchmarks/bench_memory.py [--json] [--device cpu] [--sizes 128,128,128 300,512,512]
        [--classes 117] [--input-spacing 0.8 0.8 1.0] [--model-spacing 1.5 1.5 1.5] [--backend auto]

Each size runs in a fresh subprocess so its peak RSS (getrusage ru_maxrss) is its own. The model is
a DeepSeg 3D U-Net (features 16-32-64-128, ``--classes`` outputs, patch 64 x 128 x 128, batch 2)
with random weights; the input is a CT-like int16 volume. When the input and model spacings differ,
the probabilities go back to the input grid slab by slab (the resampling path). Reported against the
input's own size and against what a whole-volume float32 accumulator of all classes alone would need,
with the tiles, the sliding window's seconds per tile (``network_seconds_per_tile``: how time grows
with the volume) and the deepest the accumulator got (``max_buffer_depth``, in slices, beside the
patch depth).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "DeepSeg"))
sys.path.insert(0, str(REPO / "Testing" / "core"))

DEFAULT_SIZES = ["128,128,128", "128,256,256", "150,512,512", "300,512,512"]


def make_model(folder: Path, classes: int, spacing: tuple[float, float, float]) -> Path:
    from deepseg_core.config import to_dict
    from deepseg_core.model_card import (
        Architecture,
        InferenceDefaults,
        Inputs,
        LabelSpec,
        ModelCard,
        Normalization,
        Preprocessing,
    )
    from deepseg_core.model_store import write_model_folder
    from deepseg_core.nets import UNetConfig, build_net

    cfg = UNetConfig(spatial_dims=3, in_channels=1, num_classes=classes, features=(16, 32, 64, 128))
    labels = tuple(LabelSpec(v, f"structure {v}", (v / classes, 0.5, 1 - v / classes)) for v in range(1, classes))
    card = ModelCard(
        name=f"bench{classes}",
        version=1,
        architecture=Architecture("unet", to_dict(cfg)),
        inputs=Inputs("CT", ("CT",)),
        labels=labels,
        preprocessing=Preprocessing(spacing, Normalization("ct", (-200.0, 300.0), 50.0, 100.0)),
        inference=InferenceDefaults((64, 128, 128), overlap=0.25, batch_size=2),
        weights_sha256="0" * 64,
    )
    write_model_folder(folder, card, build_net("unet", cfg, seed=0))
    return folder


def child(model: str, size: str, args: argparse.Namespace) -> None:
    import numpy as np

    from deepseg_core.inference import Segmenter, SegmentOptions
    from deepseg_core.io import Volume

    z, y, x = (int(v) for v in size.split(","))
    rng = np.random.default_rng(0)
    array = rng.normal(40, 30, size=(z, y, x)).astype(np.int16)
    array[:, :, : x // 8] = -1000
    volume = Volume(array, tuple(args.input_spacing))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    segmenter = Segmenter.load(model, device=args.device)
    segmenter.cache_dir = Path(model).parent / "compiled"
    start = time.perf_counter()
    options = SegmentOptions(uncertainty="tta" if args.uncertainty else None, backend=args.backend)
    result = segmenter.segment([volume], options)
    seconds = time.perf_counter() - start
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "shape_zyx": [z, y, x],
                "classes": segmenter.card.num_classes,
                "input_spacing_xyz_mm": list(args.input_spacing),
                "model_spacing_xyz_mm": list(segmenter.card.preprocessing.target_spacing_xyz_mm),
                "backend": result.backend,
                "uncertainty": args.uncertainty,
                "voxels": z * y * x,
                "seconds": seconds,
                "timings_s": result.timings_s,
                "tiles": result.window_stats["tiles"],
                "network_seconds_per_tile": result.timings_s["network"] / result.window_stats["tiles"],
                "max_buffer_depth": result.window_stats["max_buffer_depth"],
                "patch_depth": segmenter.card.inference.patch_size_zyx[0],
                "peak_rss_mb": peak_kb / 1024,
                "rss_before_model_mb": baseline / 1024,
                "input_int16_mb": array.nbytes / 2**20,
                "input_float32_mb": array.size * 4 / 2**20,
                "whole_volume_float32_probs_mb": array.size * segmenter.card.num_classes * 4 / 2**20,
            }
        )
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", nargs="*", default=DEFAULT_SIZES, help="Z,Y,X sizes")
    parser.add_argument("--uncertainty", action="store_true", help="with the 12-pass uncertainty (TTA)")
    parser.add_argument("--classes", type=int, default=10, help="network outputs (117: TotalSegmentator size)")
    parser.add_argument("--input-spacing", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("X", "Y", "Z"))
    parser.add_argument("--model-spacing", type=float, nargs=3, default=(1.0, 1.0, 1.0), metavar=("X", "Y", "Z"))
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "openvino", "onnxruntime"])
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args)
        return 0
    rows = []
    from deepseg_core.openmp_waits import shorten_openmp_spinning

    engine_env = dict(os.environ)
    shorten_openmp_spinning(engine_env)  # each size runs in a child process as DeepSeg's engine runs
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "bench", args.classes, tuple(args.model_spacing))
        for size in args.sizes:
            command = [sys.executable, __file__, "--device", args.device, "--backend", args.backend, "--child", str(model), size]
            command += ["--input-spacing", *map(str, args.input_spacing)] + (["--uncertainty"] if args.uncertainty else [])
            out = subprocess.run(command, capture_output=True, text=True, check=True, env=engine_env)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if args.json:
        print(json.dumps(rows))
    else:
        header = ("shape (z,y,x)", "seconds", "peak RSS MB", "input f32 MB", "RSS/input", "all-class f32 acc MB")
        print(" ".join(f"{h:>{w}}" for h, w in zip(header, (16, 8, 12, 13, 10, 20), strict=True)))
        for r in rows:
            print(
                f"{str(tuple(r['shape_zyx'])):>16} {r['seconds']:>8.1f} {r['peak_rss_mb']:>12.0f} {r['input_float32_mb']:>13.0f}"
                f" {r['peak_rss_mb'] / r['input_float32_mb']:>10.2f} {r['whole_volume_float32_probs_mb']:>20.0f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
