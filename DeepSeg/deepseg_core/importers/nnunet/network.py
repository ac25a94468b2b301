"""The network: the plans' ``architecture`` mapped onto DeepSeg's rebuild, one member per fold.

DeepSeg rebuilds the plans' ``PlainConvUNet`` / ``ResidualEncoderUNet`` with its own modules
(:mod:`deepseg_core.nets.nnunet`), one per fold, as a :class:`~deepseg_core.nets.LogitEnsemble`
whose members average their logits as nnU-Net averages its folds. Old plans without an
``architecture`` section are given the one nnU-Net would build for them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ...config import from_dict, to_dict
from .checkpoint import network_weights
from .source import NnUNetImportError

if TYPE_CHECKING:
    from ...nets import LogitEnsemble

# the package's name, not this module's: log lines keep the name they had before the package was split
log = logging.getLogger(__package__)

NETWORKS = {"PlainConvUNet": "nnunet_plain_unet", "ResidualEncoderUNet": "nnunet_resenc_unet"}


def legacy_architecture(config: dict[str, Any]) -> dict[str, Any]:
    """The ``architecture`` section old plans (no such key; e.g. older TotalSegmentator models) imply.

    nnU-Net rebuilds it the same way (``ConfigurationManager.__init__``): features
    ``min(base * 2**i, max)``, kernel and pool sizes, convs per stage, conv bias, instance norm
    (eps 1e-5, affine), LeakyReLU.
    """
    class_name = config.get("UNet_class_name")
    if class_name not in NETWORKS:
        raise NnUNetImportError(
            "old plans format with a network DeepSeg does not rebuild",
            expected=f"UNet_class_name one of {sorted(NETWORKS)}",
            found=str(class_name),
        )
    n_stages = len(config["n_conv_per_stage_encoder"])
    dims = len(config["patch_size"])
    blocks = "n_conv_per_stage" if class_name == "PlainConvUNet" else "n_blocks_per_stage"
    return {
        "network_class_name": class_name,
        "arch_kwargs": {
            "n_stages": n_stages,
            "features_per_stage": [
                min(config["UNet_base_num_features"] * 2**i, config["unet_max_num_features"]) for i in range(n_stages)
            ],
            "conv_op": f"torch.nn.modules.conv.Conv{dims}d",
            "kernel_sizes": config["conv_kernel_sizes"],
            "strides": config["pool_op_kernel_sizes"],
            blocks: config["n_conv_per_stage_encoder"],
            "n_conv_per_stage_decoder": config["n_conv_per_stage_decoder"],
            "conv_bias": True,
            "norm_op": f"torch.nn.modules.instancenorm.InstanceNorm{dims}d",
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
    }


def _per_stage(value: Any, n: int, dims: int | None = None) -> list[Any]:
    """An arch kwarg given as one value for all stages (nnU-Net allows it), expanded to ``n`` entries."""
    if isinstance(value, int):
        return [value if dims is None else [value] * dims for _ in range(n)]
    out = [list(v) if isinstance(v, (list, tuple)) else ([v] * dims if dims else v) for v in value]
    return out


def _leaf(kwargs: dict[str, Any], key: str) -> str:
    """The class name an arch kwarg names (``torch.nn.LeakyReLU`` -> ``LeakyReLU``; none -> "")."""
    value = kwargs.get(key)
    return "" if value is None else str(value).rsplit(".", 1)[-1]


def _layers(kwargs: dict[str, Any], dims: int, weights: dict[str, Any]) -> dict[str, Any]:
    """The norm, non-linearity and dropout of every conv block, as :class:`~deepseg_core.nets.nnunet.NnUNetConfigBase` fields."""
    norm_name = _leaf(kwargs, "norm_op")
    norm = {"": "none", f"InstanceNorm{dims}d": "instance", f"BatchNorm{dims}d": "batch"}.get(norm_name)
    if norm is None:
        raise NnUNetImportError("unsupported norm_op in the plans", expected="InstanceNorm or BatchNorm", found=norm_name)
    if norm == "instance" and any(k.endswith("norm.running_mean") for k in weights):
        log.info("the checkpoint holds batch-norm statistics although the plans say instance norm: using batch norm")
        norm = "batch"
    nonlin = {"LeakyReLU": "leaky_relu", "ReLU": "relu", "": "none"}.get(_leaf(kwargs, "nonlin"))
    if nonlin is None:
        raise NnUNetImportError(
            "unsupported non-linearity in the plans", expected="LeakyReLU or ReLU", found=_leaf(kwargs, "nonlin")
        )
    dropout_name = _leaf(kwargs, "dropout_op")
    dropout_dims = {"": 0, "Dropout": 0, "Dropout2d": 2, "Dropout3d": 3}.get(dropout_name)
    if dropout_dims is None:
        raise NnUNetImportError(
            "unsupported dropout_op in the plans", expected="Dropout, Dropout2d or Dropout3d", found=dropout_name
        )
    norm_kwargs = kwargs.get("norm_op_kwargs") or {}
    nonlin_kwargs = kwargs.get("nonlin_kwargs") or {}
    return {
        "norm": norm,
        "norm_eps": float(norm_kwargs.get("eps", 1e-5)),
        "norm_affine": bool(norm_kwargs.get("affine", norm != "instance")),
        "norm_momentum": float(norm_kwargs.get("momentum", 0.1)),
        "dropout": float((kwargs.get("dropout_op_kwargs") or {}).get("p", 0.5)) if dropout_name else 0.0,
        "dropout_dims": dropout_dims,
        "nonlin": nonlin,
        "negative_slope": float(nonlin_kwargs.get("negative_slope", 0.01)),
        "nonlin_first": bool(kwargs.get("nonlin_first", False)),
    }


def network_config(
    architecture: dict[str, Any], in_channels: int, num_classes: int, weights: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """``(registry name, config dict)`` of the DeepSeg network for the plans' ``architecture`` section.

    ``weights`` (one fold's ``network_weights``) decides between instance and batch norm when the
    trainer swapped them (``nnUNetTrainerBN`` keeps the plans' instance norm but trains batch norm).
    """
    class_name = str(architecture.get("network_class_name", "")).rsplit(".", 1)[-1]
    if class_name not in NETWORKS:
        raise NnUNetImportError(
            f"network {architecture.get('network_class_name')!r} is not supported yet",
            expected=f"one of {sorted(NETWORKS)} (dynamic_network_architectures)",
            found=str(architecture.get("network_class_name")),
        )
    kwargs = dict(architecture.get("arch_kwargs", {}))
    conv = _leaf(kwargs, "conv_op")
    if conv not in ("Conv2d", "Conv3d"):
        raise NnUNetImportError("unsupported conv_op in the plans", expected="Conv2d or Conv3d", found=conv or "none")
    dims = 3 if conv == "Conv3d" else 2
    n = int(kwargs["n_stages"])
    layers = _layers(kwargs, dims, weights)
    config: dict[str, Any] = {
        "spatial_dims": dims,
        "in_channels": in_channels,
        "num_classes": num_classes,
        "features_per_stage": _per_stage(kwargs["features_per_stage"], n),
        "kernel_sizes": _per_stage(kwargs["kernel_sizes"], n, dims),
        "strides": _per_stage(kwargs["strides"], n, dims),
        "n_conv_per_stage_decoder": _per_stage(kwargs["n_conv_per_stage_decoder"], n - 1),
        "conv_bias": bool(kwargs.get("conv_bias", False)),
        **layers,
        "deep_supervision": True,
    }
    if class_name == "PlainConvUNet":
        config["n_conv_per_stage"] = _per_stage(kwargs["n_conv_per_stage"], n)
    else:
        block = _leaf(kwargs, "block") or "BasicBlockD"
        if block != "BasicBlockD" or kwargs.get("bottleneck_channels") is not None:
            raise NnUNetImportError(
                "residual blocks other than BasicBlockD are not supported yet", expected="BasicBlockD", found=block
            )
        config["n_blocks_per_stage"] = _per_stage(kwargs["n_blocks_per_stage"], n)
        config["stem_channels"] = kwargs.get("stem_channels")
    return NETWORKS[class_name], config


def build_ensemble(
    architecture: dict[str, Any], in_channels: int, num_classes: int, checkpoints: dict[str, dict[str, Any]], checkpoint: str
) -> tuple[str, dict[str, Any], LogitEnsemble]:
    """``(registry name, normalised config, LogitEnsemble)``: one member per fold of ``checkpoints`` (in order), weights loaded.

    The config is the first fold's (:func:`network_config`); every member's weights must fit it exactly
    (:func:`~deepseg_core.nets.nnunet.canonical_state_dict`), as float32.
    """
    import torch

    from ...nets import NET_REGISTRY, LogitEnsemble, build_net
    from ...nets.nnunet import canonical_state_dict

    names = list(checkpoints)
    net_name, net_config = network_config(architecture, in_channels, num_classes, network_weights(checkpoints[names[0]]))
    net_config = to_dict(from_dict(NET_REGISTRY[net_name][0], net_config))  # normalised: every field, checked
    members = {}
    for member in names:
        net = build_net(net_name, net_config)
        state = canonical_state_dict(network_weights(checkpoints[member]), net, f"{member}/{checkpoint}")
        net.load_state_dict({k: v.to(torch.float32) if v.is_floating_point() else v for k, v in state.items()}, strict=True)
        members[member] = net.eval()
    return net_name, net_config, LogitEnsemble(members)
