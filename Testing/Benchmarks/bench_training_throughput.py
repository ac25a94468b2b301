"""Training throughput (patches/s): DeepSeg's training step against a plain MONAI training loop.

    python Testing/Benchmarks/bench_training_throughput.py [--json] [--steps 30] [--device cpu]

Same network (DeepSeg's 3D U-Net 12-24-48-96 of the bundled model, deep supervision off so MONAI's
loss takes its output), same patch (32x64x64), batch 2, same loss family (Dice + cross-entropy:
DeepSeg's ``dice_ce`` and MONAI's ``DiceCELoss``), AdamW, on 5 normalised ct-B phantoms.

- ``deepseg``: PatchSampler (foreground oversampling) + the retraining augmentation
  (:class:`AugmentConfig` defaults) + ``training.loop.optimisation_step``.
- ``deepseg-light``: the same without augmentation (flips only).
- ``monai``: ``RandCropByPosNegLabeld`` + ``RandFlipd`` + rotation/zoom, contrast, noise, blur and
  bias-field transforms with the same probabilities, ``DataLoader(num_workers=0)``, ``DiceCELoss``.
- ``monai-light``: ``RandCropByPosNegLabeld`` + ``RandFlipd`` only.

Each variant runs ``--warmup`` steps, then ``--steps`` timed steps; best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DeepSeg"))

from deepseg_core.openmp_waits import shorten_openmp_spinning

# as DeepSeg's engine processes do, before torch loads OpenMP; MONAI's loop runs in this process too, under the same setting
shorten_openmp_spinning()

import numpy as np
import torch

from deepseg_core.demo import DEFAULT_MODEL, SAMPLE_SPACING_XYZ_MM
from deepseg_core.losses import build_loss
from deepseg_core.model_card import ModelCard
from deepseg_core.nets import build_net
from deepseg_core.phantoms import generate_phantom
from deepseg_core.preprocessing import normalize
from deepseg_core.training import AugmentConfig
from deepseg_core.training.engine import default_unet_3d
from deepseg_core.training.loop import network_batch, optimisation_step
from deepseg_core.training.patches import PatchSampler, TrainingCase

PATCH = (32, 64, 64)
BATCH = 2
FLIPS_ONLY = dataclasses.replace(AugmentConfig.none(), flip_axes=(1, 2))
Step = Callable[[], None]


def cases() -> list[TrainingCase]:
    norm = ModelCard.read(DEFAULT_MODEL / "model.json").preprocessing.normalization
    out = []
    for seed in range(600, 605):
        p = generate_phantom(seed=seed, profile="ct-B", shape_zyx=(40, 96, 96), spacing_xyz_mm=SAMPLE_SPACING_XYZ_MM)
        out.append(TrainingCase(normalize(p.image.array_zyx, norm)[None], p.labels.array_zyx.astype(np.uint8), name=str(seed)))
    return out


def network() -> torch.nn.Module:
    return build_net("unet", default_unet_3d(in_channels=1, num_classes=3, deep_supervision=False), seed=0)


def deepseg_steps(data: list[TrainingCase], augment: AugmentConfig, device: torch.device) -> Step:
    net = network().to(device).train()
    sampler = PatchSampler(data, PATCH, foreground_fraction=0.6, augment=augment)
    loss_fn = build_loss("dice_ce")
    optimiser = torch.optim.AdamW(net.parameters(), lr=5e-4)
    schedule = torch.optim.lr_scheduler.ConstantLR(optimiser, factor=1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    rng = np.random.default_rng(0)

    def step() -> None:
        x, y = network_batch(*sampler.batch(rng, BATCH), 3, device)
        optimisation_step(net, net, x, y, loss_fn, optimiser, schedule, scaler)

    return step


def monai_steps(data: list[TrainingCase], heavy: bool, device: torch.device) -> Step:
    from monai import transforms as mt
    from monai.data import DataLoader, Dataset
    from monai.losses import DiceCELoss

    keys = ["image", "label"]
    chain = [
        mt.RandCropByPosNegLabeld(keys, "label", spatial_size=PATCH, pos=0.6, neg=0.4, num_samples=BATCH),
        mt.RandFlipd(keys, prob=0.5, spatial_axis=1),
        mt.RandFlipd(keys, prob=0.5, spatial_axis=2),
    ]
    if heavy:
        chain += [
            mt.RandAffined(
                keys, prob=0.2, rotate_range=(np.deg2rad(15), 0, 0), scale_range=(0.15, 0.15, 0), mode=("bilinear", "nearest")
            ),
            mt.RandScaleIntensityd("image", factors=0.25, prob=0.3),
            mt.RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.3),
            mt.RandGaussianNoised("image", std=0.1, prob=0.2),
            mt.RandGaussianSmoothd("image", sigma_x=(0.5, 1.0), sigma_y=(0.5, 1.0), sigma_z=(0.0, 0.0), prob=0.2),
            mt.RandBiasFieldd("image", coeff_range=(0.0, 0.3), prob=0.2),
        ]
    items = [{"image": c.image_czyx, "label": c.labels_zyx[None].astype(np.float32)} for c in data]
    dataset = Dataset(items, transform=mt.Compose(chain))
    loader = DataLoader(dataset, batch_size=1, shuffle=True, num_workers=0)
    net = network().to(device).train()
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimiser = torch.optim.AdamW(net.parameters(), lr=5e-4)
    iterator = iter(loader)

    def step() -> None:
        nonlocal iterator
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(loader)
            batch = next(iterator)
        x, y = batch["image"].as_tensor().to(device), batch["label"].as_tensor().to(device)
        optimiser.zero_grad(set_to_none=True)
        loss = loss_fn(net(x), y)
        loss.backward()
        optimiser.step()

    return step


def measure(step: Step, warmup: int, steps: int, repeats: int) -> float:
    for _ in range(warmup):
        step()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, time.perf_counter() - started)
    return steps * BATCH / best


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    data = cases()
    variants = {
        "deepseg": lambda: deepseg_steps(data, AugmentConfig(), device),
        "deepseg-light": lambda: deepseg_steps(data, FLIPS_ONLY, device),
        "monai": lambda: monai_steps(data, True, device),
        "monai-light": lambda: monai_steps(data, False, device),
    }
    results = {}
    for name, make in variants.items():
        torch.manual_seed(0)
        results[name] = measure(make(), args.warmup, args.steps, args.repeats)
        print(json.dumps({"event": "variant_done", "variant": name, "patches_per_s": results[name]}), file=sys.stderr, flush=True)
    ratios = {
        "deepseg / monai": results["deepseg"] / results["monai"],
        "light": results["deepseg-light"] / results["monai-light"],
    }
    if args.json:
        print(
            json.dumps(
                {"patch": PATCH, "batch": BATCH, "threads": torch.get_num_threads(), "patches_per_s": results, "ratios": ratios}
            )
        )
        return 0
    for name, value in results.items():
        print(f"{name:<15}{value:>8.2f} patches/s")
    for name, value in ratios.items():
        print(f"ratio {name}: {value:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
