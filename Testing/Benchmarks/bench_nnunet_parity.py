"""Full-size parity with nnU-Net's own predictor: DeepSeg vs ``nnUNetPredictor`` on a real CT and a real MR.

    python Testing/Benchmarks/bench_nnunet_parity.py [--json] [--device cpu] [--threads 2] [--tta] [--diagnose]

Models: nnU-Net's default 3d_fullres ``PlainConvUNet`` (6 stages, 32-320 features, patch 128^3,
target spacing 1.5 mm) trained by nnU-Net's own code for 2 iterations on 128^3 phantoms
(``scripts/make_tiny_nnunet_model.py --preset full``; built and cached on first use, about 20 minutes
on 2 CPU cores): a CT model (``CTNormalization``) and an MR model (``ZScoreNormalization`` inside
the non-zero mask). Parity does not need a good model; these predict large smooth blobs.
Images (``python scripts/fetch_test_images.py``): the head CT of TotalSegmentator's wheel
(202 x 202 x 179 at 1 mm; background 0, so nnU-Net crops it to the head: one padded 128^3 tile), the
same CT with air at -1000 HU in a wider field of view (nothing cropped: 8 overlapping tiles), and
nilearn's MNI152 T1 (197 x 233 x 189 at 1 mm, skull-stripped: cropped to the brain, one tile).

Each tool runs in its own fresh process (one fold, mirroring as ``--tta``, ``--threads`` torch
threads for both), so its time and peak RSS (``ru_maxrss``, imports included) are its own. DeepSeg's
import of the nnU-Net folder is timed separately. Reported per case: per-label Dice and voxel
agreement between the two segmentations, both tools' seconds and peak RSS. ``--diagnose`` also
has nnU-Net dump its network input and float16 logits and compares stage by stage (see
:func:`diagnose`): preprocessing, network + blending (and nnU-Net's top-2 logit margin where the
argmaxes differ: small = a near-tie that float16 accumulation decides), and export.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "DeepSeg"))
CACHE = REPO / "Testing" / "data" / "cache"
CASES = {
    "head_ct": ("Dataset502_DeepSegFullCT", CACHE / "ct_brain_atlas_1mm.nii.gz"),
    "head_ct_in_air": ("Dataset502_DeepSegFullCT", CACHE / "ct_brain_atlas_1mm.nii.gz"),
    "mni152_t1": ("Dataset503_DeepSegFullMR", CACHE / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"),
}
#: voxels of air (-1000 HU) added around the head CT in "head_ct_in_air" (z, y, x), each side
AIR_PADDING = (20, 30, 30)


def head_ct_in_air(source: Path, target: Path) -> Path:
    """The head CT as a scanner would store it: air at -1000 HU instead of its 0 background, in a wider field of
    view. Nothing is zero, so nnU-Net crops nothing: the network grid (175 x 175 x 146 at 1.5 mm) needs 8
    overlapping 128^3 tiles, where the cropped head CT and MNI152 each fit one padded tile."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(source))
    array = sitk.GetArrayFromImage(image).astype(np.int16)
    array[array == 0] = -1000
    array = np.pad(array, [(p, p) for p in AIR_PADDING], constant_values=-1000)
    padded = sitk.GetImageFromArray(array)
    padded.SetSpacing(image.GetSpacing())
    padded.SetDirection(image.GetDirection())
    shift = np.asarray(image.GetDirection()).reshape(3, 3) @ (np.asarray(image.GetSpacing()) * np.asarray(AIR_PADDING[::-1]))
    padded.SetOrigin(tuple(np.asarray(image.GetOrigin()) - shift))
    sitk.WriteImage(padded, str(target), True)
    return target


def _maker():
    spec = importlib.util.spec_from_file_location("make_tiny_nnunet_model", REPO / "scripts" / "make_tiny_nnunet_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def child(folder: str, image: str, output: str, device: str, threads: int, tta: bool) -> None:
    """DeepSeg in this process: import the folder, segment, write the labels; prints one JSON line."""
    import torch

    torch.set_num_threads(threads)
    from deepseg_core import io
    from deepseg_core.importers import import_model
    from deepseg_core.inference import Segmenter, SegmentOptions
    from deepseg_core.model_store import ModelStore

    with tempfile.TemporaryDirectory() as tmp:
        clock = time.perf_counter()
        store = ModelStore(Path(tmp) / "store")
        card = import_model(folder, store, name="bench")
        import_s = time.perf_counter() - clock
        clock = time.perf_counter()
        segmenter = Segmenter.load(card.ref, device=device, store=store)
        setup_s = time.perf_counter() - clock
        volume = io.read_image(image)
        kwargs = {"device": device, "tta": tta, "check_modality": False}
        if "backend" in SegmentOptions.__dataclass_fields__:
            kwargs["backend"] = "torch"  # the comparison is PyTorch against PyTorch
        clock = time.perf_counter()
        result = segmenter.segment([volume], SegmentOptions(**kwargs))
        predict_s = time.perf_counter() - clock
        io.write_image(result.labels, output)
    print(
        json.dumps(
            {
                "import_s": import_s,
                "setup_s": setup_s,
                "predict_s": predict_s,
                "timings_s": result.timings_s,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def compare(ours: np.ndarray, reference: np.ndarray, labels: list[int]) -> dict:
    out = {"agreement": float((ours == reference).mean()), "voxels_differing": int((ours != reference).sum()), "labels": {}}
    for value in labels:
        a, b = ours == value, reference == value
        total = int(a.sum() + b.sum())
        out["labels"][str(value)] = {
            "dice": 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total,
            "voxels_deepseg": int(a.sum()),
            "voxels_nnunet": int(b.sum()),
        }
    return out


def run_case(name: str, results_root: Path, work: Path, args: argparse.Namespace) -> dict:
    import SimpleITK as sitk

    maker = _maker()
    dataset, image = CASES[name]
    if not image.is_file():
        raise SystemExit(f"{image} is missing: run `python scripts/fetch_test_images.py`")
    if name == "head_ct_in_air":
        image = head_ct_in_air(image, work / "head_ct_in_air.nii.gz")
    folder = maker.model_folder(results_root, dataset, "3d_fullres")
    reference_out = work / f"{name}_nnunet"
    [nnunet] = maker.run_reference(
        [{"model": str(folder), "mirroring": args.tta, "inputs": [[str(image)]], "outputs": [str(reference_out)]}],
        work / "ref",
        threads=args.threads,
    )
    ours_out = work / f"{name}_deepseg.nii.gz"
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(folder), str(image), str(ours_out), args.device, str(args.threads)]
        + (["--tta"] if args.tta else []),
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"DeepSeg failed on {name}:\n{done.stderr[-3000:]}")
    deepseg = json.loads(done.stdout.strip().splitlines()[-1])
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(reference_out) + ".nii.gz"))
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(ours_out)))
    labels = sorted(int(v) for v in json.loads((folder / "dataset.json").read_text())["labels"].values() if int(v) > 0)
    row = {
        "image": str(image.name),
        "shape_zyx": list(reference.shape),
        "model": str(folder.relative_to(results_root)),
        "mirroring": args.tta,
        "threads": args.threads,
        **compare(ours, reference, labels),
        "nnunet": nnunet,
        "deepseg": deepseg,
    }
    if args.diagnose:
        row["diagnosis"] = diagnose(maker, folder, image, work, reference, args)
    return row


def diagnose(maker, folder: Path, image: Path, work: Path, reference: np.ndarray, args: argparse.Namespace) -> dict:
    """Where the two segmentations part, stage by stage (on nnU-Net's own intermediates of the same image).

    - preprocessing: DeepSeg's network input against nnU-Net's (max |difference|);
    - network + blending: DeepSeg's blended float32 logits against nnU-Net's float16 ones, and nnU-Net's
      margin between its top two logits where the two argmaxes differ (small = a near-tie);
    - export: DeepSeg's export fed with nnU-Net's own logits, against nnU-Net's labels (voxels differing).
    """
    import torch

    from deepseg_core import io
    from deepseg_core.importers import import_model
    from deepseg_core.inference import Segmenter, SegmentOptions
    from deepseg_core.inference.sliding_window import sliding_window_predict
    from deepseg_core.model_store import ModelStore

    torch.set_num_threads(args.threads)
    out = work / "diagnose"
    maker.run_reference(
        [{"model": str(folder), "mirroring": args.tta, "inputs": [[str(image)]], "outputs": [str(out)], "dump": True}],
        work / "ref-dump",
        threads=args.threads,
    )
    dump = np.load(str(out) + "_intermediates.npz")
    store = ModelStore(work / "diagnose-store")
    segmenter = Segmenter.load(import_model(folder, store, name="diagnose").ref, device=args.device, store=store)
    volume = io.read_image(image)
    prepared = segmenter.pipeline.prepare([volume])
    theirs_input = dump["preprocessed"]
    report: dict = {"network_input_shape": list(prepared.image_czyx.shape)}
    if prepared.image_czyx.shape != theirs_input.shape:
        report["network_input_shapes_differ"] = [list(prepared.image_czyx.shape), list(theirs_input.shape)]
        return report
    report["network_input_max_abs_difference"] = float(np.abs(prepared.image_czyx - theirs_input).max())
    options = SegmentOptions(device=args.device, tta=args.tta, check_modality=False)
    slabs: list[np.ndarray] = []
    sliding_window_predict(
        segmenter.net,
        prepared.image_czyx,
        segmenter.card.num_classes,
        segmenter.window_config(options),
        lambda z0, z1, blended: slabs.append(blended),
        device=args.device,
    )
    ours_logits = np.concatenate(slabs, axis=1)
    theirs_logits = dump["logits"].astype(np.float32)
    difference = np.abs(ours_logits - theirs_logits)
    report["logits_max_abs_difference"] = float(difference.max())
    report["logits_mean_abs_difference"] = float(difference.mean())
    report["logits_range"] = [float(theirs_logits.min()), float(theirs_logits.max())]
    top2 = np.sort(theirs_logits, axis=0)[-2:]
    margin = top2[1] - top2[0]
    flipped = np.argmax(ours_logits, axis=0) != np.argmax(dump["logits"], axis=0)
    report["network_grid_argmax_differing"] = int(flipped.sum())
    if flipped.any():
        report["nnunet_margin_at_differences_median"] = float(np.median(margin[flipped]))
        report["nnunet_margin_at_differences_max"] = float(margin[flipped].max())
    report["nnunet_margin_median_everywhere"] = float(np.median(margin))
    collector = segmenter.pipeline.collector(prepared, volume, options)
    depth = theirs_logits.shape[1]
    for z0 in range(0, depth, 16):
        collector.add(z0, min(z0 + 16, depth), theirs_logits[:, z0 : z0 + 16])
    exported = collector.finish().labels_zyx
    report["export_of_nnunet_logits_voxels_differing"] = int((exported != reference).sum())
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tta", action="store_true", help="mirroring test-time augmentation (nnU-Net's default)")
    parser.add_argument("--diagnose", action="store_true", help="also compare network inputs and logit margins")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--child", nargs=5, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        folder, image, output, device, threads = args.child
        child(folder, image, output, device, int(threads), args.tta)
        return 0
    clock = time.perf_counter()
    results_root = _maker().ensure_models("full")
    build_s = time.perf_counter() - clock
    summary = {"models": str(results_root), "model_build_or_cache_s": build_s, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            summary["cases"][name] = run_case(name, results_root, Path(tmp), args)
            if not args.json:
                row = summary["cases"][name]
                dices = ", ".join(f"{k}: {v['dice']:.4f}" for k, v in row["labels"].items())
                print(
                    f"{name}: agreement {row['agreement']:.5f}, Dice {dices}; nnU-Net {row['nnunet']['predict_s']:.0f} s "
                    f"{row['nnunet']['peak_rss_mb']:.0f} MB, DeepSeg {row['deepseg']['predict_s']:.0f} s "
                    f"{row['deepseg']['peak_rss_mb']:.0f} MB (import {row['deepseg']['import_s']:.1f} s)",
                    flush=True,
                )
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
