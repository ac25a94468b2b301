"""Voxel-wise losses: (weighted) cross-entropy and focal loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import masked_mean, prepare


def _class_vector(values: Sequence[float] | None, num_classes: int, name: str, like: torch.Tensor) -> torch.Tensor | None:
    if values is None:
        return None
    vector = torch.as_tensor(list(values), dtype=like.dtype, device=like.device)
    if vector.numel() != num_classes:
        raise ConfigError(
            f"{name} has the wrong length", expected=f"{num_classes} values (one per class)", found=f"{vector.numel()}"
        )
    return vector


class CrossEntropyLoss(nn.Module):
    """Binary or multi-class cross-entropy, optionally class-weighted, mean over valid voxels.

    With ``class_weights`` the mean is the weighted mean ``sum(w_y * ce) / sum(w_y)`` (as
    :func:`torch.nn.functional.cross_entropy`). With one logit channel this is BCE-with-logits.
    """

    def __init__(self, class_weights: Sequence[float] | None = None, ignore_index: int | None = None) -> None:
        super().__init__()
        self.class_weights = tuple(class_weights) if class_weights is not None else None
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        batch = prepare(logits, target, self.ignore_index)
        weight = _class_vector(self.class_weights, batch.num_classes, "class_weights", batch.logits)
        target_or_ignored = torch.where(batch.valid, batch.target, torch.full_like(batch.target, -100))
        if not bool(batch.valid.any()):
            return batch.logits.sum() * 0.0
        return F.cross_entropy(batch.logits, target_or_ignored, weight=weight, ignore_index=-100)


def weighted_cross_entropy(class_weights: Sequence[float], ignore_index: int | None = None) -> CrossEntropyLoss:
    """Cross-entropy with explicit per-class weights (e.g. inverse class frequency)."""
    if not class_weights:
        raise ConfigError("weighted CE needs class_weights", expected="one weight per class", found="none")
    return CrossEntropyLoss(class_weights=class_weights, ignore_index=ignore_index)


class FocalLoss(nn.Module):
    """Focal loss (Lin et al. 2017): ``-alpha_t (1 - p_t)^gamma log p_t``, mean over valid voxels.

    Args:
        gamma: focusing parameter; 0 gives plain cross-entropy.
        alpha: None (no weighting); a float ``a`` (foreground classes weighted ``a``, background
            ``1 - a``, as in the paper's binary form); or one weight per class.
        ignore_index: target value to skip.
    """

    def __init__(self, gamma: float = 2.0, alpha: float | Sequence[float] | None = None, ignore_index: int | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise ConfigError("focal gamma must be >= 0", found=str(gamma))
        self.gamma = float(gamma)
        self.alpha = alpha if alpha is None or isinstance(alpha, float | int) else tuple(alpha)
        self.ignore_index = ignore_index

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        batch = prepare(logits, target, self.ignore_index)
        log_p = F.log_softmax(batch.logits, dim=1)
        log_p_t = log_p.gather(1, batch.target.unsqueeze(1)).squeeze(1)
        p_t = log_p_t.exp()
        loss = -((1.0 - p_t).clamp_min(0.0) ** self.gamma) * log_p_t
        if self.alpha is not None:
            if isinstance(self.alpha, float | int):
                alpha = torch.full((batch.num_classes,), float(self.alpha), dtype=loss.dtype, device=loss.device)
                alpha[0] = 1.0 - float(self.alpha)
            else:
                alpha = _class_vector(self.alpha, batch.num_classes, "alpha", loss)
            loss = alpha[batch.target] * loss  # type: ignore[index]
        return masked_mean(loss, batch.valid)
