"""An nnU-Net checkpoint's ``network_weights`` reduced to the canonical keys of DeepSeg's rebuild.

nnU-Net's networks reach every conv and norm through more than one path, so their state dicts name
each tensor up to three times (``*.all_modules.{i}.*``, ``decoder.encoder.*``); DeepSeg's modules
register each once. The aliases are dropped only after each was checked equal to its canonical tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import ConfigError


def _alias_target(key: str) -> str | None:
    """The canonical key an nnU-Net alias key stands for, or None when ``key`` is no alias."""
    canonical = key
    if canonical.startswith("decoder.encoder."):
        canonical = canonical[len("decoder.") :]
    parts = canonical.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "all_modules" and parts[i + 1].isdigit():
            # all_modules = Sequential(conv, [dropout], norm, nonlin): index 0 is the conv; dropout and
            # the non-linearity hold no tensors, so any tensor at a later index is the norm's
            parts[i : i + 2] = ["conv" if parts[i + 1] == "0" else "norm"]
            canonical = ".".join(parts)
            break
    return canonical if canonical != key else None


def canonical_state_dict(
    weights: dict[str, torch.Tensor], net: nn.Module, what: str = "the checkpoint"
) -> dict[str, torch.Tensor]:
    """``weights`` (an nnU-Net ``network_weights`` dict) reduced to ``net``'s keys, aliases checked.

    Every key that ``net`` lacks must be an alias (``*.all_modules.*``, ``decoder.encoder.*``) of a
    key it has, holding an equal tensor; every key ``net`` has must be present with its shape.

    Raises:
        ConfigError: naming the missing, unexpected, mis-shaped or unequal tensors.
    """
    expected = net.state_dict()
    out: dict[str, torch.Tensor] = {}
    unexpected, unequal = [], []
    for key, value in weights.items():
        if key in expected:
            out[key] = value
            continue
        target = _alias_target(key)
        if target is None or target not in expected or target not in weights:
            unexpected.append(key)
        elif weights[target].shape != value.shape or not torch.equal(weights[target], value):
            unequal.append(key)
    missing = sorted(set(expected) - set(out))
    mismatched = sorted(k for k in out if out[k].shape != expected[k].shape)
    if missing or unexpected or mismatched or unequal:
        raise ConfigError(
            f"the network weights in {what} do not fit the architecture built from the plans",
            expected=f"{len(expected)} tensors named as dynamic_network_architectures names them (plus equal aliases)",
            found=f"missing {missing[:3]}, unexpected {sorted(unexpected)[:3]}, wrong shape "
            f"{[(k, tuple(out[k].shape), tuple(expected[k].shape)) for k in mismatched[:3]]}, aliases that differ {unequal[:3]}",
            hint="The trainer may build another network than the plans say; such trainers are not supported yet.",
        )
    return out
