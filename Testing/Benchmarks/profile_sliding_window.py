"""Where DeepSeg's sliding window spends its time: one run of bench_sliding_window's setting under torch.profiler.

    python Testing/Benchmarks/profile_sliding_window.py [--device cpu|cuda] [--volume-zyx 300 512 512]
        [--batch 2] [--amp]

Same net (MONAI's reference UNet, fixed random weights), patch 96^3, overlap 0.25 and Gaussian
blending as ``bench_sliding_window.py``. Prints one JSON object: the unprofiled wall time (best of
two after a warm-up), then from one profiled run the sliding window's named ranges
(``sliding_window.predict_batch``, ``.blend``, ``.normalise``, ``.copy_to_host``, ``.on_slab``,
``.advance``: host seconds, and on CUDA the device seconds of the kernels each launched), the
operators with the most self time on the host and on the device, and on CUDA how busy the device
was (its kernels' total time over the profiled wall time). The slabs are kept by reference, as the
benchmark's timing does, so the consumer costs nothing here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepSeg"))

from bench_sliding_window import OVERLAP, PATCH, reference_net, sync

from deepseg_core.inference import SlidingWindowConfig, sliding_window_predict


def run_once(net, image, config, device) -> float:
    slabs = []
    sync(device)
    start = time.perf_counter()
    sliding_window_predict(net, image, 2, config, lambda z0, z1, probs: slabs.append(probs), device=device)
    sync(device)
    return time.perf_counter() - start


def device_seconds(event) -> float:
    # torch renamed cuda_time_total to device_time_total; both are microseconds
    return getattr(event, "device_time_total", getattr(event, "cuda_time_total", 0.0)) / 1e6


def self_device_seconds(event) -> float:
    return getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--amp", action="store_true", help="float16 autocast (CUDA; DeepSeg's default there)")
    parser.add_argument("--volume-zyx", type=int, nargs=3, default=[160, 192, 192], metavar=("Z", "Y", "X"))
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    device = torch.device(args.device)
    net = reference_net().to(device)
    image = torch.from_numpy(np.random.default_rng(0).normal(size=(1, *args.volume_zyx)).astype(np.float32))
    config = SlidingWindowConfig(patch_size_zyx=PATCH, overlap=OVERLAP, batch_size=args.batch, sigma_scale=0.125, amp=args.amp)
    run_once(net, image, config, device)  # warm-up: cuDNN's algorithm choice, allocator
    wall_s = min(run_once(net, image, config, device) for _ in range(2))

    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profile:
        profiled_s = run_once(net, image, config, device)
    events = profile.key_averages()
    ranges: dict[str, dict] = {}
    for event in events:
        if event.key.startswith("sliding_window."):
            # on CUDA a named range is listed twice, once for the host and once for the device span
            entry = ranges.setdefault(event.key, {"calls": 0, "host_s": 0.0, "device_s": 0.0})
            entry["calls"] = max(entry["calls"], event.count)
            entry["host_s"] = max(entry["host_s"], event.cpu_time_total / 1e6)
            entry["device_s"] = max(entry["device_s"], device_seconds(event))
    operators = [event for event in events if not event.key.startswith(("sliding_window.", "ProfilerStep"))]
    by_host = sorted(operators, key=lambda event: -event.self_cpu_time_total)[: args.top]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "torch": torch.__version__,
        "volume_zyx": args.volume_zyx,
        "batch": args.batch,
        "amp": args.amp,
        "wall_s": wall_s,
        "profiled_wall_s": profiled_s,
        "ranges": dict(sorted(ranges.items())),
        "top_host_self_s": {event.key: event.self_cpu_time_total / 1e6 for event in by_host},
    }
    if device.type == "cuda":
        by_device = sorted(operators, key=lambda event: -self_device_seconds(event))[: args.top]
        # kernels and copies are events of their own; the host operators that launched them carry the
        # same time again as their self device time, so only the device's events are summed
        kernels_s = sum(self_device_seconds(event) for event in operators if str(event.device_type).endswith("CUDA"))
        result["top_device_self_s"] = {event.key: self_device_seconds(event) for event in by_device}
        result["device_busy_s"] = kernels_s
        result["device_busy_fraction"] = kernels_s / profiled_s
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
