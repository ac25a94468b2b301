"""The optimisation loop: patches -> network -> loss -> AdamW, with per-epoch events.

Deterministic under ``TrainConfig.seed`` on CPU (patch sampling, initial weights, dropout).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ..losses import DeepSupervisionLoss, build_loss
from .patches import PatchSampler, TrainingCase

log = logging.getLogger(__name__)
EventCallback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings.

    Attributes:
        patch_size_zyx: training patch size.
        batch_size: patches per step.
        epochs: number of epochs; ``steps_per_epoch`` optimiser steps each.
        learning_rate: AdamW learning rate (cosine-decayed to 5% over the run).
        weight_decay: AdamW weight decay.
        loss: registry name (see :func:`deepseg_core.losses.build_loss`).
        loss_options: keyword options for the loss.
        foreground_fraction: share of patches centred on foreground.
        seed: seed for weights, sampling and augmentation.
    """

    patch_size_zyx: tuple[int, int, int] = (32, 64, 64)
    batch_size: int = 2
    epochs: int = 10
    steps_per_epoch: int = 25
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    loss: str = "dice_ce"
    loss_options: dict[str, Any] = field(default_factory=dict)
    foreground_fraction: float = 0.6
    seed: int = 0


def train(
    net: nn.Module,
    cases: list[TrainingCase],
    config: TrainConfig,
    *,
    device: str | torch.device = "cpu",
    on_event: EventCallback | None = None,
    validate: Callable[[nn.Module, int], dict[str, float]] | None = None,
) -> list[dict[str, Any]]:
    """Train ``net`` in place; returns one record per epoch (mean loss, seconds, validation).

    Args:
        net: the network (its ``config.deep_supervision`` decides whether outputs are a list).
        cases: normalised training cases.
        config: optimisation settings.
        device: where to train.
        on_event: receives ``{"event": "epoch_end", ...}`` dicts.
        validate: optional ``(net, epoch) -> metrics`` called after each epoch (net in eval mode).
    """
    device = torch.device(device)
    rng = np.random.default_rng(config.seed)
    torch.manual_seed(config.seed)
    sampler = PatchSampler(cases, config.patch_size_zyx, foreground_fraction=config.foreground_fraction)
    loss_fn = DeepSupervisionLoss(build_loss(config.loss, **config.loss_options))
    net.to(device)
    optimiser = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    total_steps = config.epochs * config.steps_per_epoch
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimiser, T_max=max(total_steps, 1), eta_min=0.05 * config.learning_rate
    )
    spatial_dims = getattr(getattr(net, "config", None), "spatial_dims", 3)
    history: list[dict[str, Any]] = []
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        net.train()
        losses = []
        epoch_start = time.perf_counter()
        for _ in range(config.steps_per_epoch):
            images, labels = sampler.batch(rng, config.batch_size)
            x = torch.from_numpy(images).to(device)
            y = torch.from_numpy(labels).to(device)
            if spatial_dims == 2:
                x, y = x[:, :, 0], y[:, 0]
            optimiser.zero_grad(set_to_none=True)
            loss = loss_fn(net(x), y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
            optimiser.step()
            schedule.step()
            losses.append(float(loss.detach()))
        record: dict[str, Any] = {
            "event": "epoch_end",
            "epoch": epoch,
            "epochs": config.epochs,
            "loss": float(np.mean(losses)),
            "seconds": time.perf_counter() - epoch_start,
            "patches_per_s": config.steps_per_epoch * config.batch_size / max(time.perf_counter() - epoch_start, 1e-9),
        }
        if validate is not None:
            net.eval()
            record["validation"] = validate(net, epoch)
        elapsed = time.perf_counter() - started
        record["eta_s"] = elapsed / epoch * (config.epochs - epoch)
        history.append(record)
        log.info("epoch %d/%d loss %.4f", epoch, config.epochs, record["loss"])
        if on_event is not None:
            on_event(record)
    net.eval()
    return history
