"""Weighted sums of losses and deep-supervision wrapping."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


class CompoundLoss(nn.Module):
    """``sum_i w_i * loss_i``. After each call ``last_terms`` holds each term's (unweighted) value."""

    def __init__(self, terms: Sequence[tuple[str, float, nn.Module]]) -> None:
        super().__init__()
        if not terms:
            raise ConfigError("a compound loss needs at least one term")
        self.names = [name for name, _, _ in terms]
        self.weights = [float(weight) for _, weight, _ in terms]
        self.terms = nn.ModuleList([loss for _, _, loss in terms])
        self.last_terms: dict[str, float] = {}

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        total = logits.new_zeros(())
        for name, weight, loss in zip(self.names, self.weights, self.terms, strict=True):
            value = loss(logits, target)
            self.last_terms[name] = float(value.detach())
            total = total + weight * value
        return total


class DeepSupervisionLoss(nn.Module):
    """Apply ``loss`` to every output of a deep-supervised net against a down-sampled target.

    Outputs come finest first (as :class:`~deepseg_core.nets.UNet` returns them). Weights default to
    ``1, 1/2, 1/4, ...`` normalised to sum 1 (nnU-Net's scheme). Targets are down-sampled by
    nearest neighbour, so label values (and the ignore value) survive.
    """

    def __init__(self, loss: nn.Module, weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.loss = loss
        self.weights = tuple(weights) if weights is not None else None

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        weights = self.weights or tuple(0.5**i for i in range(len(outputs)))
        if len(weights) != len(outputs):
            raise ConfigError(
                "deep supervision weights do not match the outputs", expected=str(len(outputs)), found=str(len(weights))
            )
        norm = sum(weights)
        target_c = target if target.ndim == outputs[0].ndim else target.unsqueeze(1)
        total = outputs[0].new_zeros(())
        for weight, out in zip(weights, outputs, strict=True):
            if weight == 0:
                continue
            scaled = (
                target_c
                if out.shape[2:] == target_c.shape[2:]
                else (F.interpolate(target_c.float(), size=out.shape[2:], mode="nearest").to(target.dtype))
            )
            total = total + (weight / norm) * self.loss(out, scaled)
        return total
