"""Train the bundled default model ("phantom-liver") and write the bundled sample, reproducibly.

    python scripts/train_default_model.py [--epochs 40] [--output DeepSeg/deepseg_core/bundled]
    python scripts/train_default_model.py --fingerprint-only   # recompute the card's fingerprint only

Trains a small 3D U-Net on CT phantoms of scanner profile A (liver + lesions) with the project's
own training loop, measures it on held-out phantoms with the full inference pipeline, and writes:

* ``bundled/models/phantom-liver/`` (model.json + weights.safetensors), and
* ``bundled/sample_ct.nrrd`` + ``bundled/sample_ct_truth.seg.nrrd`` (the README's sample case).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "DeepSeg"))

from deepseg_core import demo, io, metrics, phantoms  # noqa: E402
from deepseg_core.config import to_dict  # noqa: E402
from deepseg_core.domain_shift import training_fingerprint  # noqa: E402
from deepseg_core.fileutil import atomic_path  # noqa: E402
from deepseg_core.inference import Segmenter, SegmentOptions  # noqa: E402
from deepseg_core.model_card import (  # noqa: E402
    Architecture,
    InferenceDefaults,
    Inputs,
    ModelCard,
    Normalization,
    Preprocessing,
)
from deepseg_core.model_store import write_model_folder  # noqa: E402
from deepseg_core.nets import build_net, count_parameters  # noqa: E402
from deepseg_core.preprocessing import ct_normalization, intensity_fingerprint, normalize  # noqa: E402
from deepseg_core.training import TrainConfig, TrainingCase, train  # noqa: E402
from deepseg_core.training.engine import DEFAULT_PATCH_3D, default_unet_3d  # noqa: E402

TRAIN_SEEDS = range(100, 116)
VALIDATION_SEEDS = range(900, 904)
CASE_SHAPE = (40, 96, 96)
SPACING = demo.SAMPLE_SPACING_XYZ_MM


def make_cases(seeds: range, profile: str = "ct-A") -> list[phantoms.Phantom]:
    return [phantoms.generate_phantom(seed=s, profile=profile, shape_zyx=CASE_SHAPE, spacing_xyz_mm=SPACING) for s in seeds]


def normalisation_and_fingerprint(cases: list[phantoms.Phantom]) -> tuple[Normalization, dict]:
    foreground = intensity_fingerprint([c.image.array_zyx for c in cases], [c.labels.array_zyx > 0 for c in cases])
    norm = ct_normalization(foreground)
    fingerprint = training_fingerprint(
        [[c.image] for c in cases],
        [c.labels.array_zyx for c in cases],
        "CT",
        ("CT",),
        norm,
        profiles=[c.profile.name for c in cases],
    )
    return norm, fingerprint


def rewrite_fingerprint(folder: Path) -> None:
    card = ModelCard.read(folder / "model.json")
    _, fingerprint = normalisation_and_fingerprint(make_cases(TRAIN_SEEDS))
    card = dataclasses.replace(card, fingerprint=fingerprint)
    with atomic_path(folder / "model.json") as tmp:
        tmp.write_text(json.dumps(card.to_json_dict(), indent=2) + "\n", encoding="utf-8")


def train_phantom_model(
    profile: str,
    name: str,
    description: str,
    *,
    epochs: int = 40,
    steps: int = 25,
    dropout: float = 0.0,
    device: str = "cpu",
    on_event: Callable[[dict], None] | None = None,
) -> tuple[ModelCard, torch.nn.Module]:
    """The default model's recipe on the 16 training phantoms of ``profile``: its card and trained net.

    ``dropout``: probability after every conv (the bundled model: 0; > 0 makes a model for
    Monte-Carlo dropout uncertainty). Deterministic on CPU, so ``profile="ct-A"`` with the
    defaults reproduces the bundled model.
    """
    train_cases = make_cases(TRAIN_SEEDS, profile)
    norm, fingerprint = normalisation_and_fingerprint(train_cases)
    cases = [
        TrainingCase(normalize(c.image.array_zyx, norm)[None], c.labels.array_zyx.astype(np.uint8), name=f"{profile}-{c.seed}")
        for c in train_cases
    ]
    net_config = default_unet_3d(in_channels=1, num_classes=3, dropout=dropout)
    net = build_net("unet", net_config, seed=0)
    train_config = TrainConfig(patch_size_zyx=DEFAULT_PATCH_3D, batch_size=2, epochs=epochs, steps_per_epoch=steps)
    started = time.perf_counter()
    history = train(net, cases, train_config, device=device, on_event=on_event)
    train_seconds = time.perf_counter() - started
    card = ModelCard(
        name=name,
        version=1,
        architecture=Architecture("unet", to_dict(net_config)),
        inputs=Inputs("CT", ("CT",)),
        labels=phantoms.PHANTOM_LABELS,
        preprocessing=Preprocessing(target_spacing_xyz_mm=SPACING, normalization=norm),
        inference=InferenceDefaults(patch_size_zyx=DEFAULT_PATCH_3D, overlap=0.5, batch_size=4),
        weights_sha256="0" * 64,
        description=description,
        fingerprint=fingerprint,
        metrics={
            "training": {
                "epochs": epochs,
                "final_loss": history[-1]["loss"],
                "dropout": dropout,
                "seconds": train_seconds,
                "parameters": count_parameters(net),
            }
        },
    )
    return card, net


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--output", type=Path, default=REPO / "DeepSeg" / "deepseg_core" / "bundled")
    parser.add_argument("--fingerprint-only", action="store_true", help="only recompute the model card's fingerprint")
    args = parser.parse_args()
    if args.fingerprint_only:
        rewrite_fingerprint(args.output / "models" / "phantom-liver")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    card, net = train_phantom_model(
        "ct-A",
        "phantom-liver",
        "Default DeepSeg model: liver and liver lesions on CT phantoms of scanner profile A "
        "(trained by scripts/train_default_model.py). A demonstration model, not for clinical use.",
        epochs=args.epochs,
        steps=args.steps,
        on_event=lambda e: print(json.dumps({k: v for k, v in e.items() if k != "event"})),
    )
    staging = args.output / "models" / ".staging-phantom-liver"
    shutil.rmtree(staging, ignore_errors=True)
    card = write_model_folder(staging, card, net)
    segmenter = Segmenter.load(staging, device="cpu")
    dice: dict[str, list[float]] = {lab.name: [] for lab in card.labels}
    for case in make_cases(VALIDATION_SEEDS):
        result = segmenter.segment([case.image], SegmentOptions())
        for lab in card.labels:
            dice[lab.name].append(metrics.dice(result.labels.array_zyx == lab.value, case.labels.array_zyx == lab.value))
    validation = {name: float(np.mean(v)) for name, v in dice.items()}
    print(json.dumps({"validation_dice": validation}))
    final = args.output / "models" / "phantom-liver"
    shutil.rmtree(final, ignore_errors=True)
    card = dataclasses.replace(
        card, metrics={**card.metrics, "validation": {"dice": validation, "cases": len(VALIDATION_SEEDS), "profile": "ct-A"}}
    )
    write_model_folder(final, card, segmenter.net)
    shutil.rmtree(staging)

    sample = demo.sample_case()
    sample_image = sample.image.with_array(np.round(sample.image.array_zyx).astype(np.int16))
    io.write_image(sample_image, args.output / "sample_ct.nrrd")
    io.write_segmentation(
        args.output / "sample_ct_truth.seg.nrrd", sample.labels, [lab.segment_info() for lab in phantoms.PHANTOM_LABELS]
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
