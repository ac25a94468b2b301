"""Speed against nnU-Net's own predictor: the same nnU-Net v2 model folder, the same CT, the same tiles.

    python Testing/Benchmarks/bench_vs_nnunet.py [--json] [--threads 2] [--backends auto torch]
        [--precisions float32 bfloat16] [--cases ct_128 ct_192x192x160 ct_512x512x300]
        [--device cpu|cuda] [--model-folder FOLDER] [--repeats 1]

Model: nnU-Net's default 3d_fullres ``PlainConvUNet`` (6 stages, 32-320 features, patch 128^3, target
spacing 1.5 mm, CT normalisation) made by nnU-Net's own code (``scripts/make_tiny_nnunet_model.py
--preset full``, cached; the weights do not matter for speed). Both tools: one fold, step 0.5, Gaussian
blending, no mirroring, CPU, ``--threads`` threads.

Images: the real head CT of TotalSegmentator's wheel (``python scripts/fetch_test_images.py``), its 0
background set to -1000 HU and resampled (linear, centred, air outside) onto three scanner grids, so
nnU-Net crops nothing and both tools tile the whole field of view:

* ``ct_128``: 128 x 128 x 128 at 1.5 mm (the network grid is one patch: 1 tile);
* ``ct_192x192x160``: 192 x 192 x 160 at 1.5 mm (8 tiles);
* ``ct_512x512x300``: 512 x 512 x 300 at 0.8 x 0.8 x 1.0 mm, a typical body-CT matrix (resampled to
  273 x 273 x 200 at 1.5 mm: 48 tiles).

Each run is its own fresh process; its times and peak RSS (``ru_maxrss``, imports included) are its own.
``--repeats N`` runs each case N times in turn (nnU-Net, then each DeepSeg backend and precision, then
nnU-Net again, ...), so that both tools see the same slow and fast spells of a shared machine. The row
then holds each tool's median run (by ``predict_s``) with every run's ``predict_s_runs``, and
``ratio_warm.predict`` is the median of the per-turn ratios (``predict_per_turn`` lists them).

* nnU-Net: ``nnUNetPredictor.initialize_from_trained_model_folder`` (``setup_s``) then
  ``predict_from_files_sequential`` (``predict_s``: read, preprocess, sliding window, export, write).
* DeepSeg: the folder is imported into a model store once (``import_s``, not part of any run). A run
  loads the model (``setup_s``), then reads, segments and writes the same file (``predict_s``). With
  ``--backends auto`` (OpenVINO, else ONNX Runtime, else torch, as ``deepseg segment`` picks), the
  first run of the model on a machine exports and compiles the network once (``cold``, measured on
  the first case with an empty cache); later runs load the cached graph (``warm``). ``torch`` is
  PyTorch against PyTorch. ``--precisions bfloat16`` adds runs with ``--precision bfloat16``
  (CPUs with AMX / AVX512-BF16), whose labels are also compared with the float32 run's.

``--device cuda``: both tools on the GPU with their defaults there (nnU-Net: image, logits and
blending on the device, float16 autocast; DeepSeg: the torch backend with float16 autocast, blending
on the device), peak GPU memory (``torch.cuda.max_memory_allocated``) beside peak RSS. Where the
cached model folder cannot travel (a GPU machine), ``--model-folder`` takes a folder whose checkpoint
``scripts/make_tiny_nnunet_model.py --untrained-checkpoint`` wrote: the same network, untrained.

Reported per case and backend: label agreement and per-label Dice against nnU-Net, tiles, both tools'
seconds and peak RSS, and the ratios DeepSeg / nnU-Net of ``predict_s`` (the issue's goal: <= 0.5),
of setup + predict, and of peak RSS (goal: <= 1). On the CPU also the network's GFLOP per tile, the
float32 matmul ceiling, and each DeepSeg run's GFLOP/s over its sliding window with its fraction of
that ceiling (``network_gflops``, ``fraction_of_float32_ceiling``). With OpenVINO installed, also its
per-layer timers over one float32 tile (``network.openvino_layers``) and, per case, the time of the
convolutions alone for all tiles and its ratio to nnU-Net's run (``float32_convolutions_only``): the
lowest ratio a float32 run at that convolution rate can reach, whatever the rest costs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "DeepSeg"))
CACHE = REPO / "Testing" / "data" / "cache"
HEAD_CT = CACHE / "ct_brain_atlas_1mm.nii.gz"
DATASET = "Dataset502_DeepSegFullCT"
#: name -> (size_xyz, spacing_xyz_mm) of the scanner grid the head CT is resampled onto
CASES = {
    "ct_128": ((128, 128, 128), (1.5, 1.5, 1.5)),
    "ct_192x192x160": ((192, 192, 160), (1.5, 1.5, 1.5)),
    "ct_512x512x300": ((512, 512, 300), (0.8, 0.8, 1.0)),
}
AIR_HU = -1000


def _load_sibling(name: str):
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def scanner_grid_ct(
    source: Path, size_xyz: tuple[int, int, int], spacing_xyz_mm: tuple[float, float, float], target: Path
) -> Path:
    """The head CT on another grid: 0 background -> air, linear resampling, centres aligned, air outside."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(source), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[array == 0] = AIR_HU
    in_air = sitk.GetImageFromArray(array)
    in_air.CopyInformation(image)
    centre = np.asarray(image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()]))
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    half_extent = direction @ (np.asarray(spacing_xyz_mm) * (np.asarray(size_xyz) - 1) / 2)
    reference = sitk.Image([int(s) for s in size_xyz], sitk.sitkFloat32)
    reference.SetSpacing([float(s) for s in spacing_xyz_mm])
    reference.SetDirection(image.GetDirection())
    reference.SetOrigin(tuple(float(v) for v in centre - half_extent))
    resampled = sitk.Resample(in_air, reference, sitk.Transform(), sitk.sitkLinear, float(AIR_HU), sitk.sitkFloat32)
    sitk.WriteImage(sitk.Cast(sitk.Round(resampled), sitk.sitkInt16), str(target), True)
    return target


def child(store_root: str, ref: str, image: str, output: str, backend: str, precision: str, threads: int, device: str) -> None:
    """One DeepSeg run in this (fresh) process: load, read, segment, write; prints one JSON line."""
    clock = time.perf_counter()
    import torch

    torch.set_num_threads(threads)
    from deepseg_core import io
    from deepseg_core.inference import Segmenter, SegmentOptions
    from deepseg_core.model_store import ModelStore

    import_modules_s = time.perf_counter() - clock
    clock = time.perf_counter()
    segmenter = Segmenter.load(ref, device=device, store=ModelStore(Path(store_root)))
    setup_s = time.perf_counter() - clock
    tiles: list[int] = []
    clock = time.perf_counter()
    volume = io.read_image(image)
    result = segmenter.segment(
        [volume],
        SegmentOptions(device=device, backend=backend, precision=precision, tta=False, check_modality=False),
        on_progress=lambda done, total, eta: tiles.append(total),
    )
    io.write_image(result.labels, output)
    predict_s = time.perf_counter() - clock
    print(
        json.dumps(
            {
                "backend": result.backend,
                "precision": result.precision,
                "import_modules_s": import_modules_s,
                "setup_s": setup_s,
                "predict_s": predict_s,
                "timings_s": result.timings_s,
                "tiles": max(tiles) if tiles else None,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
            }
        )
    )


def run_deepseg(
    store: Path, ref: str, image: Path, output: Path, backend: str, precision: str, threads: int, device: str
) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    from deepseg_core.openmp_waits import shorten_openmp_spinning

    shorten_openmp_spinning(env)  # as DeepSeg's engine processes do; nnU-Net runs with its own defaults
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(store), ref, str(image), str(output), backend, precision, str(threads), device],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"DeepSeg failed on {image.name} ({backend}, {precision}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name(0) if device == "cuda" else _load_sibling("bench_sliding_window").cpu_description()


def network_flops(store_root: Path, ref: str, threads: int) -> dict:
    """The imported network's FLOPs per tile (torch's counter: all of them convolutions) and the
    float32 matmul ceiling of this CPU at ``threads`` threads, measured as bench_sliding_window does."""
    import torch

    from deepseg_core.inference import Segmenter, SegmentOptions
    from deepseg_core.model_store import ModelStore

    sliding = _load_sibling("bench_sliding_window")
    torch.set_num_threads(threads)
    segmenter = Segmenter.load(ref, device="cpu", store=ModelStore(store_root))
    patch = segmenter.window_config(SegmentOptions()).patch_size_zyx
    shape = (1, len(segmenter.card.inputs.channels), *patch)
    cpu = torch.device("cpu")
    ceiling, ceiling_by_runtime = sliding.float32_ceiling_gflops(cpu)
    network = {
        "gflop_per_tile": sliding.forward_flops(segmenter.net, cpu, shape) / 1e9,
        "patch_zyx": list(patch),
        "matmul_ceiling_gflops": ceiling,
        "float32_matmul_by_runtime_gflops": ceiling_by_runtime,
    }
    if importlib.util.find_spec("openvino") is not None:
        with tempfile.TemporaryDirectory() as cache:
            network["openvino_layers"] = sliding.openvino_layer_times(
                segmenter.net, shape, Path(cache), network["gflop_per_tile"] * 1e9, network["matmul_ceiling_gflops"]
            )
    return network


def add_float32_floor(row: dict, network: dict) -> None:
    """The ratio to nnU-Net a float32 run would reach if everything but OpenVINO's convolutions took no
    time: tiles x convolution seconds per tile (OpenVINO's own timers) / nnU-Net's ``predict_s``."""
    layers = network.get("openvino_layers")
    tiles = [runs["warm"]["tiles"] for runs in row["deepseg"].values() if runs["warm"].get("tiles")]
    if layers and tiles:
        seconds = tiles[0] * layers["convolution_seconds_per_tile"]
        row["float32_convolutions_only"] = {"seconds": seconds, "ratio_to_nnunet": seconds / row["nnunet"]["predict_s"]}


def add_network_rate(runs: dict, flops: dict) -> None:
    """GFLOP/s over the ``network`` timing (sliding window with blending and export, so a lower bound
    for the network itself) and its fraction of the measured float32 ceiling."""
    for run in (runs.get("warm"), runs.get("cold")):
        if run and run.get("timings_s", {}).get("network"):
            run["network_gflops"] = run["tiles"] * flops["gflop_per_tile"] / run["timings_s"]["network"]
            run["fraction_of_float32_ceiling"] = run["network_gflops"] / flops["matmul_ceiling_gflops"]


def median_run(runs: list[dict]) -> dict:
    """The run with the median ``predict_s`` (the lower middle one of an even count), with every run's
    ``predict_s`` added as ``predict_s_runs`` in the order they ran."""
    ordered = sorted(runs, key=lambda run: run["predict_s"])
    return {**ordered[(len(ordered) - 1) // 2], "predict_s_runs": [run["predict_s"] for run in runs]}


def ratios(deepseg: dict, nnunet: dict) -> dict:
    """DeepSeg / nnU-Net of one pair of runs; with repeats (``predict_s_runs`` in both), ``predict`` is
    the median of the per-turn ratios, listed in ``predict_per_turn``."""
    per_turn = []
    if "predict_s_runs" in deepseg and "predict_s_runs" in nnunet:  # a cold run has one turn only
        per_turn = [ours / theirs for ours, theirs in zip(deepseg["predict_s_runs"], nnunet["predict_s_runs"], strict=True)]
    return {
        "predict": float(np.median(per_turn)) if per_turn else deepseg["predict_s"] / nnunet["predict_s"],
        **({"predict_per_turn": per_turn} if len(per_turn) > 1 else {}),
        "setup_plus_predict": (deepseg["setup_s"] + deepseg["predict_s"]) / (nnunet["setup_s"] + nnunet["predict_s"]),
        "peak_rss": deepseg["peak_rss_mb"] / nnunet["peak_rss_mb"],
        "peak_gpu": (
            deepseg["peak_gpu_mb"] / nnunet["peak_gpu_mb"] if deepseg.get("peak_gpu_mb") and nnunet.get("peak_gpu_mb") else None
        ),
    }


def deepseg_runs(
    args: argparse.Namespace,
    store_root: Path,
    ref: str,
    image: Path,
    work: Path,
    name: str,
    backend: str,
    precision: str,
    cold_measured: set[tuple[str, str]],
) -> dict:
    """The warm run of one backend and precision, and before it the cold one (empty graph cache) the
    first time this backend and precision run (the first turn of the first case)."""
    runs: dict = {}
    if backend != "torch" and (backend, precision) not in cold_measured:
        shutil.rmtree(store_root / ".cache" / "compiled", ignore_errors=True)
        runs["cold"] = run_deepseg(store_root, ref, image, work / "cold.nii.gz", backend, precision, args.threads, args.device)
        cold_measured.add((backend, precision))
    out = work / f"{name}_{backend}_{precision}.nii.gz"
    runs["warm"] = run_deepseg(store_root, ref, image, out, backend, precision, args.threads, args.device)
    return runs


def print_row(name: str, backend: str, nnunet: dict, runs: dict) -> None:
    warm, agree = runs["warm"], runs["agreement_with_nnunet"]
    line = (
        f"{name} [{backend} -> {warm['backend']}, {warm['precision']}]: {warm['tiles']} tiles; "
        f"nnU-Net {nnunet['predict_s']:.1f} s {nnunet['peak_rss_mb']:.0f} MB; "
        f"DeepSeg {warm['predict_s']:.1f} s {warm['peak_rss_mb']:.0f} MB; "
        f"ratio {runs['ratio_warm']['predict']:.3f} (RSS {runs['ratio_warm']['peak_rss']:.2f}); "
        f"agreement with nnU-Net {agree['agreement']:.5f}"
    )
    if "agreement_with_float32" in runs:
        line += f", with float32 {runs['agreement_with_float32']['agreement']:.5f}"
    if "cold" in runs:
        line += f"; cold run {runs['cold']['predict_s']:.1f} s"
    print(line, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "cuda"],
        help="cpu (the issue's goal), or cuda: both tools on the GPU, each with its default float16 autocast",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", nargs="+", default=["auto"], choices=["auto", "torch", "openvino", "onnxruntime"])
    parser.add_argument("--precisions", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument(
        "--model-folder",
        type=Path,
        default=None,
        help="an nnU-Net v2 model folder to use instead of the cached full preset (e.g. one with an untrained "
        "checkpoint from scripts/make_tiny_nnunet_model.py --untrained-checkpoint, where the cache cannot travel)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="turns per case (nnU-Net, then DeepSeg, in turn); the row reports median runs and the median per-turn ratio",
    )
    parser.add_argument("--child", nargs=8, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.child:
        store_root, ref, image, output, backend, precision, threads, device = args.child
        child(store_root, ref, image, output, backend, precision, int(threads), device)
        return 0
    if not HEAD_CT.is_file():
        raise SystemExit(f"{HEAD_CT} is missing: run `python scripts/fetch_test_images.py`")
    import SimpleITK as sitk

    parity = _load_sibling("bench_nnunet_parity")
    maker = parity._maker()
    folder = args.model_folder or maker.model_folder(maker.ensure_models("full"), DATASET, "3d_fullres")
    labels = sorted(int(v) for v in json.loads((folder / "dataset.json").read_text())["labels"].values() if int(v) > 0)
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    summary: dict = {
        "model": str(folder),
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "settings": f"one fold, step 0.5, Gaussian, no mirroring, {args.device}",
        "device": _device_name(args.device),
        "cases": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from deepseg_core.importers import import_model
        from deepseg_core.model_store import ModelStore

        store_root = work / "store"
        clock = time.perf_counter()
        ref = import_model(folder, ModelStore(store_root), name="bench-nnunet").ref
        summary["deepseg_import_s"] = time.perf_counter() - clock
        cold_measured: set[tuple[str, str]] = set()
        for name in args.cases:
            size_xyz, spacing = CASES[name]
            image = scanner_grid_ct(HEAD_CT, size_xyz, spacing, work / f"{name}.nii.gz")
            reference_out = work / f"{name}_nnunet"
            nnunet_turns: list[dict] = []
            deepseg_turns: dict[tuple[str, str], list[dict]] = {}
            for _ in range(args.repeats):
                nnunet_turns += maker.run_reference(
                    [
                        {
                            "model": str(folder),
                            "mirroring": False,
                            "inputs": [[str(image)]],
                            "outputs": [str(reference_out)],
                            "device": args.device,
                        }
                    ],
                    work / "ref",
                    threads=args.threads,
                )
                for backend in args.backends:
                    for precision in args.precisions:
                        turn = deepseg_runs(args, store_root, ref, image, work, name, backend, precision, cold_measured)
                        deepseg_turns.setdefault((backend, precision), []).append(turn)
            nnunet = median_run(nnunet_turns)
            reference = sitk.GetArrayFromImage(sitk.ReadImage(str(reference_out) + ".nii.gz"))
            row: dict = {"size_xyz": list(size_xyz), "spacing_xyz_mm": list(spacing), "nnunet": nnunet, "deepseg": {}}
            float32_labels: dict[str, np.ndarray] = {}
            for backend in args.backends:
                for precision in args.precisions:
                    turns = deepseg_turns[(backend, precision)]
                    runs = {**turns[0], "warm": median_run([turn["warm"] for turn in turns])}
                    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(work / f"{name}_{backend}_{precision}.nii.gz")))
                    runs["agreement_with_nnunet"] = parity.compare(ours, reference, labels)
                    if precision == "float32":
                        float32_labels[backend] = ours
                    elif backend in float32_labels:
                        runs["agreement_with_float32"] = parity.compare(ours, float32_labels[backend], labels)
                    runs["ratio_warm"] = ratios(runs["warm"], nnunet)
                    if "cold" in runs:
                        runs["ratio_cold"] = ratios(runs["cold"], nnunet)
                    row["deepseg"][f"{backend}/{precision}"] = runs
                    if not args.json:
                        print_row(name, backend, nnunet, runs)
            summary["cases"][name] = row
        if args.device == "cpu":  # after the timed runs, in this process, so they stay undisturbed
            summary["network"] = network_flops(store_root, ref, args.threads)
            for row in summary["cases"].values():
                add_float32_floor(row, summary["network"])
                for runs in row["deepseg"].values():
                    add_network_rate(runs, summary["network"])
    summary["wall_s"] = time.perf_counter() - started
    summary["load_average_1min"] = {"start": load_start, "end": os.getloadavg()[0]}
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
