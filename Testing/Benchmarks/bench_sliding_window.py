"""DeepSeg's sliding window vs MONAI's sliding_window_inference: same net, weights, volume, patch, overlap.

    python Testing/Benchmarks/bench_sliding_window.py [--json] [--device cpu|cuda] [--repeats 2] [--batch 2]
        [--volume-zyx 160 192 192]

Net: MONAI UNet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2) with fixed random
weights (ENVIRONMENT.md's reference). Volume 192 x 192 x 160 (x, y, z), patch 96^3, overlap 0.25,
Gaussian blending (sigma = patch / 8 in both). MONAI is timed with its default sw_batch_size=1 and
with the same tile batch DeepSeg uses. DeepSeg runs with each inference backend (torch, OpenVINO,
ONNX Runtime: the same weights exported to ONNX; on CPUs with AMX / AVX512-BF16 also OpenVINO and torch
with ``--precision bfloat16``, reported beside, never as the headline ratio). Reports, from one run on one volume: the time
ratios (``ratio_vs_monai_same_batch`` is DeepSeg's default ``auto`` backend against MONAI at the
same tile batch; ``ratio_vs_monai_same_batch_torch`` the torch backend), time per tile and GFLOP/s
of every backend against a measured matmul ceiling (the faster of torch's and OpenVINO's 2048 x 2048
float32 matmul, both in ``float32_matmul_by_runtime_gflops``; before 2026-11-29 torch's alone), and how
far the outputs differ (identical arithmetic when both place tiles alike and use the same weights).
``openvino_layers``: OpenVINO's own timers per layer type over one request of the graph DeepSeg runs (one
tile: since 2026-11-29 DeepSeg's OpenVINO path runs each tile of a batch as its own request, while the
sliding window still hands it ``--batch`` tiles per call as MONAI's predictor gets ``sw_batch_size``), and
the fraction of the ceiling reached inside the convolutions alone.
``openvino_seconds_per_tile_by_request_batch``: the same network exported for requests of 1, 2 and 3 tiles,
seconds per tile (median of 10 calls of each, taken in turn), which is why one tile per request.

On CUDA (``--device cuda``) the headline ``ratio_vs_monai_same_batch`` compares DeepSeg's default
there, float16 autocast, with MONAI under the same autocast (the float32 pair is
``ratio_vs_monai_same_batch_torch``); ``torch.compile`` rows (compile time apart) and the fractions
of measured TF32 / float16 matmul ceilings are added; TensorRT is reported as installed or not.
MONAI's output is brought to host memory whole, every class, inside its timing, as DeepSeg's sliding
window hands every class of each slab to host memory (``*_foreground_copy``: one class only, this
benchmark's CUDA definition before 2026-11-26); DeepSeg's slabs are kept as handed over and its
foreground gathered from them after the clock stops, as MONAI's is a view of its copy (before
2026-11-27 DeepSeg's gathering was timed). ``parts_s`` times the parts of a CUDA run alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepSeg"))

from deepseg_core.openmp_waits import shorten_openmp_spinning

# as DeepSeg's engine processes do, before torch loads OpenMP; MONAI's rows run in this process too, under the same setting
shorten_openmp_spinning()

import numpy as np
import torch

from deepseg_core.inference import SlidingWindowConfig, gaussian_importance, sliding_window_predict
from deepseg_core.inference.backends import choose_backend, installed, native_bfloat16, tile_function
from deepseg_core.inference.sliding_window import SLAB_PIECE_BYTES, SlabCopier, tile_starts

SHAPE_ZYX = (160, 192, 192)
PATCH = (96, 96, 96)
OVERLAP = 0.25


def reference_net() -> torch.nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(3, 1, 2, (16, 32, 64, 128, 256), (2, 2, 2, 2), num_res_units=2).eval()


def forward_flops(net: torch.nn.Module, device: torch.device, input_shape: tuple[int, ...] = (1, 1, *PATCH)) -> float:
    """FLOPs of one forward of ``net`` on zeros of ``input_shape`` (torch's counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        net(torch.zeros(input_shape, device=device))
    return float(counter.get_total_flops())


def cpu_description() -> str:
    """The CPU a figure was measured on: model name, core count and widest vector instructions.

    Figures depend on the vector width: the same convolutions ran at 379 GFLOP/s on an AVX-512 CPU and
    at 70 on an AVX2 one (README), so every benchmark's JSON names the CPU behind its numbers.
    """
    import os
    import platform

    model, flags = platform.processor() or platform.machine(), set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and value.strip():
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
            if model and flags:
                break
    widest = [
        name
        for name, flag in (("AMX", "amx_tile"), ("AVX512-BF16", "avx512_bf16"), ("AVX-512", "avx512f"), ("AVX2", "avx2"))
        if flag in flags
    ]
    vector = ", ".join(widest[:2]) if widest else "vector width unknown"
    return f"{model}, {os.cpu_count()} logical cores, {vector}"


def matmul_ceiling_gflops(device: torch.device, seconds: float = 2.0) -> float:
    a = torch.randn(2048, 2048, device=device)
    b = torch.randn(2048, 2048, device=device)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * 2048**3 * count / (time.perf_counter() - start) / 1e9


def openvino_matmul_gflops(seconds: float = 2.0) -> float | None:
    """The same 2048 x 2048 float32 matmul through OpenVINO's CPU plugin, compiled as DeepSeg compiles networks
    (torch's thread count, float32); None without OpenVINO. torch's matmul is not the CPU's peak everywhere: on
    an AMD EPYC (Zen 5) it reached 210 GFLOP/s while OpenVINO's convolutions ran at 454, so a fraction of
    torch's matmul alone can exceed 1."""
    if not installed("openvino"):
        return None
    import openvino
    import openvino.opset13 as ops

    from deepseg_core.inference.backends import openvino_core, openvino_properties

    rng = np.random.default_rng(1)
    left = ops.parameter([2048, 2048], openvino.Type.f32)
    product = ops.matmul(left, ops.constant(rng.normal(size=(2048, 2048)).astype(np.float32)), False, False)
    model = openvino.Model([product], [left], "matmul")
    request = openvino_core().compile_model(model, "CPU", openvino_properties("float32")).create_infer_request()
    operand = rng.normal(size=(2048, 2048)).astype(np.float32)
    request.infer({0: operand})
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        request.infer({0: operand})
        count += 1
    return 2 * 2048**3 * count / (time.perf_counter() - start) / 1e9


def float32_ceiling_gflops(device: torch.device) -> tuple[float, dict[str, float]]:
    """The float32 ceiling every fraction is taken of: the faster of torch's and (on the CPU) OpenVINO's 2048 x 2048
    matmul, each measured here; returns it and both figures (``{"torch": ..., "openvino": ...}``)."""
    by_runtime = {"torch": matmul_ceiling_gflops(device)}
    if device.type == "cpu" and (openvino := openvino_matmul_gflops()) is not None:
        by_runtime["openvino"] = openvino
    return max(by_runtime.values()), by_runtime


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_monai(net, image, batch, device, repeats, weight_map=None, amp=False, copy="all_classes"):
    """Best-of-``repeats`` seconds and the foreground probabilities of MONAI's sliding window.

    ``copy``: what of MONAI's output is brought to host memory inside the timing. ``all_classes`` (the
    default) is like for like with DeepSeg, whose sliding window hands every class of each finished slab
    to host memory (the collector needs them all); ``foreground`` copies one class, the definition of
    this benchmark's CUDA rows before 2026-11-26 (``*_foreground_copy`` rows). On the CPU both are free."""
    from monai.inferers import sliding_window_inference

    def predict_probabilities(tiles):
        # DeepSeg (like nnU-Net) blends probabilities, MONAI blends whatever the predictor returns:
        # give it probabilities so both compute the same thing.
        return torch.softmax(net(tiles), 1)

    best, probs = float("inf"), None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=amp):
            out = sliding_window_inference(
                image[None].to(device),
                PATCH,
                batch,
                predict_probabilities,
                overlap=OVERLAP,
                mode="gaussian",
                sigma_scale=0.125,
                roi_weight_map=weight_map,
            )
            probs = out[0].float().cpu().numpy()[1] if copy == "all_classes" else out[0, 1].float().cpu().numpy()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, probs


def time_deepseg(net, image, batch, device, repeats, amp=False):
    """Best-of-``repeats`` seconds, the foreground probabilities, and the sliding window's stats.

    ``amp``: float16 autocast (CUDA only; DeepSeg's default there). Off, so that both tools compute in
    float32 unless a row says otherwise."""
    best, probs, stats = float("inf"), np.zeros(SHAPE_ZYX, np.float32), {}
    config = SlidingWindowConfig(patch_size_zyx=PATCH, overlap=OVERLAP, batch_size=batch, sigma_scale=0.125, amp=amp)
    for _ in range(repeats):
        # Inside the timing both tools only bring every class to host memory: MONAI's foreground is
        # a view of its copied output, so DeepSeg's slabs are kept by reference and the foreground is
        # gathered from them after the clock stops (before 2026-11-27 it was copied inside the timing:
        # at 300 x 512 x 512 a 315 MB copy MONAI's row did not make).
        slabs: list = []
        sync(device)
        start = time.perf_counter()
        stats = sliding_window_predict(
            net, image, 2, config, lambda z0, z1, slab, kept=slabs: kept.append((z0, z1, slab)), device=device
        )
        sync(device)
        best = min(best, time.perf_counter() - start)
        for z0, z1, slab in slabs:
            probs[z0:z1] = slab[1]
    return best, probs, stats


def time_network_only(net, image, batch, device, repeats, amp=False) -> float:
    """Best-of-``repeats`` seconds of DeepSeg's tile batches cut from the image on the device, forward and
    softmax, nothing blended or copied back: what the network alone costs a GPU run."""
    # as DeepSeg's sliding window does: a side shorter than the patch is padded with zeros at its end
    padded = [max(s, p) for s, p in zip(SHAPE_ZYX, PATCH, strict=True)]
    pads = [amount for s, p in zip(reversed(SHAPE_ZYX), reversed(padded), strict=True) for amount in (0, p - s)]
    on_device = torch.nn.functional.pad(image, pads).to(device)
    starts = list(itertools.product(*(tile_starts(s, p, OVERLAP) for s, p in zip(padded, PATCH, strict=True))))
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        with torch.inference_mode(), torch.autocast(device.type, torch.float16, enabled=amp):
            for index in range(0, len(starts), batch):
                tiles = torch.stack(
                    [
                        on_device[:, z : z + PATCH[0], y : y + PATCH[1], x : x + PATCH[2]]
                        for z, y, x in starts[index : index + batch]
                    ]
                )
                torch.softmax(net(tiles).float(), 1)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def time_copies_back(device, repeats) -> dict[str, float]:
    """Best-of-``repeats`` seconds to copy to host memory the blended volume ``(2, Z, Y, X)`` float32:
    all classes straight to pageable memory (``all_classes``: what DeepSeg's slabs cost before
    2026-11-27 and what this benchmark's MONAI rows do), one class of it (``foreground``: what the
    benchmark copied from MONAI's output before 2026-11-26), and all classes in DeepSeg's slab pieces
    through its page-locked staging buffer (``all_classes_pinned_staging``, ``SlabCopier``; the first
    repeat also page-locks the buffer, so read it with ``--repeats`` 2 or more). Also the
    seconds to page-lock one staging buffer (``pin_staging_buffer``: paid once per process, since
    torch's caching host allocator keeps it; absent where this torch cannot empty that cache)."""
    volume = torch.rand((2, *SHAPE_ZYX), device=device)
    piece_depth = max(1, SLAB_PIECE_BYTES // (volume[:, 0].numel() * 4))
    copier = SlabCopier(volume[:, :piece_depth].numel())

    # contiguous, as the normalised slabs of a run are
    pieces = [volume[:, z : z + piece_depth].contiguous() for z in range(0, SHAPE_ZYX[0], piece_depth)]

    def staged() -> None:
        for piece in pieces:
            copier(piece)

    best = {"all_classes": float("inf"), "foreground": float("inf"), "all_classes_pinned_staging": float("inf")}
    for _ in range(repeats):
        for key, copy in (
            ("all_classes", lambda: volume.cpu().numpy()),
            ("foreground", lambda: volume[1].cpu().numpy()),
            ("all_classes_pinned_staging", staged),
        ):
            sync(device)
            start = time.perf_counter()
            copy()
            best[key] = min(best[key], time.perf_counter() - start)
    empty_host_cache = getattr(torch._C, "_host_emptyCache", getattr(torch._C, "_accelerator_emptyHostCache", None))
    if empty_host_cache is not None:
        copier.staging = None
        empty_host_cache()
        start = time.perf_counter()
        torch.empty(copier.max_elements, pin_memory=True)
        best["pin_staging_buffer"] = time.perf_counter() - start
    return best


def same_tiles_difference(net, device) -> float:
    """Max |p_DeepSeg - p_MONAI| on 168^3, where both place tiles at [0, 72] and use DeepSeg's weights."""
    global SHAPE_ZYX
    saved, SHAPE_ZYX = SHAPE_ZYX, (168, 168, 168)
    try:
        image = torch.from_numpy(np.random.default_rng(1).normal(size=(1, *SHAPE_ZYX)).astype(np.float32))
        weights = gaussian_importance(PATCH, 0.125).to(device)
        _, monai_probs = time_monai(net, image, 2, device, 1, weight_map=weights)
        _, deepseg_probs, _ = time_deepseg(net, image, 2, device, 1)
    finally:
        SHAPE_ZYX = saved
    return float(np.abs(monai_probs - deepseg_probs).max())


def openvino_layer_times(
    net: torch.nn.Module, input_shape: tuple[int, ...], cache: Path, flops_per_tile: float, ceiling: float
) -> dict:
    """OpenVINO's own per-layer timers (``PERF_COUNT``) over one request of the graph DeepSeg runs for tile
    batches of ``input_shape`` (one tile: ``graph_input_shape``), best of 3: seconds per layer type, and the
    GFLOP/s inside the convolutions alone (every FLOP counted above is a convolution's), which bounds the
    fraction of the ceiling the whole network can reach."""
    from deepseg_core.inference.backends import cached_onnx, graph_input_shape, openvino_core, openvino_properties

    shape = graph_input_shape("openvino", tuple(input_shape))
    tiles_per_request = shape[0]
    graph = cached_onnx(net, "0" * 64, "openvino", shape, cache)
    properties = {**openvino_properties("float32"), "PERF_COUNT": True}
    request = openvino_core().compile_model(str(graph), "CPU", properties).create_infer_request()
    tiles = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    best: dict[str, float] = {}
    for _ in range(3):
        request.infer({0: tiles})
        by_type: dict[str, float] = {}
        for layer in request.profiling_info:
            by_type[layer.node_type] = by_type.get(layer.node_type, 0.0) + layer.real_time.total_seconds()
        if not best or sum(by_type.values()) < sum(best.values()):
            best = by_type
    convolution_s = sum(seconds for kind, seconds in best.items() if kind.startswith("Convolution"))
    total_s = sum(best.values())
    convolution_gflops = tiles_per_request * flops_per_tile / convolution_s / 1e9
    return {
        "tiles_per_request": tiles_per_request,
        "seconds_per_request": total_s,
        "seconds_per_tile": total_s / tiles_per_request,
        "seconds_by_layer_type": dict(sorted(best.items(), key=lambda item: -item[1])),
        "convolution_seconds_per_tile": convolution_s / tiles_per_request,
        "convolution_share_of_time": convolution_s / total_s,
        "convolution_gflops": convolution_gflops,
        "convolution_fraction_of_ceiling": convolution_gflops / ceiling,
    }


def openvino_request_batch_sweep(
    net: torch.nn.Module, cache: Path, batches: tuple[int, ...] = (1, 2, 3), calls: int = 10
) -> dict:
    """Seconds per tile of one float32 OpenVINO request of ``b`` tiles, for each ``b`` in ``batches``: the network
    exported for each, called in turn ``calls`` times (after one warm-up call each), the median per tile."""
    from deepseg_core.inference.backends import cached_onnx, openvino_core, openvino_properties

    requests = {}
    for batch in batches:
        # the one-tile graph is the one the sliding window and openvino_layer_times exported into ``cache``
        graph = cached_onnx(net, "0" * 64, "openvino", (batch, 1, *PATCH), cache)
        request = openvino_core().compile_model(str(graph), "CPU", openvino_properties("float32")).create_infer_request()
        tiles = np.random.default_rng(batch).normal(size=(batch, 1, *PATCH)).astype(np.float32)
        request.infer({0: tiles})
        requests[batch] = (request, tiles)
    seconds: dict[int, list[float]] = {batch: [] for batch in batches}
    for _ in range(calls):
        for batch, (request, tiles) in requests.items():
            start = time.perf_counter()
            request.infer({0: tiles})
            seconds[batch].append((time.perf_counter() - start) / batch)
    return {str(batch): float(np.median(values)) for batch, values in seconds.items()}


def cuda_ceilings(device: torch.device) -> dict[str, float]:
    """Matmul GFLOP/s in the arithmetic the CUDA rows use: TF32 (cuDNN's default for float32
    convolutions, ``torch.backends.cudnn.allow_tf32``) and float16."""
    saved = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        tf32 = matmul_ceiling_gflops(device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    with torch.autocast("cuda", torch.float16):
        fp16 = matmul_ceiling_gflops(device)
    ceilings = {"float16": fp16}
    if torch.backends.cudnn.allow_tf32:
        ceilings["tf32"] = tf32
    return ceilings


def cuda_rows(net, image, batch, device, repeats, reference_probs, backends) -> dict:
    """On CUDA: MONAI and DeepSeg under float16 autocast (DeepSeg's default there), torch.compile'd
    networks (compile time reported apart), the parts of a run timed alone (``parts_s``), and whether
    TensorRT is installed. Adds rows to ``backends``."""
    import importlib.util

    monai_fp16, _ = time_monai(net, image, batch, device, repeats, amp=True)
    foreground_f32, _ = time_monai(net, image, batch, device, repeats, copy="foreground")
    foreground_f16, _ = time_monai(net, image, batch, device, repeats, amp=True, copy="foreground")
    rows: dict = {
        f"monai_s_batch{batch}_float16": monai_fp16,
        f"monai_s_batch{batch}_foreground_copy": foreground_f32,
        f"monai_s_batch{batch}_float16_foreground_copy": foreground_f16,
        "ceilings": cuda_ceilings(device),
    }
    seconds, probs, _ = time_deepseg(net, image, batch, device, repeats, amp=True)
    backends["torch/float16"] = {"seconds": seconds, "max_abs_prob_diff_vs_torch": float(np.abs(probs - reference_probs).max())}
    compiled = torch.compile(net)
    for key, amp in (("torch.compile", False), ("torch.compile/float16", True)):
        # the first pass compiles (for the full batch and for a smaller last batch): timed apart
        first_pass_s, _, _ = time_deepseg(compiled, image, batch, device, 1, amp=amp)
        seconds, probs, _ = time_deepseg(compiled, image, batch, device, repeats, amp=amp)
        backends[key] = {
            "seconds": seconds,
            "first_pass_s": first_pass_s,
            "max_abs_prob_diff_vs_torch": float(np.abs(probs - reference_probs).max()),
        }
    rows["parts_s"] = {
        "network_only_float32": time_network_only(net, image, batch, device, repeats),
        "network_only_float16": time_network_only(net, image, batch, device, repeats, amp=True),
        **{f"copy_back_{key}": seconds for key, seconds in time_copies_back(device, repeats).items()},
    }
    rows["cudnn_allow_tf32"] = torch.backends.cudnn.allow_tf32
    rows["tensorrt"] = "installed" if importlib.util.find_spec("torch_tensorrt") else "not installed"
    return rows


def main() -> int:
    global SHAPE_ZYX
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=2, help="DeepSeg tile batch (its CPU default; also MONAI's second run)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--volume-zyx", type=int, nargs=3, default=list(SHAPE_ZYX), metavar=("Z", "Y", "X"))
    args = parser.parse_args()
    SHAPE_ZYX = tuple(args.volume_zyx)
    device = torch.device(args.device)
    net = reference_net().to(device)
    image = torch.from_numpy(np.random.default_rng(0).normal(size=(1, *SHAPE_ZYX)).astype(np.float32))
    with torch.inference_mode():
        net(torch.zeros(2, 1, *PATCH, device=device))  # warm-up
    flops = forward_flops(net, device)
    ceiling, ceiling_by_runtime = float32_ceiling_gflops(device)
    monai_default, monai_probs = time_monai(net, image, 1, device, args.repeats)
    monai_batched, _ = time_monai(net, image, args.batch, device, args.repeats)
    deepseg_time, deepseg_probs, stats = time_deepseg(net, image, args.batch, device, args.repeats)
    achieved = stats["tiles"] * flops / deepseg_time / 1e9
    backends = {"torch": {"seconds": deepseg_time, "max_abs_prob_diff_vs_torch": 0.0}}
    with tempfile.TemporaryDirectory() as cache:
        runs = [("openvino", "float32"), ("onnxruntime", "float32")]
        if native_bfloat16():  # --precision bfloat16 (AMX / AVX512-BF16 CPUs)
            runs += [("openvino", "bfloat16"), ("torch", "bfloat16")]
        for name, precision in runs:
            if not installed(name) or device.type != "cpu":
                continue
            shape = (args.batch, 1, *PATCH)
            choice = choose_backend(name, device, precision=precision)
            tiles, used = tile_function(net, choice, "0" * 64, shape, Path(cache), precision)
            seconds, probs, _ = time_deepseg(tiles, image, args.batch, device, args.repeats)
            key = used.name if precision == "float32" else f"{used.name}/{precision}"
            backends[key] = {
                "seconds": seconds,
                "max_abs_prob_diff_vs_torch": float(np.abs(probs - deepseg_probs).max()),
                "label_agreement_vs_torch": float(((probs > 0.5) == (deepseg_probs > 0.5)).mean()),
            }
        layers, request_batches = {}, {}
        if installed("openvino") and device.type == "cpu":
            layers = openvino_layer_times(net, (args.batch, 1, *PATCH), Path(cache), flops, ceiling)
            request_batches = openvino_request_batch_sweep(net, Path(cache))
    ceilings = {"float32": ceiling}
    cuda: dict = {}
    default, monai_same_batch = choose_backend("auto", device).name, monai_batched
    if device.type == "cuda":
        cuda = cuda_rows(net, image, args.batch, device, args.repeats, deepseg_probs, backends)
        ceilings.update(cuda.pop("ceilings"))
        # DeepSeg's default on CUDA is float16 autocast: the headline compares it with MONAI under the same autocast
        default, monai_same_batch = "torch/float16", cuda[f"monai_s_batch{args.batch}_float16"]
    for key, entry in backends.items():
        entry["s_per_tile"] = entry["seconds"] / stats["tiles"]
        entry["gflops"] = stats["tiles"] * flops / entry["seconds"] / 1e9
        arithmetic = "float16" if key.endswith("/float16") else "tf32" if "tf32" in ceilings else "float32"
        entry["fraction_of_ceiling"] = entry["gflops"] / ceilings[arithmetic]
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "cpu": cpu_description(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "volume_zyx": SHAPE_ZYX,
        "patch": PATCH,
        "overlap": OVERLAP,
        "tiles": stats["tiles"],
        "gflop_per_tile": flops / 1e9,
        "monai_s_batch1": monai_default,
        f"monai_s_batch{args.batch}": monai_batched,
        f"deepseg_s_batch{args.batch}": deepseg_time,
        **cuda,
        "default_backend": default,
        "ratio_vs_monai_default": backends[default]["seconds"] / monai_default,
        "ratio_vs_monai_same_batch": backends[default]["seconds"] / monai_same_batch,
        "ratio_vs_monai_same_batch_torch": deepseg_time / monai_batched,
        "deepseg_gflops": backends[default]["gflops"],
        "matmul_ceiling_gflops": ceiling,
        "matmul_ceilings_gflops": ceilings,
        "float32_matmul_by_runtime_gflops": ceiling_by_runtime,
        "fraction_of_ceiling": backends[default]["fraction_of_ceiling"],
        "torch_backend_gflops": achieved,
        "openvino_layers": layers,
        "openvino_seconds_per_tile_by_request_batch": request_batches,
        "backends": backends,
        # On 192 voxels DeepSeg spaces tiles evenly ([0, 48, 96]); MONAI steps by 72 and clamps the
        # last tile ([0, 72, 96]); MONAI also floors its Gaussian at 1e-3. With random weights the
        # tiles disagree a lot, so the blends differ; same_tiles_max_abs_diff checks the arithmetic.
        "mean_abs_prob_diff": float(np.abs(monai_probs - deepseg_probs).mean()),
        "same_tiles_max_abs_diff": same_tiles_difference(net, device),
        "label_agreement": float(((monai_probs > 0.5) == (deepseg_probs > 0.5)).mean()),
        "label_agreement_margin_0.1": float(
            ((monai_probs > 0.5) == (deepseg_probs > 0.5))[np.abs(monai_probs - 0.5) > 0.05].mean()
        ),
    }
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>32}: {value:.4g}" if isinstance(value, float) else f"{key:>32}: {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
