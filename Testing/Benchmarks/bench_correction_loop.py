"""The correction loop: does fine-tuning on a few corrected cases from a new scanner help?

    python Testing/Benchmarks/bench_correction_loop.py [--json] [--epochs 12] [--device cpu]

Base model: the bundled ``phantom-liver`` (trained on scanner profile ct-A by
scripts/train_default_model.py, which reproduces it in ~9 CPU minutes). Held-out test sets: 4
profile-A and 4 profile-B phantoms never used in training. The "site" dataset: 5 profile-B cases
whose ground truth stands in for the user's corrections (training split) plus 1 validation case,
written through the dataset API. Fine-tuning runs the same engine as ``deepseg train --base``.
Reports Dice per label on both test sets before and after, and the run's time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepSeg"))

from deepseg_core import metrics
from deepseg_core.datasets import Dataset
from deepseg_core.demo import DEFAULT_MODEL, SAMPLE_SPACING_XYZ_MM
from deepseg_core.inference import Segmenter, SegmentOptions
from deepseg_core.model_store import ModelStore
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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        dataset = Dataset.create(root / "siteB", "siteB", PHANTOM_LABELS, ("CT",))
        for seed in SITE_TRAIN_SEEDS:
            case = phantom(seed, "ct-B")
            dataset.add_case(f"corrected_{seed}", [case.image], case.labels.array_zyx.astype(np.uint8), split="train")
        case = phantom(SITE_VALIDATION_SEED, "ct-B")
        dataset.add_case("validation_case", [case.image], case.labels.array_zyx.astype(np.uint8), split="validation")
        before = test_dice(Segmenter.load(DEFAULT_MODEL, device=args.device))
        store = ModelStore(root / "store")
        config = RetrainConfig(epochs=args.epochs, steps_per_epoch=args.steps, batch_size=2, learning_rate=5e-4, seed=0)
        started = time.perf_counter()
        outcome = retrain(
            root / "siteB", "phantom-liver", config, root / "ckpt", base=DEFAULT_MODEL, store=store, device=args.device
        )
        seconds = time.perf_counter() - started
        after = test_dice(Segmenter.load(store.folder(outcome.card.ref), device=args.device))
    result = {
        "base": "phantom-liver:1 (bundled, trained on ct-A)",
        "site_training_cases": len(SITE_TRAIN_SEEDS),
        "epochs": args.epochs,
        "steps_per_epoch": args.steps,
        "finetune_seconds": seconds,
        "dice_before": before,
        "dice_after": after,
        "validation_new": {k: v["dice"] for k, v in outcome.validation["mean"].items()},
        "validation_parent": {k: v["dice"] for k, v in outcome.parent_validation["mean"].items()},
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f"fine-tuned on {len(SITE_TRAIN_SEEDS)} ct-B cases in {seconds:.0f} s")
        print(f"{'test set':<10}{'label':<14}{'before':>8}{'after':>8}")
        for profile in TEST_SEEDS:
            for name in before[profile]:
                print(f"{profile:<10}{name:<14}{before[profile][name]:>8.3f}{after[profile][name]:>8.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
