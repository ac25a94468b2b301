"""Overlap losses: soft Dice and Tversky, on softmax probabilities.

Both are built from soft confusion counts per class: ``TP = sum(p g)``, ``FP = sum(p (1 - g))``,
``FN = sum((1 - p) g)`` over valid voxels. With a hard (0/1) prediction these are the true
counts, so soft Dice equals the F1 score.

* Dice index: ``(2 TP + s) / (2 TP + FP + FN + s)``
* Tversky index: ``(TP + s) / (TP + alpha FP + beta FN + s)``; with alpha = beta = 0.5 and
  smoothing ``s / 2`` it is exactly the Dice index with smoothing ``s``.

``reduction="batch"`` sums counts over the whole batch before the ratio (stable for rare
foreground, nnU-Net's default); ``"sample"`` computes one index per sample and averages. With
``across_ranks``, batch counts are summed over the ranks of a DDP run too (the global batch, as
nnU-Net's trainer counts under DDP).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ConfigError
from .base import PreparedBatch, prepare, sum_over_ranks

REDUCTIONS = ("batch", "sample")


def soft_confusion(batch: PreparedBatch, reduction: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Soft TP, FP, FN of shape ``(C,)`` (batch) or ``(B, C)`` (sample)."""
    probs = torch.softmax(batch.logits, dim=1)
    hot = batch.one_hot()
    valid = batch.valid.unsqueeze(1).to(probs.dtype)
    probs = probs * valid
    spatial = tuple(range(2, probs.ndim))
    axes = (0, *spatial) if reduction == "batch" else spatial
    tp = (probs * hot).sum(axes)
    fp = (probs * (1.0 - hot) * valid).sum(axes)
    fn = ((1.0 - probs) * hot).sum(axes)
    return tp, fp, fn


class _OverlapLoss(nn.Module):
    def __init__(
        self, include_background: bool, reduction: str, smooth: float, ignore_index: int | None, across_ranks: bool
    ) -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ConfigError("invalid reduction", expected=f"one of {REDUCTIONS}", found=repr(reduction))
        if smooth < 0:
            raise ConfigError("smoothing must be >= 0", found=str(smooth))
        self.include_background = include_background
        self.reduction = reduction
        self.smooth = float(smooth)
        self.ignore_index = ignore_index
        self.across_ranks = across_ranks

    def index(self, tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def per_class_index(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The overlap index per class, ``(C,)`` or ``(B, C)``, background included."""
        counts = soft_confusion(prepare(logits, target, self.ignore_index), self.reduction)
        if self.across_ranks and self.reduction == "batch":
            counts = sum_over_ranks(*counts)
        return self.index(*counts)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        index = self.per_class_index(logits, target)
        if not self.include_background:
            index = index[..., 1:]
        return 1.0 - index.mean()


class SoftDiceLoss(_OverlapLoss):
    """``1 - mean soft Dice`` over classes (background excluded unless asked).

    Args:
        include_background: average class 0 too.
        reduction: ``"batch"`` or ``"sample"`` (see module docstring).
        smooth: additive smoothing ``s`` (keeps empty classes at index 1, avoids 0/0).
        ignore_index: target value whose voxels are skipped.
        across_ranks: with ``reduction="batch"`` in a DDP run, count the batches of all ranks.
    """

    def __init__(
        self,
        include_background: bool = False,
        reduction: str = "batch",
        smooth: float = 1e-5,
        ignore_index: int | None = None,
        across_ranks: bool = False,
    ) -> None:
        super().__init__(include_background, reduction, smooth, ignore_index, across_ranks)

    def index(self, tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
        return (2.0 * tp + self.smooth) / (2.0 * tp + fp + fn + self.smooth)


class TverskyLoss(_OverlapLoss):
    """``1 - mean Tversky index``; ``alpha`` weighs false positives, ``beta`` false negatives.

    ``beta > alpha`` favours recall (fewer missed lesions).
    """

    def __init__(
        self,
        alpha: float = 0.3,
        beta: float = 0.7,
        include_background: bool = False,
        reduction: str = "batch",
        smooth: float = 1e-5,
        ignore_index: int | None = None,
        across_ranks: bool = False,
    ) -> None:
        super().__init__(include_background, reduction, smooth, ignore_index, across_ranks)
        if alpha < 0 or beta < 0:
            raise ConfigError("Tversky alpha and beta must be >= 0", found=f"alpha={alpha}, beta={beta}")
        self.alpha = float(alpha)
        self.beta = float(beta)

    def index(self, tp: torch.Tensor, fp: torch.Tensor, fn: torch.Tensor) -> torch.Tensor:
        return (tp + self.smooth) / (tp + self.alpha * fp + self.beta * fn + self.smooth)
