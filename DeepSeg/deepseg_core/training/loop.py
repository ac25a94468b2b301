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


def network_batch(
    images: np.ndarray, labels: np.ndarray, spatial_dims: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampler output as network input and target.

    Args:
        images: patches ``(B, C, Z, Y, X)``; for 2D / 2.5D nets ``Z = k`` context slices.
        labels: ``(B, Z, Y, X)``.
        spatial_dims: 3, or 2 for 2D / 2.5D nets.
        device: where the tensors go.

    Returns:
        3D: the tensors as they are. 2D: input ``(B, k * C, Y, X)`` with channel ``j * C + c`` for
        modality ``c`` at slice ``j`` (the order of ``stack_neighbour_slices``), and the centre
        slice's labels ``(B, Y, X)``.
    """
    x, y = torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device)
    if spatial_dims == 2:
        x = x.permute(0, 2, 1, 3, 4).reshape(x.shape[0], -1, x.shape[-2], x.shape[-1])
        y = y[:, y.shape[1] // 2]
    return x, y


def optimisation_step(
    model: nn.Module,
    net: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: nn.Module,
    optimiser: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
) -> float:
    """One step: forward (float16 autocast when ``scaler`` is enabled), backward, clip, step, and the
    learning-rate schedule's step unless the scaler skipped the optimiser's (overflowed gradients).

    ``model`` is what runs forward (``net`` itself, or its DistributedDataParallel wrapper);
    gradients of ``net``'s parameters are clipped to norm 12. Returns the loss.
    """
    optimiser.zero_grad(set_to_none=True)
    with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=scaler.is_enabled()):
        loss = loss_fn(model(x), y)
    scaler.scale(loss).backward()
    scaler.unscale_(optimiser)
    torch.nn.utils.clip_grad_norm_(net.parameters(), 12.0)
    scale_before = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimiser)
    scaler.update()
    # GradScaler skips the optimiser step when the float16 gradients overflowed, and lowers its
    # scale; the learning-rate schedule waits as well, so it counts only the steps really taken.
    if scale_before is None or scaler.get_scale() >= scale_before:
        schedule.step()
    return float(loss.detach())


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
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    history: list[dict[str, Any]] = []
    started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        net.train()
        losses = []
        epoch_start = time.perf_counter()
        for _ in range(config.steps_per_epoch):
            x, y = network_batch(*sampler.batch(rng, config.batch_size), spatial_dims, device)
            losses.append(optimisation_step(net, net, x, y, loss_fn, optimiser, schedule, scaler))
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
