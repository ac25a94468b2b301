"""The correction loop: does fine-tuning on a few corrected cases from a new scanner help, and how
close does it come to a model trained at the new site?

    python Testing/Benchmarks/bench_correction_loop.py [--json] [--device cpu] [--epochs 40] [--steps 25]
        [--learning-rate 5e-4] [--seeds 0 1 2] [--base-model bundled|nnunet] [--smoke]

What runs (everything through the dataset API and ``deepseg_core.training.engine.retrain``, the
engine behind ``deepseg train``):

* Base: the bundled ``phantom-liver`` (trained on scanner profile ct-A by scripts/train_default_model.py).
* Fine-tune: ``retrain(base=phantom-liver)`` on a ct-B "site" dataset of 5 training cases (their
  ground truth stands in for the user's corrections) and 4 validation cases, once per ``--seeds``.
* Reference ("had we trained at the new site"): ``retrain(base=None)``, i.e. the same engine from
  scratch with the same RetrainConfig (learning rate, augmentation, loss, patch, batch, steps per
  epoch, epoch budget, validation), on a ct-B dataset of 16 training cases (a superset of the 5) and
  the same 4 validation cases; seed 0. Only the initialisation and the number of training cases differ.
* Test sets: 12 held-out ct-A and 12 held-out ct-B phantoms (seeds 3000-3011 and 3100-3111; no
  other script or test uses these seeds, so their anatomy is in no training or validation case).

How the settings were chosen: the learning rate (5e-4, RetrainConfig's default) and the epoch
budget (40 epochs x 25 steps of batch 2, the step count that trained the bundled base) were fixed
before any run and are not varied. The engine
validates on the dataset's validation split after every epoch and keeps the checkpoint with the best
mean validation Dice over the labels in ``CHECKPOINT_DIR/best``; that validation-selected
checkpoint is the model scored here, for the fine-tunes and the reference alike. The test cases
choose nothing. (The version ``retrain`` stores is the last epoch; its test Dice is reported too,
as ``last_epoch``, for information only.)

Reported per label: mean Dice over the test cases with a 95 % bootstrap interval (test cases drawn
with replacement, 2000 resamples, fixed seed, percentile interval), for the base, each fine-tuning
seed, the seed-averaged per-case Dice and the reference; the mean +- sample SD over fine-tuning
seeds (run-to-run noise); the ct-B gain and ct-A change (paired over test cases); and the recovery
ratios, fine-tuned ct-B / reference ct-B (paired) and fine-tuned ct-B / base ct-A (independent sets),
each with its bootstrap interval.

``--base-model nnunet`` starts the loop from an imported nnU-Net v2 model instead: fold 0 of the tiny
3d_fullres folder that nnU-Net's own code trained on ct-A phantoms (``scripts/make_tiny_nnunet_model.py``,
cached; 8-16-32 features, patch 16 x 16 x 32, 100 iterations), imported with ``deepseg models import``'s
importer and fine-tuned by the same engine and recipe with its own preprocessing and architecture. The
reference is left out (it does not depend on the base: run the default for it).

``--smoke`` runs all of it at toy size (1 seed, 2 epochs x 2 steps, 2 test cases per profile) to check
that it works; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepSeg"))

import deepseg_core
from deepseg_core import metrics
from deepseg_core.datasets import Dataset
from deepseg_core.demo import DEFAULT_MODEL, SAMPLE_SPACING_XYZ_MM
from deepseg_core.inference import Segmenter, SegmentOptions
from deepseg_core.model_store import ModelStore
from deepseg_core.phantoms import PHANTOM_LABELS, Phantom, generate_phantom
from deepseg_core.training.engine import RetrainConfig, retrain

SHAPE = (40, 96, 96)
PROFILES = ("ct-A", "ct-B")
TEST_SEED0 = {"ct-A": 3000, "ct-B": 3100}
SITE_TRAIN_SEED0 = 600  # fine-tune: the first 5; reference: the first 16 (a superset)
SITE_VALIDATION_SEED0 = 640
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
LABELS = [label.name for label in PHANTOM_LABELS]


@dataclass(frozen=True)
class Sizes:
    test_cases: int  # per profile
    correction_cases: int  # fine-tune training cases
    reference_cases: int  # reference training cases
    validation_cases: int  # shared by both datasets


FULL = Sizes(test_cases=12, correction_cases=5, reference_cases=16, validation_cases=4)
SMOKE = Sizes(test_cases=2, correction_cases=2, reference_cases=3, validation_cases=1)


def phantom(seed: int, profile: str) -> Phantom:
    return generate_phantom(seed=seed, profile=profile, shape_zyx=SHAPE, spacing_xyz_mm=SAMPLE_SPACING_XYZ_MM)


def log(**event) -> None:
    print(json.dumps(event), file=sys.stderr, flush=True)


# -- data --------------------------------------------------------------------------------------


def site_dataset(folder: Path, train_cases: int, validation_cases: int) -> Path:
    """A ct-B dataset written through the dataset API: training cases and a fixed validation split."""
    dataset = Dataset.create(folder, folder.name, PHANTOM_LABELS, ("CT",))
    splits = (("train", SITE_TRAIN_SEED0, train_cases), ("validation", SITE_VALIDATION_SEED0, validation_cases))
    for split, seed0, count in splits:
        for seed in range(seed0, seed0 + count):
            case = phantom(seed, "ct-B")
            dataset.add_case(f"ctB_{seed}", [case.image], case.labels.array_zyx.astype(np.uint8), split=split)
    return folder


def per_case_dice(segmenter: Segmenter, cases: list[Phantom]) -> dict[str, np.ndarray]:
    """Dice per label, one entry per test case."""
    scores: dict[str, list[float]] = {name: [] for name in LABELS}
    for case in cases:
        labels = segmenter.segment([case.image], SegmentOptions(check_modality=False)).labels.array_zyx
        for label in PHANTOM_LABELS:
            scores[label.name].append(metrics.dice(labels == label.value, case.labels.array_zyx == label.value))
    return {name: np.asarray(v) for name, v in scores.items()}


# -- statistics --------------------------------------------------------------------------------


def resampled_means(arrays: list[np.ndarray], seed: int) -> list[np.ndarray]:
    """Bootstrap means of paired per-case arrays (the same test cases drawn for each)."""
    n = len(arrays[0])
    index = np.random.default_rng(seed).integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))
    return [a[index].mean(axis=1) for a in arrays]


def interval(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.percentile(values, [2.5, 97.5])]


def estimate(per_case: np.ndarray) -> dict:
    """Mean over test cases and its 95 % bootstrap interval."""
    return {"mean": float(per_case.mean()), "ci95": interval(resampled_means([per_case], BOOTSTRAP_SEED)[0])}


def paired_difference(a: np.ndarray, b: np.ndarray) -> dict:
    """mean(a) - mean(b) over the same test cases, with its bootstrap interval."""
    ma, mb = resampled_means([a, b], BOOTSTRAP_SEED)
    return {"mean": float(a.mean() - b.mean()), "ci95": interval(ma - mb)}


def ratio(a: np.ndarray, b: np.ndarray, paired: bool) -> dict:
    """mean(a) / mean(b) with its bootstrap interval; paired: same test cases, else independent sets."""
    if paired:
        ma, mb = resampled_means([a, b], BOOTSTRAP_SEED)
    else:
        ma, mb = resampled_means([a], BOOTSTRAP_SEED)[0], resampled_means([b], BOOTSTRAP_SEED + 1)[0]
    return {"mean": float(a.mean() / b.mean()), "ci95": interval(ma / mb)}


def spread(values: list[float]) -> dict:
    """Mean and sample SD over fine-tuning seeds."""
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


# -- training ----------------------------------------------------------------------------------


def train_and_score(
    dataset_dir: Path, name: str, config: RetrainConfig, work: Path, base: Path | None, tests: dict, device: str
) -> dict:
    """``retrain`` once; per-case test Dice of the validation-selected checkpoint and of the last epoch."""
    from safetensors.torch import load_file

    store, checkpoints = ModelStore(work / "store"), work / "checkpoints"

    def progress(event: dict) -> None:
        if event.get("event") == "epoch_end":
            log(event="epoch", run=work.name, epoch=event["epoch"], loss=round(event["loss"], 4), val=event.get("mean_dice"))

    started = time.perf_counter()
    outcome = retrain(dataset_dir, name, config, checkpoints, base=base, store=store, device=device, on_event=progress)
    seconds = time.perf_counter() - started
    scoring = time.perf_counter()
    best = json.loads((checkpoints / "best" / "state.json").read_text())
    last = Segmenter.load(store.folder(outcome.card.ref), device=device)
    selected = Segmenter.load(store.folder(outcome.card.ref), device=device)
    selected.net.load_state_dict(load_file(str(checkpoints / "best" / "weights.safetensors")))
    return {
        "train_seconds": seconds,
        "selected_epoch": best["epoch"],
        "selected_validation_mean_dice": best["score"],
        "validation_curve": [r["mean_dice"] for r in outcome.history if "mean_dice" in r],
        "per_case": {p: per_case_dice(selected, cases) for p, cases in tests.items()},
        "per_case_last_epoch": {p: per_case_dice(last, cases) for p, cases in tests.items()},
        "test_seconds": time.perf_counter() - scoring,
    }


# -- report ------------------------------------------------------------------------------------


def summarise(base: dict, runs: list[dict], reference: dict | None) -> dict:
    """Estimates, seed spreads, differences and ratios from the per-case Dice arrays."""
    averaged = {p: {n: np.mean([r["per_case"][p][n] for r in runs], axis=0) for n in LABELS} for p in PROFILES}
    out: dict = {
        "base": {p: {n: estimate(base[p][n]) for n in LABELS} for p in PROFILES},
        "finetune_seed_averaged": {p: {n: estimate(averaged[p][n]) for n in LABELS} for p in PROFILES},
        "finetune_over_seeds": {p: {n: spread([r["per_case"][p][n].mean() for r in runs]) for n in LABELS} for p in PROFILES},
        "finetune_last_epoch_over_seeds": {
            p: {n: spread([r["per_case_last_epoch"][p][n].mean() for r in runs]) for n in LABELS} for p in PROFILES
        },
        "gain_ct_B": {n: paired_difference(averaged["ct-B"][n], base["ct-B"][n]) for n in LABELS},
        "change_ct_A": {n: paired_difference(averaged["ct-A"][n], base["ct-A"][n]) for n in LABELS},
    }
    ratios = [("finetune_ct_B_over_base_ct_A", "ct-B", base["ct-A"], False)]
    if reference is not None:
        ref = reference["per_case"]["ct-B"]
        out.update(
            {
                "reference_ct_B": {n: estimate(ref[n]) for n in LABELS},
                "reference_ct_B_last_epoch": {n: float(reference["per_case_last_epoch"]["ct-B"][n].mean()) for n in LABELS},
                "finetune_minus_reference_ct_B": {n: paired_difference(averaged["ct-B"][n], ref[n]) for n in LABELS},
            }
        )
        ratios.insert(0, ("finetune_ct_B_over_reference_ct_B", "ct-B", ref, True))
    for key, of, over, paired in ratios:
        out[key] = {
            n: {
                "seed_averaged": ratio(averaged[of][n], over[n], paired),
                "over_seeds": spread([r["per_case"][of][n].mean() / over[n].mean() for r in runs]),
            }
            for n in LABELS
        }
    return out


def jsonable(value):
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [round(float(v), 4) for v in value]
    if isinstance(value, float):
        return round(value, 4)
    return value


def fmt(e: dict, percent: bool = False) -> str:
    scale, unit = (100, " %") if percent else (1, "")
    lo, hi = e["ci95"]
    return f"{e['mean'] * scale:.3f} [{lo * scale:.3f}, {hi * scale:.3f}]{unit}"


def print_report(result: dict) -> None:
    s, settings = result["summary"], result["settings"]
    print(f"deepseg_core from {result['deepseg_core']}; {settings}")
    print(f"{'test set':<6} {'label':<13} {'base':>24} {'fine-tuned (seed-averaged)':>28} {'seeds mean +- sd':>18}")
    for p in PROFILES:
        for n in LABELS:
            sd = s["finetune_over_seeds"][p][n]
            row = f"{p:<6} {n:<13} {fmt(s['base'][p][n]):>24} {fmt(s['finetune_seed_averaged'][p][n]):>28}"
            print(f"{row} {sd['mean']:>10.3f} +- {sd['sd']:.3f}")
    for n in LABELS:
        if result["reference"] is not None:
            print(f"reference ct-B {n}: {fmt(s['reference_ct_B'][n])} (epoch {result['reference']['selected_epoch']})")
        for key in ("finetune_ct_B_over_reference_ct_B", "finetune_ct_B_over_base_ct_A"):
            if key not in s:
                continue
            r = s[key][n]
            print(f"  {key} {n}: {fmt(r['seed_averaged'])}, seeds {r['over_seeds']['mean']:.3f} +- {r['over_seeds']['sd']:.3f}")
    for r in result["runs"]:
        print(f"seed {r['seed']}: {r['train_seconds']:.0f} s, selected epoch {r['selected_epoch']}")
    if result["reference"] is not None:
        print(f"reference: {result['reference']['train_seconds']:.0f} s")
    print(f"base: {result['base_model']}; total {result['wall_seconds']:.0f} s")


def base_model(kind: str, root: Path) -> tuple[Path, str]:
    """The base's model folder and the fine-tune's name: the bundled model, or fold 0 of the tiny nnU-Net
    3d_fullres folder imported into a store under ``root``."""
    if kind == "bundled":
        return DEFAULT_MODEL, "phantom-liver"
    import importlib.util

    from deepseg_core.importers import import_model

    script = Path(__file__).resolve().parents[2] / "scripts" / "make_tiny_nnunet_model.py"
    spec = importlib.util.spec_from_file_location("make_tiny_nnunet_model", script)
    assert spec is not None and spec.loader is not None
    maker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maker)
    folder = maker.model_folder(maker.ensure_models("tiny"), "Dataset501_DeepSegTiny", "3d_fullres")
    store = ModelStore(root / "imported")
    card = import_model(folder, store, name="nnunet-ctA", folds=["0"])
    return store.folder(card.ref), card.name


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=40, help="epoch budget; the epoch used is chosen on validation")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--smoke", action="store_true", help="toy size (1 seed, 2 epochs x 2 steps, 2 test cases)")
    parser.add_argument(
        "--base-model", choices=["bundled", "nnunet"], default="bundled", help="nnunet: an imported nnU-Net v2 model"
    )
    args = parser.parse_args()
    sizes = SMOKE if args.smoke else FULL
    if args.smoke:
        args.epochs, args.steps, args.seeds = 2, 2, args.seeds[:1]
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    log(event="start", deepseg_core=deepseg_core.__file__, torch_threads=torch.get_num_threads())
    config = RetrainConfig(epochs=args.epochs, steps_per_epoch=args.steps, batch_size=2, learning_rate=args.learning_rate)
    tests = {p: [phantom(s, p) for s in range(TEST_SEED0[p], TEST_SEED0[p] + sizes.test_cases)] for p in PROFILES}
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        corrections = site_dataset(root / "siteB-corrections", sizes.correction_cases, sizes.validation_cases)
        reference_data = site_dataset(root / "siteB-reference", sizes.reference_cases, sizes.validation_cases)
        base_folder, base_name = base_model(args.base_model, root)
        base = {p: per_case_dice(Segmenter.load(base_folder, device=args.device), tests[p]) for p in PROFILES}
        for seed in args.seeds:
            seeded = dataclasses.replace(config, seed=seed)
            work = root / f"finetune{seed}"
            run = train_and_score(corrections, base_name, seeded, work, base_folder, tests, args.device)
            runs.append({"seed": seed, **run})
            log(event="finetune_done", seed=seed, seconds=run["train_seconds"], selected_epoch=run["selected_epoch"])
        reference = None
        if args.base_model == "bundled":
            reference = train_and_score(
                reference_data, "reference-ct-B", config, root / "reference", None, {"ct-B": tests["ct-B"]}, args.device
            )
            log(event="reference_done", seconds=reference["train_seconds"], selected_epoch=reference["selected_epoch"])
    result = {
        "deepseg_core": deepseg_core.__file__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "smoke": args.smoke,
        "base_model": args.base_model,
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "settings": {
            "epoch_budget": args.epochs,
            "steps_per_epoch": args.steps,
            "batch_size": config.batch_size,
            "learning_rate": config.learning_rate,
            "loss": config.loss,
            "checkpoint": "best mean validation Dice (engine's best/), validated every epoch",
        },
        "cases": {
            "test_per_profile": sizes.test_cases,
            "test_seeds": {p: [TEST_SEED0[p], TEST_SEED0[p] + sizes.test_cases - 1] for p in PROFILES},
            "finetune_train": sizes.correction_cases,
            "reference_train": sizes.reference_cases,
            "validation": sizes.validation_cases,
        },
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "seed": BOOTSTRAP_SEED, "interval": "95 % percentile, over test cases"},
        "summary": summarise(base, runs, reference),
        "runs": runs,
        "reference": reference,
        "base_per_case": base,
        "wall_seconds": time.perf_counter() - started,
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0], "cpus": os.cpu_count()},
    }
    result = jsonable(result)
    if args.json:
        print(json.dumps(result))
    else:
        print_report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
