"""Does voxel-wise uncertainty point at the errors? AUROC and errors caught in the top 5 %.

    python Testing/Benchmarks/bench_uncertainty.py [--json] [--cases 4] [--device cpu]
    python Testing/Benchmarks/bench_uncertainty.py --train-dropout-model [--dropout 0.1] [--epochs 40] [--steps 25]
                                                   [--dropout-model DIR]   # also Monte-Carlo dropout
    python Testing/Benchmarks/bench_uncertainty.py --dropout-model DIR     # MC dropout with a model trained before

The bundled ``phantom-liver`` model segments held-out phantoms of its own profile (ct-A) and of a
shifted one (ct-B and halfway to it). Error voxels are where the predicted label differs from the
truth. For each uncertainty method the benchmark reports, pooled over the cases of a profile:

- ``auroc``: probability that a random error voxel is more uncertain than a random correct voxel;
- ``errors_in_top5``: fraction of all error voxels inside the 5 % most uncertain voxels;

both over all voxels and over the body only (voxels above -500 HU, which excludes the easy air),
plus the seconds per case (``--backend torch`` by default for every row: Monte-Carlo dropout runs
on torch, so the times compare). Methods: ``tta`` (DeepSeg's default: 8 mirror passes plus 4 intensity
perturbations of the normalised input) and ``mirror`` (the 8 mirror passes alone).

Monte-Carlo dropout needs a model trained with dropout, which the bundled one is not. With
``--train-dropout-model`` the benchmark trains one with the bundled model's recipe
(``scripts/train_default_model.py``: 16 ct-A phantoms, 40 epochs x 25 steps, about 9 CPU minutes)
plus dropout ``--dropout`` after every conv, and writes it to ``--dropout-model DIR`` when given;
``--dropout-model DIR`` alone loads such a model. That model then gets ``mc_dropout`` rows (8
passes with the dropout layers active) and, for a comparison on the same errors, ``tta`` rows.
Each model's own Dice (plain segmentation, no uncertainty passes) per profile is reported too, so a
dropout model that segments worse than the bundled one shows as such.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "DeepSeg"))

from deepseg_core.openmp_waits import shorten_openmp_spinning

shorten_openmp_spinning()  # as DeepSeg's engine processes do, before torch loads OpenMP

from deepseg_core import metrics
from deepseg_core.demo import DEFAULT_MODEL, SAMPLE_SPACING_XYZ_MM
from deepseg_core.inference import Segmenter, SegmentOptions
from deepseg_core.phantoms import PHANTOM_LABELS, PROFILES, ScannerProfile, generate_phantom, interpolate_profiles
from deepseg_core.uncertainty import error_detection

SHAPE = (40, 96, 96)
SEED0 = 1300
#: row method -> segment options (besides the device)
METHODS = {
    "tta": {"uncertainty": "tta"},
    "mirror": {"uncertainty": "tta", "uncertainty_perturbations": ()},
    "mc_dropout": {"uncertainty": "mc_dropout"},
}


def run(segmenter: Segmenter, profile: ScannerProfile, cases: int, device: str, method: str, backend: str) -> dict:
    """Error detection of ``method`` on ``cases`` phantoms of ``profile``, pooled over the cases."""
    options = SegmentOptions(device=device, backend=backend, **METHODS[method])
    entropies, errors, body, seconds, backends = [], [], [], [], set()
    for i in range(cases):
        case = generate_phantom(seed=SEED0 + i, profile=profile, shape_zyx=SHAPE, spacing_xyz_mm=SAMPLE_SPACING_XYZ_MM)
        started = time.perf_counter()
        result = segmenter.segment([case.image], options)
        seconds.append(time.perf_counter() - started)
        backends.add(result.backend)
        entropies.append(result.uncertainty.array_zyx.ravel())
        errors.append((result.labels.array_zyx != case.labels.array_zyx).ravel())
        body.append((case.image.array_zyx > -500).ravel())
    u, e, b = np.concatenate(entropies), np.concatenate(errors), np.concatenate(body)
    everywhere = error_detection(u, e)
    in_body = error_detection(u[b], e[b])
    return {
        "auroc_all": everywhere["auroc"],
        "errors_in_top5_all": everywhere["errors_in_top"],
        "auroc_body": in_body["auroc"],
        "errors_in_top5_body": in_body["errors_in_top"],
        "error_rate": everywhere["error_rate"],
        "seconds_per_case": float(np.mean(seconds)),
        "backend": "+".join(sorted(backends)),
    }


def own_dice(segmenter: Segmenter, profile: ScannerProfile, cases: int, device: str, backend: str) -> dict[str, float]:
    """Mean Dice per label of the model's plain segmentation (no uncertainty passes) on the same cases,
    and its mean seconds per case (``plain_seconds_per_case``: the time the uncertainty passes add to)."""
    scores: dict[str, list[float]] = {label.name: [] for label in PHANTOM_LABELS}
    seconds = []
    for i in range(cases):
        case = generate_phantom(seed=SEED0 + i, profile=profile, shape_zyx=SHAPE, spacing_xyz_mm=SAMPLE_SPACING_XYZ_MM)
        started = time.perf_counter()
        labels = segmenter.segment([case.image], SegmentOptions(device=device, backend=backend)).labels.array_zyx
        seconds.append(time.perf_counter() - started)
        for label in PHANTOM_LABELS:
            scores[label.name].append(metrics.dice(labels == label.value, case.labels.array_zyx == label.value))
    return {
        **{name: float(np.mean(values)) for name, values in scores.items()},
        "plain_seconds_per_case": float(np.mean(seconds)),
    }


def dropout_model(args: argparse.Namespace, scratch: Path) -> tuple[Path | None, dict]:
    """The folder of the model with dropout (trained here or given), and how it was made."""
    if not args.train_dropout_model:
        if args.dropout_model is None:
            return None, {}
        return args.dropout_model, {"folder": str(args.dropout_model), "trained_here": False}
    if args.dropout_model is not None and args.dropout_model.exists():  # refused before, not after, 9 minutes of training
        raise SystemExit(f"{args.dropout_model} exists: give a new folder to --dropout-model, or leave out --train-dropout-model")
    sys.path.insert(0, str(REPO / "scripts"))
    from train_default_model import train_phantom_model

    from deepseg_core.model_store import write_model_folder

    print(f"training the dropout model: dropout {args.dropout}, {args.epochs} x {args.steps} steps", file=sys.stderr, flush=True)
    started = time.perf_counter()
    card, net = train_phantom_model(
        "ct-A",
        "phantom-liver-dropout",
        f"The default model's recipe with dropout {args.dropout} after every conv (bench_uncertainty.py).",
        epochs=args.epochs,
        steps=args.steps,
        dropout=args.dropout,
        device=args.device,
    )
    folder = args.dropout_model or scratch / "phantom-liver-dropout"
    write_model_folder(folder, card, net)
    made = {"folder": str(folder), "trained_here": True, "dropout": args.dropout, "epochs": args.epochs, "steps": args.steps}
    return folder, {**made, "train_seconds": time.perf_counter() - started}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", type=int, default=4, help="held-out phantoms per profile")
    parser.add_argument(
        "--backend", default="torch", help="inference backend of every row (torch: MC dropout needs it, so s/case compare)"
    )
    parser.add_argument("--train-dropout-model", action="store_true", help="train a model with dropout here (about 9 min)")
    parser.add_argument("--dropout", type=float, default=0.1, help="its dropout probability after every conv")
    parser.add_argument("--epochs", type=int, default=40, help="its epochs (the bundled recipe: 40)")
    parser.add_argument("--steps", type=int, default=25, help="its steps per epoch (the bundled recipe: 25)")
    parser.add_argument(
        "--dropout-model",
        type=Path,
        default=None,
        help="folder of a model with dropout: written by --train-dropout-model, else read",
    )
    return parser.parse_args()


def print_report(table: list[dict], dice: dict, dropout_info: dict) -> None:
    """The rows and each model's own Dice as text tables."""
    if not dropout_info:
        print("(no model with dropout: --train-dropout-model or --dropout-model DIR adds the mc_dropout rows)")
    header = f"{'model':<9}{'method':<12}{'profile':<22}{'errors':>8}{'AUROC all':>11}{'top5 all':>10}"
    print(header + f"{'AUROC body':>12}{'top5 body':>11}{'s/case':>8}  backend")
    for r in table:
        print(
            f"{r['model']:<9}{r['method']:<12}{r['profile']:<22}{r['error_rate']:>8.2%}{r['auroc_all']:>11.3f}"
            f"{r['errors_in_top5_all']:>10.1%}{r['auroc_body']:>12.3f}{r['errors_in_top5_body']:>11.1%}"
            f"{r['seconds_per_case']:>8.1f}  {r['backend']}"
        )
    print(f"\n{'model':<9}{'profile':<22}" + "".join(f"{'Dice ' + label.name:>18}" for label in PHANTOM_LABELS))
    for model, per_profile in dice.items():
        for name, scores in per_profile.items():
            print(f"{model:<9}{name:<22}" + "".join(f"{scores[label.name]:>18.3f}" for label in PHANTOM_LABELS))
    if dropout_info:
        print(f"\ndropout model: {json.dumps(dropout_info)}")


def main() -> int:
    args = parse_args()
    profiles = {
        "ct-A": PROFILES["ct-A"],
        "ct-A -> ct-B, 50 %": interpolate_profiles(PROFILES["ct-A"], PROFILES["ct-B"], 0.5),
        "ct-B": PROFILES["ct-B"],
    }
    with tempfile.TemporaryDirectory(prefix="bench-uncertainty-") as scratch:
        dropout_folder, dropout_info = dropout_model(args, Path(scratch))
        models = {"bundled": (Segmenter.load(DEFAULT_MODEL, device=args.device), ("tta", "mirror"))}
        if dropout_folder is not None:
            models["dropout"] = (Segmenter.load(dropout_folder, device=args.device), ("mc_dropout", "tta"))
            dropout_info["dropout"] = models["dropout"][0].card.architecture.config.get("dropout")
    table, dice = [], {}
    for model, (segmenter, methods) in models.items():
        dice[model] = {
            name: own_dice(segmenter, profile, args.cases, args.device, args.backend) for name, profile in profiles.items()
        }
        for method in methods:
            for name, profile in profiles.items():
                row = {"model": model, "method": method, "profile": name}
                row.update(run(segmenter, profile, args.cases, args.device, method, args.backend))
                table.append(row)
                print(json.dumps({"event": "row_done", **row}), file=sys.stderr, flush=True)
    if args.json:
        result = {"model": str(DEFAULT_MODEL), "dropout_model": dropout_info or None, "cases_per_row": args.cases}
        print(json.dumps({**result, "rows": table, "dice": dice}))
    else:
        print_report(table, dice, dropout_info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
