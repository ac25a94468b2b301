"""Network registry: ``build_net(name, config)`` rebuilds any DeepSeg network from plain data."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import from_dict
from ..errors import ConfigError
from .monai_network import MonaiNetConfig, MonaiNetwork
from .nnunet import NnUNetPlainConfig, NnUNetPlainUNet, NnUNetResEncConfig, NnUNetResEncUNet
from .unet import UNet, UNetConfig, pad_to_divisor, unet_config

#: name -> (config class, network class). Model cards store the name and the config dict.
NET_REGISTRY: dict[str, tuple[type, type[nn.Module]]] = {
    "unet": (UNetConfig, UNet),
    # nnU-Net v2's networks, rebuilt from the plans by the nnU-Net importer (deepseg_core.importers.nnunet)
    "nnunet_plain_unet": (NnUNetPlainConfig, NnUNetPlainUNet),
    "nnunet_resenc_unet": (NnUNetResEncConfig, NnUNetResEncUNet),
    # a MONAI bundle's network_def, rebuilt by MONAI's ConfigParser (deepseg_core.importers.monai_bundle)
    "monai_network": (MonaiNetConfig, MonaiNetwork),
}


def build_net(name: str, config: dict[str, Any] | UNetConfig, seed: int | None = None) -> nn.Module:
    """Build network ``name`` from its config (dataclass or dict as stored in a model card).

    Args:
        name: registry name; the error lists the valid ones.
        config: the architecture config.
        seed: when given, weights are initialised from this seed without disturbing the global
            random state, so two builds with one seed are identical.
    """
    cfg = architecture_config(name, config)
    net_cls = NET_REGISTRY[name][1]
    if seed is None:
        return net_cls(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return net_cls(cfg)


def architecture_config(name: str, config: dict[str, Any] | UNetConfig) -> Any:
    """Network ``name``'s config dataclass made from ``config``: what :func:`build_net` checks before it builds
    anything (no module is made, no optional package imported). Raises ConfigError for an unknown ``name``."""
    try:
        config_cls = NET_REGISTRY[name][0]
    except KeyError:
        raise ConfigError(
            f"unknown network architecture {name!r}", expected=f"one of {sorted(NET_REGISTRY)}", found=name
        ) from None
    return config if isinstance(config, config_cls) else from_dict(config_cls, dict(config))  # type: ignore[arg-type]


class LogitEnsemble(nn.Module):
    """Several networks of one architecture (nnU-Net folds) whose logits are averaged.

    Averaging logits tile by tile and then blending the tiles equals blending each member's tiles
    and averaging the results (both are linear), which is how nnU-Net ensembles its folds.
    ``members`` are registered as ``member_<name>`` so each keeps its own parameters.
    """

    def __init__(self, members: dict[str, nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ConfigError("an ensemble needs at least one member network")
        self.names = list(members)
        for name, member in members.items():
            self.add_module(self.submodule_name(name), member)

    @staticmethod
    def submodule_name(member: str) -> str:
        """What member ``member`` is registered as: its tensors' ``state_dict()`` names start with it."""
        return f"member_{member}"

    def weights(self) -> dict[str, torch.Tensor]:
        """Every member's tensors under ``<member>.`` (the layout of an ensemble's weights file)."""
        return {f"{name}.{key}": value for name in self.names for key, value in self.member(name).state_dict().items()}

    def member(self, name: str) -> nn.Module:
        """The member network ``name``."""
        return getattr(self, self.submodule_name(name))

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """``(B, C, *patch)`` -> mean logits ``(B, K, *patch)``; in training with deep supervision, the
        members' lists of outputs (full resolution first) averaged level by level."""
        outputs = [self.member(name)(x) for name in self.names]
        if isinstance(outputs[0], list | tuple):
            return [sum(level[1:], level[0]) / len(self.names) for level in zip(*outputs, strict=True)]
        return sum(outputs[1:], outputs[0]) / len(self.names)


def network_weights(net: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a model's weights file holds: an ensemble's under ``<member>.``, a cascade's first stage
    under ``previous_stage.``, any other network's state dict."""
    if isinstance(net, (LogitEnsemble, CascadeNetwork)):
        return net.weights()
    return net.state_dict()


class CascadeNetwork(nn.Module):
    """nnU-Net's cascade: a first stage (``3d_lowres``) that segments the image, and the second stage
    (``3d_cascade_fullres``) that reads the image plus that segmentation as one-hot channels.

    ``forward`` is the second stage's: ``(B, C + F, *patch)`` -> logits, where ``F`` is the number of
    foreground labels. The first stage runs as a model of its own (its own pipeline and sliding window),
    see :class:`~deepseg_core.inference.Segmenter`.
    """

    def __init__(self, stage: nn.Module, previous_stage: nn.Module) -> None:
        super().__init__()
        self.stage = stage
        self.previous_stage = previous_stage

    def weights(self) -> dict[str, torch.Tensor]:
        """The second stage's tensors as a model's, the first stage's under ``previous_stage.``."""
        first = network_weights(self.previous_stage)
        return {**network_weights(self.stage), **{f"previous_stage.{key}": value for key, value in first.items()}}

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.stage(x)


def count_parameters(net: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "NET_REGISTRY",
    "CascadeNetwork",
    "LogitEnsemble",
    "UNet",
    "UNetConfig",
    "architecture_config",
    "build_net",
    "count_parameters",
    "network_weights",
    "pad_to_divisor",
    "unet_config",
]
