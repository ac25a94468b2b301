"""Full-size parity: DeepSeg vs MONAI's own bundle inference with the model zoo's spleen UNet.

    python Testing/Benchmarks/bench_monai_parity.py [--json] [--inputs head_ct mni_t1] [--threads 2]

The bundle is ``scripts/make_tiny_monai_bundle.py --full``: the zoo's spleen_ct_segmentation layout
and inference.json with its own network (UNet, channels 16..256, strides 2 x 4, two residual
units, batch norm, ROI 96^3, overlap 0.5, sw_batch_size 4), trained briefly on phantoms (cached in
Testing/data/cache/monai/). Inputs: the real head CT (``ct_brain_atlas_1mm.nii.gz``, 202 x 202 x
179 at 1 mm) and the MNI152 T1 (197 x 233 x 189 at 1 mm; an MR through a CT window, which is fine
for parity: both sides see the same numbers). Fetch them with ``python scripts/fetch_test_images.py``.

Each run is its own process, so its peak RSS (VmHWM; ru_maxrss would include the parent's, as it survives exec) is its own:

- MONAI: ``monai.bundle.run`` with the bundle's configs (``bundle_root``, ``datalist``,
  ``output_dir``, ``dataloader#num_workers 0`` overridden), as a zoo user runs it;
- DeepSeg: ``deepseg models import`` once, then ``Segmenter.load`` + ``segment`` (torch backend).

Reported per input: per-label Dice, voxel agreement, differing voxels, and the time and peak RSS of
each. Where labels differ, a second DeepSeg run keeps the probabilities and the benchmark reports
how close to a tie each differing voxel was (top-two probability margin) and how far from the
volume's edge it lies, which says where and why the two differ.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "DeepSeg"))
sys.path.insert(0, str(REPO / "Testing" / "foreign"))

INPUTS = {
    "head_ct": REPO / "Testing" / "data" / "cache" / "ct_brain_atlas_1mm.nii.gz",
    "mni_t1": REPO / "Testing" / "data" / "cache" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
}

DEEPSEG_RUNNER = textwrap.dedent(
    """
    import json, resource, sys, time

    def peak_rss_mb():
        # VmHWM: this process image's own peak (ru_maxrss survives execve, so a child started from a
        # big parent would report the parent's peak)
        try:
            with open("/proc/self/status") as status:
                return next(int(l.split()[1]) for l in status if l.startswith("VmHWM:")) / 1024
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    started = time.perf_counter()
    args = json.loads(sys.argv[1])
    sys.path.insert(0, args["deepseg"])
    import numpy as np
    from deepseg_core.inference.predictor import SegmentOptions, Segmenter
    from deepseg_core.io import read_image, write_image
    from deepseg_core.model_store import ModelStore
    times = {"import_s": time.perf_counter() - started}
    clock = time.perf_counter()
    segmenter = Segmenter.load(args["model"], device="cpu", store=ModelStore(args["store"]))
    volume = read_image(args["image"])
    times["load_s"] = time.perf_counter() - clock
    options = {"device": "cpu", "check_modality": False, "keep_probabilities": bool(args["probabilities"])}
    if "backend" in SegmentOptions.__dataclass_fields__:
        options["backend"] = "torch"
    clock = time.perf_counter()
    result = segmenter.segment([volume], SegmentOptions(**options))
    times["segment_s"] = time.perf_counter() - clock
    times["stages_s"] = result.timings_s
    write_image(result.labels, args["labels"])
    if args["probabilities"]:
        np.save(args["probabilities"], result.probabilities)
    times["total_s"] = time.perf_counter() - started
    times["peak_rss_mb"] = peak_rss_mb()
    print("DEEPSEG_TIMES " + json.dumps(times))
    """
)


def run_deepseg(model: str, store: Path, image: Path, labels: Path, probabilities: Path | None, env: dict) -> dict:
    args = {
        "deepseg": str(REPO / "DeepSeg"),
        "model": model,
        "store": str(store),
        "image": str(image),
        "labels": str(labels),
        "probabilities": str(probabilities) if probabilities else "",
    }
    done = subprocess.run(
        [sys.executable, "-c", DEEPSEG_RUNNER, json.dumps(args)], capture_output=True, text=True, env=env, cwd=labels.parent
    )
    if done.returncode != 0:
        raise RuntimeError(f"DeepSeg run failed:\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith("DEEPSEG_TIMES "))
    return json.loads(line.split(" ", 1)[1])


def explain_differences(ours: np.ndarray, theirs: np.ndarray, probabilities: np.ndarray) -> dict:
    """Where the labels differ: top-two probability margins (DeepSeg's) and distance to the volume edge."""
    differing = ours != theirs
    count = int(differing.sum())
    if count == 0:
        return {"differing": 0}
    probs = probabilities.astype(np.float32)[:, differing]
    top = np.sort(probs, axis=0)
    margin = top[-1] - top[-2]
    coords = np.nonzero(differing)
    edge = np.min([np.minimum(c, n - 1 - c) for c, n in zip(coords, ours.shape, strict=True)], axis=0)
    all_margin = np.sort(probabilities.astype(np.float32), axis=0)
    all_margin = all_margin[-1] - all_margin[-2]
    return {
        "differing": count,
        "margin_quantiles_differing": {q: float(np.quantile(margin, q / 100)) for q in (50, 90, 99, 100)},
        "fraction_of_all_voxels_with_margin_below_max_differing": float((all_margin <= margin.max()).mean()),
        "distance_to_edge_voxels_min_median": [int(edge.min()), float(np.median(edge))],
        "slices_z_with_differences": sorted({int(z) for z in coords[0]})[:20],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--inputs", nargs="+", default=list(INPUTS), choices=list(INPUTS))
    parser.add_argument("--threads", type=int, default=None, help="torch / OpenMP threads of each run (default: all)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep outputs here (default: a temporary folder)")
    parser.add_argument("--device", default="cpu", help="cpu only: both tools run on the CPU (run_all.py passes it)")
    args = parser.parse_args()
    if args.device != "cpu":
        print(json.dumps({"skipped": f"compares the two tools on the CPU only, not on {args.device}"}))
        return

    import monai_fixtures as mf
    import SimpleITK as sitk

    from deepseg_core.importers import import_model
    from deepseg_core.model_store import ModelStore

    for name in args.inputs:
        if not INPUTS[name].is_file():
            sys.exit(f"{INPUTS[name]} is missing: run `python scripts/fetch_test_images.py`")
    with contextlib.redirect_stdout(sys.stderr):  # the training log, when the bundle is built first
        bundle = mf.bundle_script().ensure_bundle(full=True)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_monai_"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    store = ModelStore(work / "store")
    card = import_model(bundle, store, name="spleen-unet-full")
    report = {"bundle": str(bundle), "model": card.ref, "network": card.architecture.config["network_def"], "inputs": {}}
    for name in args.inputs:
        image = INPUTS[name]
        monai_out = work / f"monai_{name}"
        monai_times = mf.run_monai_bundles([mf.monai_run_args(bundle, [image], monai_out)], monai_out)
        labels_path = work / f"deepseg_{name}.nii.gz"
        deepseg_times = run_deepseg(card.ref, store.root, image, labels_path, None, env)
        ours = sitk.GetArrayFromImage(sitk.ReadImage(str(labels_path))).astype(np.int64)
        theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(mf.monai_output(monai_out, image)))).astype(np.int64)
        compared = mf.compare_labels(ours, theirs, [0, *(label.value for label in card.labels)])
        entry = {
            "shape_zyx": list(ours.shape),
            "dice": compared["dice"],
            "agreement": compared["agreement"],
            "voxels_deepseg_monai": compared["voxels_ours_theirs"],
            "monai": {
                "import_s": monai_times["import_s"],
                "run_s": monai_times["runs_s"][0],
                "peak_rss_mb": monai_times["peak_rss_mb"],
            },
            "deepseg": deepseg_times,
        }
        if compared["differing"]:
            probabilities = work / f"deepseg_{name}_probabilities.npy"
            run_deepseg(card.ref, store.root, image, work / f"deepseg_{name}_again.nii.gz", probabilities, env)
            entry["differences"] = explain_differences(ours, theirs, np.load(probabilities))
        else:
            entry["differences"] = {"differing": 0}
        report["inputs"][name] = entry
        if not args.json:
            print(f"{name}: shape {ours.shape}, agreement {compared['agreement']:.6f}, differing {compared['differing']}")
            print("  Dice " + ", ".join(f"{v}: {d:.5f}" for v, d in compared["dice"].items()))
            print(
                f"  MONAI   run {entry['monai']['run_s']:.1f} s (+{entry['monai']['import_s']:.1f} s imports), "
                f"peak RSS {entry['monai']['peak_rss_mb']:.0f} MB"
            )
            print(
                f"  DeepSeg segment {deepseg_times['segment_s']:.1f} s (load {deepseg_times['load_s']:.1f} s, "
                f"imports {deepseg_times['import_s']:.1f} s), peak RSS {deepseg_times['peak_rss_mb']:.0f} MB"
            )
            if compared["differing"]:
                print("  differences:", json.dumps(entry["differences"]))
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
