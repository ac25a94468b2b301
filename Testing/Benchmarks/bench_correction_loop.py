"""The correction loop: does fine-tuning on a few corrected cases from a new scanner help?

    python Testing/Benchmarks/bench_correction_loop.py [--json] [--epochs 30] [--seeds 0 1 2] [--oracle] [--device cpu]

Base model: the bundled ``phantom-liver`` (trained on scanner profile ct-A by
scripts/train_default_model.py, which reproduces it in ~9 CPU minutes), or with ``--train-base`` the
same recipe trained inside the benchmark. Held-out test sets: 4
profile-A and 4 profile-B phantoms never used in training. The "site" dataset: 5 profile-B cases
whose ground truth stands in for the user's corrections (training split) plus 1 validation case,
written through the dataset API. Fine-tuning runs the same engine as ``deepseg train --base``.
Reports Dice per label on both test sets before and after (mean and sample standard deviation over
the fine-tuning seeds: the seed changes the patch draws, augmentation and dropout, so the spread is
the run-to-run noise the gain must exceed), the share of the base's in-domain (ct-A) Dice recovered
on ct-B, and each run's time.

``--oracle`` also trains the in-domain reference for profile B: the default model's recipe
(scripts/train_default_model.py: 16 phantoms, 40 epochs x 25 steps, same net, patch and loss) on
ct-B phantoms instead of ct-A, scored on the same ct-B test cases, i.e. the Dice a model trained at
the new site itself reaches (about 10 CPU minutes). ``--seeds`` with no value skips fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepSeg"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

from deepseg_core import metrics
from deepseg_core.datasets import Dataset
from deepseg_core.demo import DEFAULT_MODEL, SAMPLE_SPACING_XYZ_MM
from deepseg_core.inference import Segmenter, SegmentOptions
from deepseg_core.model_card import ModelCard
from deepseg_core.model_store import ModelStore, write_model_folder
from deepseg_core.phantoms import PHANTOM_LABELS, generate_phantom
from deepseg_core.training.engine import RetrainConfig, retrain

SHAPE = (40, 96, 96)
TEST_SEEDS = {"ct-A": range(900, 904), "ct-B": range(950, 954)}
SITE_TRAIN_SEEDS = range(600, 605)
SITE_VALIDATION_SEED = 640


def phantom(seed: int, profile: str):
    return generate_phantom(seed=seed, profile=profile, shape_zyx=SHAPE, spacing_xyz_mm=SAMPLE_SPACING_XYZ_MM)


def test_dice(segmenter: Segmenter) -> dict[str, dict[str, float]]:
    out = {}
    for profile, seeds in TEST_SEEDS.items():
        scores: dict[str, list[float]] = {label.name: [] for label in PHANTOM_LABELS}
        for seed in seeds:
            case = phantom(seed, profile)
            labels = segmenter.segment([case.image], SegmentOptions(check_modality=False)).labels.array_zyx
            for label in PHANTOM_LABELS:
                scores[label.name].append(metrics.dice(labels == label.value, case.labels.array_zyx == label.value))
        out[profile] = {name: float(np.mean(v)) for name, v in scores.items()}
    return out


def train_reference(profile: str, device: str) -> tuple[ModelCard, Segmenter, float]:
    """The default model's recipe (scripts/train_default_model.py) trained on its 16 phantoms of ``profile``."""
    from train_default_model import train_phantom_model

    card, net = train_phantom_model(profile, f"reference-{profile}", f"benchmark reference on {profile}", device=device)
    return card, Segmenter(card, net, torch.device(device)), card.metrics["training"]["seconds"]


def train_oracle(device: str) -> dict:
    """The in-domain reference for the new site: the same recipe trained on ct-B phantoms."""
    _, segmenter, seconds = train_reference("ct-B", device)
    return {"dice": test_dice(segmenter)["ct-B"], "train_seconds": seconds, "cases": 16}


def summarise(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def site_dataset(root: Path) -> Path:
    dataset = Dataset.create(root / "siteB", "siteB", PHANTOM_LABELS, ("CT",))
    for seed in SITE_TRAIN_SEEDS:
        case = phantom(seed, "ct-B")
        dataset.add_case(f"corrected_{seed}", [case.image], case.labels.array_zyx.astype(np.uint8), split="train")
    case = phantom(SITE_VALIDATION_SEED, "ct-B")
    dataset.add_case("validation_case", [case.image], case.labels.array_zyx.astype(np.uint8), split="validation")
    return root / "siteB"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--oracle", action="store_true", help="also train the in-domain ct-B reference model")
    parser.add_argument(
        "--train-base", action="store_true", help="train the ct-A base here (~10 min) instead of using the bundled one"
    )
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset_dir = site_dataset(root)
        base = DEFAULT_MODEL
        base_seconds = None
        if args.train_base:
            card, segmenter, base_seconds = train_reference("ct-A", args.device)
            write_model_folder(root / "base", card, segmenter.net)
            base = root / "base"
        before = test_dice(Segmenter.load(base, device=args.device))
        for seed in args.seeds:
            store = ModelStore(root / f"store{seed}")
            config = RetrainConfig(
                epochs=args.epochs, steps_per_epoch=args.steps, batch_size=2, learning_rate=args.learning_rate, seed=seed
            )
            started = time.perf_counter()
            outcome = retrain(
                dataset_dir, "phantom-liver", config, root / f"ckpt{seed}", base=base, store=store, device=args.device
            )
            seconds = time.perf_counter() - started
            after = test_dice(Segmenter.load(store.folder(outcome.card.ref), device=args.device))
            runs.append({"seed": seed, "finetune_seconds": seconds, "dice_after": after})
            print(json.dumps({"event": "seed_done", **runs[-1]}), file=sys.stderr, flush=True)
    oracle = train_oracle(args.device) if args.oracle else None
    after_summary = {
        profile: {name: summarise([r["dice_after"][profile][name] for r in runs]) for name in before[profile]}
        for profile in TEST_SEEDS
    }
    recovered = {name: summarise([r["dice_after"]["ct-B"][name] / before["ct-A"][name] for r in runs]) for name in before["ct-A"]}
    result = {
        "base": "trained here on 16 ct-A phantoms" if args.train_base else "phantom-liver:1 (bundled, trained on ct-A)",
        "base_train_seconds": base_seconds,
        "site_training_cases": len(SITE_TRAIN_SEEDS),
        "epochs": args.epochs,
        "steps_per_epoch": args.steps,
        "learning_rate": args.learning_rate,
        "seeds": args.seeds,
        "dice_before": before,
        "dice_after": after_summary,
        "ct_B_after_over_ct_A_before": recovered,
        "runs": runs,
        "oracle_ct_B": oracle,
    }
    if oracle and runs:
        result["ct_B_after_over_oracle"] = {
            name: summarise([r["dice_after"]["ct-B"][name] / oracle["dice"][name] for r in runs]) for name in oracle["dice"]
        }
    if args.json:
        print(json.dumps(result))
    else:
        seconds = [r["finetune_seconds"] for r in runs]
        print(f"fine-tuned on {len(SITE_TRAIN_SEEDS)} ct-B cases, {len(runs)} seed(s), {np.mean(seconds):.0f} s per run")
        print(f"{'test set':<10}{'label':<14}{'before':>8}{'after (mean +- sd)':>22}")
        for profile in after_summary:
            for name in before[profile]:
                a = after_summary[profile][name]
                print(f"{profile:<10}{name:<14}{before[profile][name]:>8.3f}{a['mean']:>14.3f} +- {a['std']:.3f}")
        for name, r in recovered.items():
            print(f"ct-B after / ct-A before, {name}: {r['mean']:.1%} +- {r['std']:.1%}")
        if oracle:
            print(f"in-domain ct-B reference (trained on 16 ct-B cases, {oracle['train_seconds']:.0f} s): {oracle['dice']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
