"""Could fewer multiplications make float32 convolutions faster on a CPU? Winograd's F(m, 3) for one layer.

    python Testing/Benchmarks/probe_winograd.py [--channels 32 32] [--size 128] [--threads 2] [--repeats 3]
        [--tile-rows 1 2 4] [--no-openvino]

Issue 14 asks for DeepSeg's float32 run at half of nnU-Net's time. On an AVX2 CPU, OpenVINO's
convolutions of nnU-Net's default network already run at the CPU's float32 peak and take 0.70 of
nnU-Net's time on their own (README, "On an AVX2 CPU"), so only fewer operations could go lower.
Winograd's minimal filtering F(m x m x m, 3 x 3 x 3) computes an m^3 block of a 3^3 convolution's
outputs from an (m + 2)^3 block of inputs with (m + 2)^3 multiplications per input and output channel
instead of 27 m^3: 3.4 times fewer for m = 2, 8 times fewer for m = 4. The rest is transforms, one
pass over each transformed block, so it is bound by memory traffic unless the blocks stay in cache.

This probe measures that trade on one layer of the network's most expensive stage (32 channels in
and out at 128^3, half of the network's FLOPs are at this resolution), the layer alone, batch 1:

* ``torch_direct``: ``F.conv3d`` (oneDNN), as nnU-Net runs it;
* ``openvino_direct``: the same layer compiled by OpenVINO (what ``--backend auto`` runs);
* ``winograd``: F(2, 3) and F(4, 3) written in torch operations (tensordot and a batched matmul),
  taking ``--tile-rows`` x ``--tile-rows`` rows of output blocks along z and y (all of x) at a time,
  so that the transformed blocks of one step stay small (in cache); ``gemm_only_s`` is the batched
  matmul alone, the floor of this formulation.

Every time is the best of ``--repeats`` calls after a warm-up. ``effective_gflops`` is the direct
convolution's FLOP count over the time. ``max_rel_error`` is each result's largest difference from a
float64 convolution, over the largest output magnitude (the direct float32 convolution's own error is
given for scale). Inputs and weights are seeded normal numbers scaled as after an instance norm and
a Kaiming initialisation. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_sliding_window import cpu_description, matmul_ceiling_gflops


def winograd_matrices(m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(B^T, G, A^T)`` of F(m, 3) in float64: input transform ``(m+2, m+2)``, filter transform
    ``(m+2, 3)``, output transform ``(m, m+2)`` (Lavin and Gray 2016, points 0, +-1, +-2 and infinity)."""
    if m == 2:
        bt = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
        g = [[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]]
        at = [[1, 1, 1, 0], [0, 1, -1, -1]]
    elif m == 4:
        bt = [
            [4, 0, -5, 0, 1, 0],
            [0, -4, -4, 1, 1, 0],
            [0, 4, -4, -1, 1, 0],
            [0, -2, -1, 2, 1, 0],
            [0, 2, -1, -2, 1, 0],
            [0, 4, 0, -5, 0, 1],
        ]
        g = [
            [1 / 4, 0, 0],
            [-1 / 6, -1 / 6, -1 / 6],
            [-1 / 6, 1 / 6, -1 / 6],
            [1 / 24, 1 / 12, 1 / 6],
            [1 / 24, -1 / 12, 1 / 6],
            [0, 0, 1],
        ]
        at = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
    else:
        raise ValueError(f"F({m}, 3) is not written here; use m = 2 or 4")
    return tuple(torch.tensor(a, dtype=torch.float64) for a in (bt, g, at))


def _along_last_three(blocks: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``matrix`` applied along each of the last three axes of ``blocks`` (``(..., n, n, n)`` to ``(..., r, r, r)``)."""
    for _ in range(3):
        # contracting the first of the three moves the result's axis last, so three steps cycle back
        blocks = torch.tensordot(blocks, matrix, dims=([blocks.ndim - 3], [1]))
    return blocks


def transformed_filters(weight: torch.Tensor, m: int) -> torch.Tensor:
    """The filters ``(K, C, 3, 3, 3)`` in the Winograd domain: ``((m+2)^3, K, C)``."""
    _, g, _ = (a.to(weight.dtype) for a in winograd_matrices(m))
    k, c = weight.shape[:2]
    u = _along_last_three(weight, g)  # (K, C, a, a, a)
    return u.reshape(k, c, -1).permute(2, 0, 1).contiguous()


def winograd_conv3d(x: torch.Tensor, u: torch.Tensor, m: int, tile_rows: int) -> torch.Tensor:
    """A 3^3 convolution (padding 1, stride 1, no bias) of ``x`` ``(C, Z, Y, X)`` with filters already
    transformed (``u``: ``((m+2)^3, K, C)``), ``tile_rows`` x ``tile_rows`` rows of ``m``-voxel output blocks
    along z and y (and all of x) per step. Returns ``(K, Z, Y, X)``."""
    bt, _, at = (a.to(x.dtype) for a in winograd_matrices(m))
    a = m + 2
    c, z, y, xx = x.shape
    k = u.shape[1]
    tiles = [-(-n // m) for n in (z, y, xx)]
    padded = F.pad(x, (1, tiles[2] * m + 1 - xx, 1, tiles[1] * m + 1 - y, 1, tiles[0] * m + 1 - z))
    out = torch.empty(k, tiles[0] * m, tiles[1] * m, tiles[2] * m, dtype=x.dtype)
    for row_z in range(0, tiles[0], tile_rows):
        rows_z = min(tile_rows, tiles[0] - row_z)
        for row_y in range(0, tiles[1], tile_rows):
            rows_y = min(tile_rows, tiles[1] - row_y)
            n_blocks = rows_z * rows_y * tiles[2]
            part = padded[:, row_z * m : row_z * m + rows_z * m + 2, row_y * m : row_y * m + rows_y * m + 2]
            blocks = part.unfold(1, a, m).unfold(2, a, m).unfold(3, a, m)  # (C, rows_z, rows_y, tx, a, a, a)
            v = _along_last_three(blocks, bt).reshape(c, n_blocks, a**3).permute(2, 0, 1)  # (a^3, C, blocks)
            products = torch.bmm(u, v)  # (a^3, K, blocks)
            products = products.reshape(a, a, a, k, rows_z, rows_y, tiles[2]).permute(3, 4, 5, 6, 0, 1, 2)
            result = _along_last_three(products, at).permute(0, 1, 4, 2, 5, 3, 6)  # (K, rows_z, m, rows_y, m, tx, m)
            out[:, row_z * m : (row_z + rows_z) * m, row_y * m : (row_y + rows_y) * m] = result.reshape(
                k, rows_z * m, rows_y * m, -1
            )
    return out[:, :z, :y, :xx]


def gemm_steps(u: torch.Tensor, shape_zyx: tuple[int, int, int], m: int, tile_rows: int) -> Callable[[], None]:
    """The batched matmuls of :func:`winograd_conv3d`'s steps alone, as one call: on one buffer of normal numbers
    made here, so that the call times neither the transforms nor an allocation."""
    tiles = [-(-n // m) for n in shape_zyx]
    most = tile_rows * tile_rows * tiles[2]
    transformed = torch.randn(u.shape[0], u.shape[2], most, dtype=u.dtype)
    products = torch.empty(u.shape[0], u.shape[1], most, dtype=u.dtype)
    blocks = [
        min(tile_rows, tiles[0] - z) * min(tile_rows, tiles[1] - y) * tiles[2]
        for z in range(0, tiles[0], tile_rows)
        for y in range(0, tiles[1], tile_rows)
    ]

    def run() -> None:
        for n in blocks:
            torch.bmm(u, transformed[:, :, :n], out=products[:, :, :n])

    return run


def best_of(repeats: int, call: Callable[[], object]) -> float:
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return min(times)


def openvino_direct(weight: torch.Tensor, x: torch.Tensor, threads: int, repeats: int) -> tuple[float, np.ndarray]:
    import openvino as ov

    layer = torch.nn.Conv3d(weight.shape[1], weight.shape[0], 3, padding=1, bias=False)
    layer.weight.data.copy_(weight)
    model = ov.convert_model(layer.eval(), example_input=x[None])
    compiled = ov.Core().compile_model(
        model, "CPU", {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1}
    )
    request = compiled.create_infer_request()
    array = x[None].numpy()
    seconds = best_of(repeats, lambda: request.infer([array]))
    return seconds, np.array(request.get_output_tensor(0).data[0])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, nargs=2, default=[32, 32], metavar=("IN", "OUT"))
    parser.add_argument("--size", type=int, default=128, help="edge of the cubic input, voxels")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tile-rows", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--no-openvino", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cin, cout = args.channels
    generator = torch.Generator().manual_seed(0)
    x64 = torch.randn(cin, args.size, args.size, args.size, generator=generator, dtype=torch.float64)
    w64 = torch.randn(cout, cin, 3, 3, 3, generator=generator, dtype=torch.float64) * (2.0 / (27 * cin)) ** 0.5
    x, w = x64.float(), w64.float()
    flop = 2.0 * 27 * cin * cout * args.size**3
    with torch.no_grad():
        exact = F.conv3d(x64[None], w64, padding=1)[0]
        scale = float(exact.abs().max())

        def error(result: torch.Tensor | np.ndarray) -> float:
            return float((torch.as_tensor(result).double() - exact).abs().max()) / scale

        report: dict = {
            "cpu": cpu_description(),
            "torch": torch.__version__,
            "threads": args.threads,
            "layer": {"in_channels": cin, "out_channels": cout, "size": args.size, "gflop": round(flop / 1e9, 2)},
            "float32_matmul_ceiling_gflops": round(matmul_ceiling_gflops(torch.device("cpu")), 1),
        }
        direct = F.conv3d(x[None], w, padding=1)[0]
        seconds = best_of(args.repeats, lambda: F.conv3d(x[None], w, padding=1))
        report["torch_direct"] = {
            "seconds": round(seconds, 4),
            "effective_gflops": round(flop / seconds / 1e9, 1),
            "max_rel_error": error(direct),
        }
        del direct
        if not args.no_openvino:
            seconds, result = openvino_direct(w, x, args.threads, args.repeats)
            report["openvino_direct"] = {
                "seconds": round(seconds, 4),
                "effective_gflops": round(flop / seconds / 1e9, 1),
                "max_rel_error": error(result),
            }
            del result
        report["winograd"] = []
        for m in (2, 4):
            u = transformed_filters(w64, m).float()
            for rows in args.tile_rows:
                result = winograd_conv3d(x, u, m, rows)
                err = error(result)
                del result
                seconds = best_of(args.repeats, lambda: winograd_conv3d(x, u, m, rows))  # noqa: B023 (called at once)
                gemm = best_of(args.repeats, gemm_steps(u, tuple(x.shape[1:]), m, rows))
                report["winograd"].append(
                    {
                        "m": m,
                        "tile_rows": rows,
                        "seconds": round(seconds, 4),
                        "effective_gflops": round(flop / seconds / 1e9, 1),
                        "gemm_only_s": round(gemm, 4),
                        "max_rel_error": err,
                    }
                )
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
