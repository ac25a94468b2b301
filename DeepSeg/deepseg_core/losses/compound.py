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


#: How targets are down-sampled to a lower-resolution output: torch's ``nearest`` takes fine voxel
#: ``floor(i s)`` for coarse voxel ``i`` (scale ``s``); ``nearest-exact`` takes ``floor((i + 0.5) s)``, as
#: nnU-Net's ``DownsampleSegForDSTransform`` does.
TARGET_SAMPLINGS = ("nearest", "nearest-exact")


class DeepSupervisionLoss(nn.Module):
    """Apply ``loss`` to every output of a deep-supervised net against a down-sampled target.

    Outputs come finest first (as DeepSeg's nets return them). Weights default to ``1, 1/2, 1/4, ...``
    normalised to sum 1; ``drop_lowest`` weighs the lowest-resolution output 0 before normalising
    (nnU-Net's trainer does). Targets are down-sampled by nearest neighbour (``target_sampling``, one of
    :data:`TARGET_SAMPLINGS`), so label values (and the ignore value) survive.

    An output of weight 0 adds ``0 * sum(output)``: its head gets a zero gradient rather than none, so
    DistributedDataParallel finds every parameter used (nnU-Net weighs it 1e-6 under DDP instead). That
    term is 0 also where the output is not finite (a float16 overflow in the head nnU-Net leaves out),
    so it never turns the loss into NaN.
    """

    def __init__(
        self,
        loss: nn.Module,
        weights: Sequence[float] | None = None,
        *,
        drop_lowest: bool = False,
        target_sampling: str = "nearest",
    ) -> None:
        super().__init__()
        if target_sampling not in TARGET_SAMPLINGS:
            raise ConfigError(
                "invalid deep supervision target sampling", expected=f"one of {TARGET_SAMPLINGS}", found=repr(target_sampling)
            )
        self.loss = loss
        self.weights = tuple(weights) if weights is not None else None
        self.drop_lowest = drop_lowest
        self.target_sampling = target_sampling

    def output_weights(self, outputs: int) -> tuple[float, ...]:
        """The normalised weight of each of ``outputs`` outputs, finest first."""
        weights = list(self.weights or tuple(0.5**i for i in range(outputs)))
        if len(weights) != outputs:
            raise ConfigError("deep supervision weights do not match the outputs", expected=str(outputs), found=str(len(weights)))
        if self.drop_lowest and outputs > 1:
            weights[-1] = 0.0
        norm = sum(weights)
        if norm <= 0:
            raise ConfigError("deep supervision needs a positive weight", found=str(weights))
        return tuple(w / norm for w in weights)

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        weights = self.output_weights(len(outputs))
        target_c = target if target.ndim == outputs[0].ndim else target.unsqueeze(1)
        total = outputs[0].new_zeros(())
        for weight, out in zip(weights, outputs, strict=True):
            if weight == 0:
                # 0 * inf is NaN, which would make the optimiser (or AMP's scaler) skip a good step;
                # nan_to_num passes no gradient where its input was not finite, so every gradient is 0
                total = total + torch.nan_to_num(0.0 * out.sum(), nan=0.0, posinf=0.0, neginf=0.0)
                continue
            scaled = (
                target_c
                if out.shape[2:] == target_c.shape[2:]
                else F.interpolate(target_c.float(), size=out.shape[2:], mode=self.target_sampling).to(target.dtype)
            )
            total = total + weight * self.loss(out, scaled)
        return total
