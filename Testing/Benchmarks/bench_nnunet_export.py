"""Time of nnU-Net's export in DeepSeg (``NnUNetExportCollector``): network-grid logits back to a 512 x 512 x 300 CT.

    python Testing/Benchmarks/bench_nnunet_export.py [--json] [--device cpu] [--threads 2] [--classes 3 14]
        [--transpose 0 1 2] [--repeats 3] [--labels-only] [--logits random|atlas] [--every-class]
        [--network-zyx 200 273 273]

The geometry of ``bench_vs_nnunet.py``'s largest case: logits on the network grid (200 x 273 x 273 at
1.5 mm; ``--network-zyx 100 137 137`` is 3 mm, the spacing of TotalSegmentator's ``--fast`` model) go
back to the cropped input grid (300 x 512 x 512 at 1.0 x 0.8 x 0.8 mm), linear along every axis (no
separate axis), then argmax, crop reverted and ``transpose_forward`` undone. The logits are
handed over in z slabs of 64 then 32 slices as the sliding window finishes them, float32, either
random normal (``--logits random``: every class is close to winning everywhere) or made from real
anatomy (``--logits atlas``): the AAL atlas's 116 regions and background (``Testing/data/cache/aal.nii.gz``,
from ``scripts/fetch_test_images.py``) stretched onto the network grid by nearest neighbour, region
``v`` as class ``v * classes // 117``, each class's indicator averaged over 5 x 5 x 5 voxels and mapped
to ``12 * (average - 0.5)`` plus normal noise of 0.3, so classes meet in soft borders as a trained
network's do. With labels only and at least ``CANDIDATE_MIN_CLASSES`` classes the export interpolates
per output slice only the classes that can win there; ``interpolated_channels_per_slice`` is their
mean. ``--every-class`` also times, in each repeat and on the same logits, the export with every class
interpolated (``candidates_only=False``, the way before), checks that the labels are the same, and
reports ``ratio_to_every_class`` and the classes present per output slice (a sample of 30).

Reported for each class count, with labels only and with float16 probabilities and the entropy map as
well (``--probabilities`` in ``deepseg segment``): the best of ``--repeats`` seconds, and seconds per
output slice. The export runs while the sliding
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

NETWORK_SHAPE = (200, 273, 273)  # --network-zyx changes it (TotalSegmentator's 3 mm model: 100 137 137)
CROP_SPACING = (1.0, 0.8, 0.8)
CROP_SHAPE = (300, 512, 512)
SLAB_DEPTHS = (64, 32)


def context() -> dict:
    return {
        "shape_before_crop": CROP_SHAPE,
        "bbox": [[0, s] for s in CROP_SHAPE],
        "shape_after_crop": CROP_SHAPE,
        "network_shape": NETWORK_SHAPE,
        # the grid's own spacing, so that no axis is anisotropic enough to be taken separately
        "network_spacing": [s * c / n for s, c, n in zip(CROP_SPACING, CROP_SHAPE, NETWORK_SHAPE, strict=True)],
        "spacing_transposed": list(CROP_SPACING),
    }


AAL = Path(__file__).resolve().parents[1] / "data" / "cache" / "aal.nii.gz"
AAL_CLASSES = 117  # 116 regions and the background


def atlas_labels(classes: int) -> np.ndarray:
    """The AAL atlas's regions as ``classes`` classes on the network grid ``NETWORK_SHAPE``, int64."""
    import SimpleITK as sitk

    if not AAL.is_file():
        raise SystemExit(f"--logits atlas needs {AAL}: run `python scripts/fetch_test_images.py` (make test-data)")
    regions = sitk.GetArrayFromImage(sitk.ReadImage(str(AAL))).astype(np.int64)
    picks = [np.linspace(0, regions.shape[a] - 1, NETWORK_SHAPE[a]).round().astype(np.int64) for a in range(3)]
    return regions[np.ix_(*picks)] * classes // AAL_CLASSES


def box_average(values, axis: int, width: int = 5):
    """The mean over ``width`` neighbours along ``axis`` (fewer at the edges), for a torch tensor."""
    import torch

    half = width // 2
    size = values.shape[axis]
    total = values.clone()
    for shift in range(1, half + 1):
        total.narrow(axis, 0, size - shift).add_(values.narrow(axis, shift, size - shift))
        total.narrow(axis, shift, size - shift).add_(values.narrow(axis, 0, size - shift))
    index = torch.arange(size)
    counts = (torch.minimum(index + half, torch.tensor(size - 1)) - torch.clamp(index - half, min=0) + 1).float()
    shape = [1] * values.ndim
    shape[axis] = size
    return total.div_(counts.view(shape))


def atlas_logits(labels: np.ndarray, z0: int, z1: int, classes: int, generator) -> np.ndarray:
    """Soft-bordered logits ``(classes, z1 - z0, *NETWORK_SHAPE[1:])`` float32 of ``labels``' slices ``[z0, z1)``."""
    import torch

    out = np.empty((classes, z1 - z0, *NETWORK_SHAPE[1:]), dtype=np.float32)
    for start in range(z0, z1, 8):  # a few slices at a time: one-hot of 117 classes is large
        stop = min(start + 8, z1)
        lo, hi = max(start - 2, 0), min(stop + 2, NETWORK_SHAPE[0])
        part_labels = torch.from_numpy(labels[lo:hi])[None]
        average = torch.zeros((classes, *part_labels.shape[1:])).scatter_(0, part_labels, 1.0)
        for axis in (1, 2, 3):
            average = box_average(average, axis)
        part = average[:, start - lo : stop - lo]
        noise = torch.randn(part.shape, generator=generator)
        out[:, start - z0 : stop - z0] = part.sub_(0.5).mul_(12).add_(noise.mul_(0.3)).numpy()
    return out


def slabs(classes: int, logits: str = "random") -> list[tuple[int, int, np.ndarray]]:
    """``(z0, z1, logits (K, z1 - z0, *NETWORK_SHAPE[1:]))`` in z order, as the sliding window hands them over."""
    rng = np.random.default_rng(classes)
    labels = atlas_labels(classes) if logits == "atlas" else None
    if labels is not None:
        import torch

        generator = torch.Generator().manual_seed(classes)
    out, z = [], 0
    while z < NETWORK_SHAPE[0]:
        depth = min(SLAB_DEPTHS[0] if z == 0 else SLAB_DEPTHS[1], NETWORK_SHAPE[0] - z)
        if labels is None:
            values = rng.normal(size=(classes, depth, *NETWORK_SHAPE[1:])).astype(np.float32)
        else:
            values = atlas_logits(labels, z, z + depth, classes, generator)
        out.append((z, z + depth, values))
        z += depth
    return out


def run_export(pieces: list, classes: int, transpose: list[int], probabilities: bool, **options) -> tuple[float, object]:
    """One export of ``pieces``: seconds, and the collector (after ``finish``) with its output."""
    from deepseg_core.pipelines.nnunet import NnUNetExportCollector

    start = time.perf_counter()
    collector = NnUNetExportCollector(
        context(),
        list(range(classes)),
        transpose,
        {"order": 1, "order_z": 0, "force_separate_z": None},
        keep_probabilities=probabilities,
        uncertainty=probabilities,
        **options,
    )
    for z0, z1, logits in pieces:
        collector.add(z0, z1, logits)
    collector.output = collector.finish()
    return time.perf_counter() - start, collector


def time_export(
    classes: int, transpose: list[int], probabilities: bool, repeats: int, logits: str = "random", every_class: bool = False
) -> dict:
    """The best of ``repeats`` exports; with ``every_class``, each repeat also runs the export that interpolates
    every class for every output slice (``candidates_only=False``), right after, on the same logits."""
    pieces = slabs(classes, logits)
    best, best_every = float("inf"), float("inf")
    for _ in range(repeats):
        seconds, collector = run_export(pieces, classes, transpose, probabilities)
        best = min(best, seconds)
        if every_class:
            seconds, every = run_export(pieces, classes, transpose, probabilities, candidates_only=False)
            best_every = min(best_every, seconds)
            if not np.array_equal(collector.output.labels_zyx, every.output.labels_zyx):
                raise SystemExit(f"{classes} classes: the labels differ from those of every class interpolated")
    # the engine before the per-slice candidates had no such counter
    interpolated = getattr(collector, "interpolated_channel_slices", None)
    result = {
        "seconds": best,
        "seconds_per_output_slice": best / CROP_SHAPE[0],
        "interpolated_channels_per_slice": None if interpolated is None else interpolated / CROP_SHAPE[0],
    }
    if every_class:
        result.update(
            seconds_every_class=best_every,
            ratio_to_every_class=best / best_every,
            labels_equal_to_every_class=True,
            classes_per_output_slice=float(
                np.mean([len(np.unique(s)) for s in collector.output.labels_zyx[:: max(1, CROP_SHAPE[0] // 30)]])
            ),
        )
    return result


def main() -> int:
    global NETWORK_SHAPE
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
    parser.add_argument(
        "--logits", choices=["random", "atlas"], default="random", help="random normal, or soft borders of real anatomy (AAL)"
    )
    parser.add_argument(
        "--every-class",
        action="store_true",
        help="also time, in the same run, the export that interpolates every class for every output slice",
    )
    parser.add_argument(
        "--network-zyx",
        type=int,
        nargs=3,
        default=list(NETWORK_SHAPE),
        help="the network grid (default 200 273 273: 1.5 mm; 100 137 137 is 3 mm, TotalSegmentator's --fast)",
    )
    args = parser.parse_args()
    NETWORK_SHAPE = tuple(args.network_zyx)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict = {
        "network_shape_zyx": NETWORK_SHAPE,
        "output_shape_zyx": CROP_SHAPE,
        "transpose_forward": args.transpose,
        "logits": args.logits,
        "torch_threads": torch.get_num_threads(),
        "runs": {},
    }
    for classes in args.classes:
        for probabilities in (False,) if args.labels_only else (False, True):
            key = f"{classes}_classes" + ("_with_probabilities" if probabilities else "")
            result["runs"][key] = time_export(
                classes, args.transpose, probabilities, args.repeats, args.logits, args.every_class and not probabilities
            )
            if not args.json:
                print(f"{key:>32}: {result['runs'][key]['seconds']:.3f} s", flush=True)
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
