#!/usr/bin/env python3
"""Build real nnU-Net v2 results folders with nnU-Net's OWN code, for the parity tests and benchmark.

    python scripts/make_tiny_nnunet_model.py                 # tiny folders for Testing/foreign (cached)
    python scripts/make_tiny_nnunet_model.py --preset full   # full-size CT and MR folders for the benchmark
    python scripts/make_tiny_nnunet_model.py --print-path    # build if needed, print the cache folder
    python scripts/make_tiny_nnunet_model.py --predict JOBS.json   # nnU-Net's own predictor (the reference)

The training data is a DeepSeg dataset (``deepseg_core.datasets.Dataset.create`` / ``add_case``:
DeepSeg dataset folders are nnU-Net raw datasets) of phantoms (``deepseg_core.phantoms``). Then nnU-Net
does everything, in a subprocess with ``nnunetv2`` importable: fingerprint extraction, experiment
planning (the plans are made smaller: fewer stages, a small patch; every later step reads them as
usual), preprocessing, and a few iterations of the stock ``nnUNetTrainer`` with a short schedule
(attributes set before ``initialize()``, so checkpoints name ``nnUNetTrainer`` and nnU-Net's own
predictor loads them). Nothing is written by hand.

Presets (what ends up in the cache, under ``Dataset501_DeepSegTiny/`` or ``Dataset502_DeepSegFullCT`` /
``Dataset503_DeepSegFullMR``):

- ``tiny``: 6 CT phantoms of 24 x 48 x 32 voxels at 2 x 2 x 3 mm (x is the thickest axis, so nnU-Net's
  ``transpose_forward`` is ``[2, 0, 1]``); ``nnUNetTrainer__nnUNetPlans__3d_fullres`` (folds 0 and 1),
  ``nnUNetTrainer__nnUNetPlans__2d`` (fold 0) and ``nnUNetTrainer__nnUNetResEncUNetMPlans__3d_fullres``
  (fold 0): 3 stages of 8 / 16 / 32 features, patch 16 x 16 x 32 (2D: 16 x 32), 6-15 epochs of 10
  iterations, two training runs at a time. The same phantoms again as ``Dataset504_DeepSegTinyRegions``,
  whose dataset.json declares nnU-Net regions (``"liver and lesions": [1, 2]``, ``"liver lesion": 2``,
  ``regions_class_order`` ``[1, 2]``): nnU-Net trains it region-based (sigmoids, BCE + Dice),
  ``nnUNetTrainer__nnUNetPlans__3d_fullres`` fold 0. About 3 minutes on 2 CPU cores.
- ``full``: nnU-Net's default 3d_fullres network (6 stages, 32-320 features, patch 128^3) on 5 phantoms
  of 128^3 voxels at 1.5 mm, CT (``CTNormalization``) and MR (``ZScoreNormalization`` with the
  non-zero mask), trained for 2 iterations of batch 1: parity needs real nnU-Net folders of the real
  size, not a good model (its labels are blobby, see README). About half an hour on 2 CPU cores.

The result is cached under ``Testing/data/cache/nnunet/<preset>-<key>/``, where the key hashes this
script, ``deepseg_core/phantoms.py`` and the versions of nnU-Net, torch, numpy, scipy and SimpleITK:
CI builds it once per run, developers once. ``ensure_models()`` is what the tests call.

``--predict JOBS.json`` runs ``nnUNetPredictor`` (step 0.5, Gaussian, ``predict_from_files_sequential``:
no worker processes) on each job ``{"model": folder, "folds": [...] or null, "checkpoint": ...,
"mirroring": bool, "inputs": [[channel files]], "outputs": [truncated output paths], "probabilities":
bool, "dump": bool, "device": "cpu" (default) or "cuda", "prev_stage": folder (a cascade's second stage: the first
stage's segmentations, named ``<case>.nii.gz``)}`` and writes ``JOBS.json.result.json`` (seconds and peak RSS per job).
``probabilities`` also writes nnU-Net's ``<output>.npz``; ``dump`` saves the preprocessed array and the
fold-averaged logits of the first input (``<output>_intermediates.npz``). A job ``{"kind": "preprocess",
"model", "configuration", "inputs": [[files]], "seg": file, "outputs": [path]}`` runs nnU-Net's
``DefaultPreprocessor.run_case`` on a training case (``<path>.npz`` with ``data`` and ``seg``).
``run_reference()`` is what the tests and the benchmark call. ``--untrained-checkpoint MODEL_FOLDER``
writes an untrained ``fold_0/checkpoint_final.pth`` into a folder that holds only the plans (speed
runs on machines the 250 MB full-size checkpoint cannot travel to).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "Testing" / "data" / "cache" / "nnunet"
PACKAGES = ("nnunetv2", "dynamic_network_architectures", "batchgenerators", "torch", "numpy", "scipy", "SimpleITK")
DONE = "build.json"

TINY = {
    "datasets": [
        {"id": 501, "name": "DeepSegTiny", "modality": "CT", "channel": "CT", "profile": "ct-A"},
        {
            "id": 504,
            "name": "DeepSegTinyRegions",
            "modality": "CT",
            "channel": "CT",
            "profile": "ct-A",
            # nnU-Net's region-based training (as BraTS and KiTS): overlapping regions, one sigmoid each;
            # the key order is the regions' order, which regions_class_order pairs with by position
            "regions": {"labels": {"background": 0, "liver and lesions": [1, 2], "liver lesion": 2}, "order": [1, 2]},
            "runs": [("ExperimentPlanner", "3d_fullres", (0,), 10)],
        },
    ],
    "cases": 6,
    "shape_zyx": (24, 48, 32),
    "spacing_xyz_mm": (3.0, 2.0, 2.0),
    "lesions": (1, 3),
    "lesion_radius_mm": (8.0, 14.0),
    # (plans planner, configuration, folds, epochs)
    "runs": [
        ("ExperimentPlanner", "3d_fullres", (0, 1), 10),
        ("ExperimentPlanner", "2d", (0,), 15),
        ("nnUNetPlannerResEncM", "3d_fullres", (0,), 6),
    ],
    "iterations": 10,
    "val_iterations": 2,
}
FULL = {
    "datasets": [
        {"id": 502, "name": "DeepSegFullCT", "modality": "CT", "channel": "CT", "profile": "ct-A"},
        {"id": 503, "name": "DeepSegFullMR", "modality": "MR", "channel": "T1", "profile": "mr-A"},
    ],
    "cases": 5,
    "shape_zyx": (128, 128, 128),
    "spacing_xyz_mm": (1.5, 1.5, 1.5),
    "lesions": (2, 4),
    "lesion_radius_mm": (4.0, 12.0),
    "runs": [("ExperimentPlanner", "3d_fullres", (0,), 1)],
    "iterations": 2,
    "val_iterations": 1,
}
PRESETS = {"tiny": TINY, "full": FULL}


def versions() -> dict[str, str]:
    """Installed versions of the packages the folders depend on ('missing' when not installed)."""
    out = {}
    for package in PACKAGES:
        try:
            out[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            out[package] = "missing"
    return out


def cache_key(preset: str) -> str:
    """Hash of this script, the phantom generator and the package versions (16 hex digits)."""
    digest = hashlib.sha256()
    for path in (Path(__file__), REPO / "DeepSeg" / "deepseg_core" / "phantoms.py"):
        digest.update(path.read_bytes())
    digest.update(json.dumps([preset, versions()], sort_keys=True).encode())
    return digest.hexdigest()[:16]


def cache_folder(preset: str = "tiny", cache: Path = CACHE) -> Path:
    return Path(cache) / f"{preset}-{cache_key(preset)}"


def model_folder(root: Path, dataset: str, configuration: str, plans: str = "nnUNetPlans") -> Path:
    """``<root>/<dataset>/nnUNetTrainer__<plans>__<configuration>`` (a trained model folder)."""
    return Path(root) / dataset / f"nnUNetTrainer__{plans}__{configuration}"


def ensure_models(preset: str = "tiny", cache: Path = CACHE, python: str | None = None, timeout_s: float | None = None) -> Path:
    """The cached folder of ``preset`` (built first when missing; nnU-Net runs in a subprocess).

    Raises:
        RuntimeError: nnunetv2 is not installed, or the build failed (the log's tail is in the message).
    """
    target = cache_folder(preset, cache)
    if (target / DONE).is_file():
        return target
    if versions()["nnunetv2"] == "missing":
        raise RuntimeError("nnunetv2 is not installed: pip install -c requirements/constraints.txt -e '.[test]'")
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(target):
        if (target / DONE).is_file():  # another process (a parallel test worker) built it while this one waited
            return target
        return _build_into(target, preset, python, timeout_s)


@contextlib.contextmanager
def _build_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``.<target>.lock`` so parallel test workers build each preset once."""
    try:
        import fcntl
    except ImportError:  # Windows: two processes may both build; the rename below still keeps one whole result
        yield
        return
    with open(target.parent / f".{target.name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_into(target: Path, preset: str, python: str | None, timeout_s: float | None) -> Path:
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    env = dict(os.environ)
    # one thread per process: the CI machine has 2 cores, and OpenMP spin-waits when oversubscribed
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "DeepSeg")})
    log_path = staging / "build.log"
    started = time.time()
    with open(log_path, "w") as log_file:
        result = subprocess.run(
            [python or sys.executable, __file__, "--preset", preset, "--build", str(staging)],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            timeout=timeout_s,
            check=False,
        )
    if result.returncode != 0 or not (staging / DONE).is_file():
        tail = log_path.read_text(errors="replace")[-3000:]
        shutil.rmtree(staging, ignore_errors=True)
        raise RuntimeError(f"building the {preset} nnU-Net folders failed (exit {result.returncode}):\n{tail}")
    if (target / DONE).is_file():  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
        return target
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
    print(f"built {target} in {time.time() - started:.0f} s", file=sys.stderr)
    return target


# ------------------------------------------------------------------------------------------------
# the build (runs in the subprocess)


def _make_dataset(raw: Path, spec: dict, preset: dict) -> str:
    """A DeepSeg dataset of phantoms at ``raw/DatasetXXX_Name`` (an nnU-Net raw dataset); returns its folder name."""
    from deepseg_core.datasets import Dataset
    from deepseg_core.phantoms import PHANTOM_LABELS, generate_phantom

    name = f"Dataset{spec['id']:03d}_{spec['name']}"
    dataset = Dataset.create(raw / name, spec["name"], PHANTOM_LABELS, channel_names=(spec["channel"],))
    for i in range(preset["cases"]):
        phantom = generate_phantom(
            seed=100 + i,
            profile=spec["profile"],
            shape_zyx=preset["shape_zyx"],
            spacing_xyz_mm=preset["spacing_xyz_mm"],
            n_lesions=preset["lesions"],
            lesion_radius_mm=preset["lesion_radius_mm"],
        )
        dataset.add_case(f"case{i:03d}", [phantom.image], phantom.labels.array_zyx)
    if "regions" in spec:
        # the label maps stay as they are; only dataset.json declares the regions, as a user does
        path = raw / name / "dataset.json"
        described = json.loads(path.read_text())
        described["labels"] = spec["regions"]["labels"]
        described["regions_class_order"] = spec["regions"]["order"]
        path.write_text(json.dumps(described, indent=2))
    return name


def _shrink_tiny(plans: dict) -> dict:
    """3 stages of 8 / 16 / 32 features and a small patch in every configuration (only the plans change)."""
    for cfg in plans["configurations"].values():
        if "architecture" not in cfg:
            continue  # e.g. 3d_cascade_fullres, which only inherits
        kwargs = cfg["architecture"]["arch_kwargs"]
        dims = len(cfg["patch_size"])
        cfg["patch_size"] = [16, 16, 32] if dims == 3 else [16, 32]
        kwargs["n_stages"] = 3
        kwargs["features_per_stage"] = [8, 16, 32]
        kwargs["kernel_sizes"] = [[3] * dims] * 3
        kwargs["strides"] = [[1] * dims, [2] * dims, [2] * dims]
        if "n_conv_per_stage" in kwargs:
            kwargs["n_conv_per_stage"] = [2, 2, 2]
        else:
            kwargs["n_blocks_per_stage"] = [1, 2, 2]
        kwargs["n_conv_per_stage_decoder"] = [2, 2]
        cfg["batch_size"] = 2
    return plans


def _full_plans(plans: dict, modality: str) -> dict:
    """nnU-Net's own 3d_fullres plans with a 128^3 patch and, for the skull-stripped MR, z-scoring inside the
    non-zero mask. Batch 1: training on the CPU in float32 needs about twice what the planner budgets for a GPU."""
    cfg = plans["configurations"]["3d_fullres"]
    cfg["patch_size"] = [128, 128, 128]
    cfg["batch_size"] = 1
    if modality == "MR":
        cfg["use_mask_for_norm"] = [True]
    return plans


def _train(task: tuple) -> tuple[str, float]:
    """One training run of the stock nnUNetTrainer with a short schedule (in a spawned worker); ``(label, seconds)``."""
    label, plans_file, dataset_json_file, configuration, fold, epochs, preset = task
    os.environ["nnUNet_n_proc_DA"] = "0"  # no data-augmentation worker processes
    import numpy as np
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    torch.set_num_threads(1)
    clock = time.time()
    np.random.seed(fold)
    torch.manual_seed(fold)
    plans = load_json(plans_file)
    plans["continue_training"] = False  # nnUNetTrainer.__init__ pops it (run_training sets it)
    trainer = nnUNetTrainer(
        plans=plans, configuration=configuration, fold=fold, dataset_json=load_json(dataset_json_file), device=torch.device("cpu")
    )
    # attributes set before initialize(): the checkpoints name the stock trainer, which nnU-Net's predictor finds
    trainer.num_epochs = epochs
    trainer.num_iterations_per_epoch = preset["iterations"]
    trainer.num_val_iterations_per_epoch = preset["val_iterations"]
    trainer.save_every = 10**6
    trainer.run_training()
    return label, time.time() - clock


def build(out: Path, preset_name: str) -> None:
    """Everything in one process: raw dataset, fingerprint, plans, preprocessing, training; results into ``out``."""
    preset = PRESETS[preset_name]
    work = Path(tempfile.mkdtemp(prefix="nnunet-build-"))
    os.environ["nnUNet_raw"] = str(work / "raw")
    os.environ["nnUNet_preprocessed"] = str(work / "preprocessed")
    os.environ["nnUNet_results"] = str(out)
    os.environ["nnUNet_compile"] = "f"
    os.environ["nnUNet_def_n_proc"] = "1"
    # planning calls torch.set_num_threads(get_allowed_n_proc_DA()), which fails for 0; training sets 0 below
    os.environ["nnUNet_n_proc_DA"] = "1"
    (work / "raw").mkdir(parents=True)

    import torch

    torch.set_num_threads(1)
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
        nnUNetPlannerResEncM,
    )
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset,
        plan_experiment_dataset,
        preprocess_dataset,
    )

    planners = {"ExperimentPlanner": ExperimentPlanner, "nnUNetPlannerResEncM": nnUNetPlannerResEncM}
    timings: dict[str, float] = {}
    tasks: list[tuple] = []
    started = time.time()
    for spec in preset["datasets"]:
        name = _make_dataset(work / "raw", spec, preset)
        extract_fingerprint_dataset(spec["id"], num_processes=1, check_dataset_integrity=True, show_progress_bar=False)
        plans_files: dict[str, Path] = {}
        runs = spec.get("runs", preset["runs"])
        for planner, _, _, _ in runs:
            if planner in plans_files:
                continue
            _, identifier = plan_experiment_dataset(spec["id"], planners[planner])
            path = work / "preprocessed" / name / f"{identifier}.json"
            plans = load_json(str(path))
            plans = _shrink_tiny(plans) if preset_name == "tiny" else _full_plans(plans, spec["modality"])
            save_json(plans, str(path), sort_keys=False)
            plans_files[planner] = path
            configurations = sorted({c for p, c, _, _ in runs if p == planner})
            preprocess_dataset(spec["id"], identifier, configurations, [1] * len(configurations), show_progress_bar=False)
        timings[f"{name} plan+preprocess"] = time.time() - started
        dataset_json = str(work / "preprocessed" / name / "dataset.json")
        for planner, configuration, folds, epochs in runs:
            for fold in folds:
                label = f"{name} {plans_files[planner].stem} {configuration} fold {fold}"
                tasks.append((label, str(plans_files[planner]), dataset_json, configuration, fold, epochs, preset))
    # the training runs are independent: the tiny ones two at a time, one thread each (CI has 2 cores);
    # full-size ones one at a time (each needs several GB)
    workers = min(2, len(tasks)) if preset_name == "tiny" else 1
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for label, seconds in pool.map(_train, tasks):
            timings[label] = seconds
    shutil.rmtree(work, ignore_errors=True)
    summary = {"preset": preset_name, "key": cache_key(preset_name), "versions": versions(), "seconds": timings}
    summary["seconds"]["total"] = time.time() - started
    (out / DONE).write_text(json.dumps(summary, indent=2) + "\n")


def run_reference(
    jobs: list[dict], work: Path, python: str | None = None, timeout_s: float = 3600, threads: int = 1
) -> list[dict]:
    """Run nnU-Net's own predictor on ``jobs`` (see the module docstring) in one subprocess; one result per job.

    ``threads``: torch / OpenMP threads of that process (1 by default: shared CI cores).

    Raises:
        RuntimeError: the predictor failed (the output's tail is in the message).
    """
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    jobs_file = work / f"jobs-{len(list(work.glob('jobs-*.json')))}.json"
    jobs_file.write_text(json.dumps(jobs, indent=1))
    env = dict(os.environ)
    env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "nnUNet_compile": "f"})
    # nnU-Net caps its torch threads at nnUNet_def_n_proc while it predicts
    env["nnUNet_def_n_proc"] = str(threads)
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env.setdefault(key, str(work))  # nnU-Net warns when they are unset; the predictor needs none of them
    result = subprocess.run(
        [python or sys.executable, __file__, "--predict", str(jobs_file)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    out_file = Path(f"{jobs_file}.result.json")
    if result.returncode != 0 or not out_file.is_file():
        raise RuntimeError(f"nnU-Net's predictor failed (exit {result.returncode}):\n{(result.stdout + result.stderr)[-3000:]}")
    return json.loads(out_file.read_text())


def predict(jobs_file: Path) -> None:
    """The ``--predict`` entry (runs in the subprocess): nnUNetPredictor on every job, sequentially."""
    import resource

    import numpy as np
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    results = []
    for job in json.loads(Path(jobs_file).read_text()):
        clock = time.perf_counter()
        if job.get("kind") == "preprocess":
            from batchgenerators.utilities.file_and_folder_operations import load_json
            from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

            plans_manager = PlansManager(str(Path(job["model"]) / "plans.json"))
            configuration = plans_manager.get_configuration(job["configuration"])
            dataset_json = load_json(str(Path(job["model"]) / "dataset.json"))
            preprocessor = configuration.preprocessor_class(verbose=False)
            data, seg, _ = preprocessor.run_case(job["inputs"][0], job.get("seg"), plans_manager, configuration, dataset_json)
            np.savez_compressed(f"{job['outputs'][0]}.npz", data=data, seg=seg)
            results.append({"predict_s": time.perf_counter() - clock})
            continue
        device = torch.device(job.get("device", "cpu"))
        predictor = nnUNetPredictor(
            tile_step_size=0.5,
            use_gaussian=True,
            use_mirroring=bool(job.get("mirroring", True)),
            # nnU-Net's own default on CUDA: image, logits and blending on the GPU
            perform_everything_on_device=device.type == "cuda",
            device=device,
            verbose=False,
            verbose_preprocessing=False,
            allow_tqdm=False,
        )
        folds = job.get("folds")
        predictor.initialize_from_trained_model_folder(
            job["model"],
            use_folds=None if folds is None else [f if f == "all" else int(f) for f in folds],
            checkpoint_name=job.get("checkpoint", "checkpoint_final.pth"),
        )
        setup = time.perf_counter() - clock
        clock = time.perf_counter()
        predictor.predict_from_files_sequential(
            job["inputs"],
            job["outputs"],
            save_probabilities=bool(job.get("probabilities")),
            overwrite=True,
            folder_with_segs_from_prev_stage=job.get("prev_stage"),
        )
        seconds = time.perf_counter() - clock
        if job.get("dump"):
            preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
            data, _, _ = preprocessor.run_case(
                job["inputs"][0], None, predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json
            )
            logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu().numpy()
            np.savez_compressed(f"{job['outputs'][0]}_intermediates.npz", preprocessed=data, logits=logits)
        results.append(
            {
                "setup_s": setup,
                "predict_s": seconds,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
            }
        )
    Path(f"{jobs_file}.result.json").write_text(json.dumps(results, indent=1))


def write_untrained_checkpoint(folder: Path, fold: int = 0, seed: int = 0) -> Path:
    """``fold_<fold>/checkpoint_final.pth`` of ``folder`` (which holds ``plans.json`` and ``dataset.json``)
    with the network nnU-Net's own trainer builds from the plans, freshly initialised (seeded), saved
    in the trainer's checkpoint format.

    For speed comparisons on machines where the trained checkpoint cannot travel (the full-size
    network's checkpoint is 250 MB): the arithmetic per tile does not depend on the weights' values.
    Label agreement between tools is then measured on an untrained network.
    """
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    folder = Path(folder)
    configuration_name = folder.name.split("__")[-1]
    plans_manager = PlansManager(load_json(str(folder / "plans.json")))
    dataset_json = load_json(str(folder / "dataset.json"))
    configuration = plans_manager.get_configuration(configuration_name)
    torch.manual_seed(seed)
    network = nnUNetTrainer.build_network_architecture(
        plans_manager,
        configuration,
        len(dataset_json["channel_names"]),
        plans_manager.get_label_manager(dataset_json).num_segmentation_heads,
        enable_deep_supervision=True,
    )
    target = folder / f"fold_{fold}" / "checkpoint_final.pth"
    target.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = {
        "network_weights": network.state_dict(),
        "init_args": {
            "plans": plans_manager.plans,
            "configuration": configuration_name,
            "fold": fold,
            "dataset_json": dataset_json,
        },
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1, 2),
        "current_epoch": 0,
    }
    torch.save(checkpoint, target)
    return target


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--cache", type=Path, default=CACHE, help="cache root (default: Testing/data/cache/nnunet)")
    parser.add_argument("--build", type=Path, default=None, help=argparse.SUPPRESS)  # the subprocess's entry
    parser.add_argument("--print-path", action="store_true", help="only print the cached folder (built if missing)")
    parser.add_argument("--predict", type=Path, default=None, help="run nnU-Net's predictor on the jobs in this JSON file")
    parser.add_argument(
        "--untrained-checkpoint",
        type=Path,
        default=None,
        metavar="MODEL_FOLDER",
        help="write fold_0/checkpoint_final.pth of a model folder that has only its plans (see write_untrained_checkpoint)",
    )
    args = parser.parse_args()
    if args.untrained_checkpoint is not None:
        print(write_untrained_checkpoint(args.untrained_checkpoint))
        return 0
    if args.predict is not None:
        predict(args.predict)
        return 0
    if args.build is not None:
        sys.path.insert(0, str(REPO / "DeepSeg"))
        build(args.build, args.preset)
        return 0
    folder = ensure_models(args.preset, args.cache)
    if args.print_path:
        print(folder)
        return 0
    summary = json.loads((folder / DONE).read_text())
    print(f"{folder}\n" + "\n".join(f"  {k:60s} {v:7.1f} s" for k, v in summary["seconds"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
