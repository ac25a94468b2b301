"""Segmentation losses and the explicit registry ``build_loss(name, **cfg)``.

All losses take logits ``(B, C, *spatial)`` and integer targets ``(B, *spatial)``; see
:mod:`deepseg_core.losses.base`. Compound names (``dice_ce``, ...) accept ``weights`` (one per
term), a shared ``ignore_index``, and one dict of options per term named after it, e.g.
``build_loss("dice_ce", weights=(1, 1), dice={"reduction": "sample"}, ce={"class_weights": [1, 5]})``.

:class:`RegionDiceBCELoss` (nnU-Net's loss for region-based models: sigmoid channels, one per region)
is not in the registry: it needs the model's regions, and training picks it for such models.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from torch import nn

from ..errors import ConfigError
from .boundary import BoundaryLoss, signed_distance_map
from .compound import CompoundLoss, DeepSupervisionLoss
from .region import SoftDiceLoss, TverskyLoss, soft_confusion
from .sigmoid_regions import RegionDiceBCELoss
from .voxelwise import CrossEntropyLoss, FocalLoss, weighted_cross_entropy

#: Single losses: name -> factory.
SINGLE_LOSSES: dict[str, Callable[..., nn.Module]] = {
    "ce": CrossEntropyLoss,
    "wce": weighted_cross_entropy,
    "focal": FocalLoss,
    "dice": SoftDiceLoss,
    "tversky": TverskyLoss,
    "boundary": BoundaryLoss,
}

#: Compound losses: name -> the single losses they sum (equal weights unless ``weights`` is given).
COMPOUND_LOSSES: dict[str, tuple[str, ...]] = {
    "dice_ce": ("dice", "ce"),
    "dice_wce": ("dice", "wce"),
    "dice_focal": ("dice", "focal"),
    "tversky_focal": ("tversky", "focal"),
    "dice_boundary": ("dice", "boundary"),
}

#: The default training loss.
DEFAULT_LOSS = "dice_ce"


def loss_names() -> list[str]:
    """All names ``build_loss`` accepts."""
    return sorted([*SINGLE_LOSSES, *COMPOUND_LOSSES])


def _call(name: str, factory: Callable[..., nn.Module], options: dict[str, Any]) -> nn.Module:
    accepted = [p for p in inspect.signature(factory).parameters if p != "self"]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for loss {name!r}", expected=f"some of {accepted}", found=str(unknown))
    return factory(**options)


def build_loss(name: str, **cfg: Any) -> nn.Module:
    """Build loss ``name`` (see :func:`loss_names`); the error lists the valid names and options."""
    if name in SINGLE_LOSSES:
        return _call(name, SINGLE_LOSSES[name], cfg)
    if name not in COMPOUND_LOSSES:
        raise ConfigError(f"unknown loss {name!r}", expected=f"one of {loss_names()}", found=name)
    parts = COMPOUND_LOSSES[name]
    options = dict(cfg)
    weights = tuple(options.pop("weights", (1.0,) * len(parts)))
    ignore_index = options.pop("ignore_index", None)
    unknown = sorted(set(options) - set(parts))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {unknown} for loss {name!r}",
            expected=f"'weights', 'ignore_index' or a dict per term {list(parts)}",
            found=str(unknown),
        )
    if len(weights) != len(parts):
        raise ConfigError(f"loss {name!r} needs one weight per term {list(parts)}", found=str(weights))
    terms = []
    for part, weight in zip(parts, weights, strict=True):
        part_options = dict(options.get(part, {}))
        if ignore_index is not None:
            part_options.setdefault("ignore_index", ignore_index)
        terms.append((part, weight, _call(part, SINGLE_LOSSES[part], part_options)))
    return CompoundLoss(terms)


__all__ = [
    "COMPOUND_LOSSES",
    "DEFAULT_LOSS",
    "RegionDiceBCELoss",
    "SINGLE_LOSSES",
    "BoundaryLoss",
    "CompoundLoss",
    "CrossEntropyLoss",
    "DeepSupervisionLoss",
    "FocalLoss",
    "SoftDiceLoss",
    "TverskyLoss",
    "build_loss",
    "loss_names",
    "signed_distance_map",
    "soft_confusion",
    "weighted_cross_entropy",
]
