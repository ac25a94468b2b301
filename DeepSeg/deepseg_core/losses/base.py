"""Shared input handling for all losses.

Every loss takes ``logits`` of shape ``(B, C, *spatial)`` and an integer ``target`` of shape
``(B, *spatial)`` or ``(B, 1, *spatial)`` with values in ``[0, C)`` (or the ignore value).
``C == 1`` means a binary problem with one sigmoid logit; it is handled as two-class logits
``[0, x]``, whose softmax is exactly ``[1 - sigmoid(x), sigmoid(x)]``, so binary and multi-class
share one code path and binary CE is exactly BCE-with-logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ShapeError


@dataclass
class PreparedBatch:
    """Normalised loss inputs.

    Attributes:
        logits: ``(B, C, *spatial)`` with ``C >= 2``.
        target: ``(B, *spatial)`` int64, ignored voxels replaced by 0.
        valid: ``(B, *spatial)`` bool, False where the target holds the ignore value.
    """

    logits: torch.Tensor
    target: torch.Tensor
    valid: torch.Tensor

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[1])

    def one_hot(self) -> torch.Tensor:
        """``(B, C, *spatial)`` float one-hot of the target (zero at ignored voxels)."""
        hot = F.one_hot(self.target, self.num_classes).movedim(-1, 1).to(self.logits.dtype)
        return hot * self.valid.unsqueeze(1).to(hot.dtype)


def prepare(logits: torch.Tensor, target: torch.Tensor, ignore_index: int | None) -> PreparedBatch:
    """Validate and normalise ``logits`` / ``target`` (see module docstring)."""
    if logits.ndim < 3:
        raise ShapeError("loss input has too few axes", expected="logits (B, C, *spatial)", found=str(tuple(logits.shape)))
    if target.ndim == logits.ndim and target.shape[1] == 1:
        target = target[:, 0]
    if tuple(target.shape) != (logits.shape[0], *logits.shape[2:]):
        raise ShapeError(
            "target shape does not match the logits",
            expected=f"{(logits.shape[0], *logits.shape[2:])} (or with a channel axis of 1)",
            found=str(tuple(target.shape)),
        )
    if target.is_floating_point():
        raise ShapeError("target must hold integer class indices", expected="an integer tensor", found=str(target.dtype))
    if logits.shape[1] == 1:
        logits = torch.cat([torch.zeros_like(logits), logits], dim=1)
    target = target.long()
    valid = target != ignore_index if ignore_index is not None else torch.ones_like(target, dtype=torch.bool)
    clean = torch.where(valid, target, torch.zeros_like(target))
    num_classes = logits.shape[1]
    if clean.numel() and (int(clean.min()) < 0 or int(clean.max()) >= num_classes):
        raise ShapeError(
            "target holds label values the network does not predict",
            expected=f"values in [0, {num_classes - 1}]"
            + (f" or the ignore value {ignore_index}" if ignore_index is not None else ""),
            found=f"values in [{int(clean.min())}, {int(clean.max())}]",
            hint="Check the dataset's label schema against the model's classes.",
        )
    return PreparedBatch(logits=logits, target=clean, valid=valid)


def masked_mean(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over valid voxels (0 when none is valid, keeping the graph)."""
    weights = valid.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp_min(1.0)


class _SumOverRanks(torch.autograd.Function):
    """All-reduce (sum) whose gradient is the all-reduced gradient: every rank's loss reads the sum, so
    a rank's own counts get the gradient of every rank's loss (nnU-Net's ``AllGatherGrad`` then a sum)."""

    @staticmethod
    def forward(ctx: object, counts: torch.Tensor) -> torch.Tensor:
        total = counts.clone()
        torch.distributed.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        torch.distributed.all_reduce(grad)
        return grad


def sum_over_ranks(*counts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each of ``counts`` (same shape, e.g. per-class TP, FP, FN ``(C,)``) summed over the ranks of a
    started ``torch.distributed`` process group, with gradients; unchanged without one.

    Batch Dice under DDP counts the whole global batch, as nnU-Net's trainer does: every rank computes
    the same Dice, and after DDP averages the parameters' gradients over the ranks they are the
    gradient of that one Dice. Every rank must call this equally often (each training step does)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()) or torch.distributed.get_world_size() == 1:
        return counts
    return tuple(_SumOverRanks.apply(torch.stack(counts)).unbind(0))
