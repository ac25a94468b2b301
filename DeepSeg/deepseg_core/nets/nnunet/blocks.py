"""The building blocks of nnU-Net's U-Nets (``dynamic_network_architectures``' names in brackets).

Conv -> [dropout] -> norm -> non-linearity (``ConvDropoutNormReLU``), ``n`` of them stacked
(``StackedConvBlocks``), and the ResNet-D basic block (``BasicBlockD``) with its stage
(``StackedResidualBlocks``). Each registers exactly the submodules whose names the canonical
state-dict keys use.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .config import NnUNetConfigBase


def conv_type(dims: int) -> type[nn.Module]:
    """``nn.Conv3d`` or ``nn.Conv2d``."""
    return nn.Conv3d if dims == 3 else nn.Conv2d


class ConvNormAct(nn.Module):
    """conv -> [dropout] -> norm -> non-linearity (dynamic_network_architectures' ``ConvDropoutNormReLU``).

    Registers ``conv``, ``dropout``, ``norm`` and ``nonlin`` only, so the state dict has the canonical
    ``.conv.`` / ``.norm.`` keys and none of the ``.all_modules.`` aliases.
    """

    def __init__(
        self,
        cfg: NnUNetConfigBase,
        in_ch: int,
        out_ch: int,
        kernel: Sequence[int],
        stride: Sequence[int] | int,
        *,
        bias: bool,
        activation: bool = True,
        dropout: bool = True,
    ) -> None:
        super().__init__()
        kernel = tuple(kernel)
        stride = (stride,) * cfg.spatial_dims if isinstance(stride, int) else tuple(stride)
        self.conv = conv_type(cfg.spatial_dims)(
            in_ch, out_ch, kernel, stride, padding=[(k - 1) // 2 for k in kernel], dilation=1, bias=bias
        )
        self.dropout = _dropout(cfg) if dropout else None
        self.norm = _norm(cfg, out_ch)
        self.nonlin = _nonlin(cfg) if activation else None
        self.nonlin_first = cfg.nonlin_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.dropout is not None:
            x = self.dropout(x)
        if self.nonlin_first and self.norm is not None and self.nonlin is not None:
            return self.norm(self.nonlin(x))
        if self.norm is not None:
            x = self.norm(x)
        if self.nonlin is not None:
            x = self.nonlin(x)
        return x


def _norm(cfg: NnUNetConfigBase, channels: int) -> nn.Module | None:
    if cfg.norm == "instance":
        cls = nn.InstanceNorm3d if cfg.spatial_dims == 3 else nn.InstanceNorm2d
        return cls(channels, eps=cfg.norm_eps, affine=cfg.norm_affine)
    if cfg.norm == "batch":
        cls = nn.BatchNorm3d if cfg.spatial_dims == 3 else nn.BatchNorm2d
        return cls(channels, eps=cfg.norm_eps, affine=cfg.norm_affine, momentum=cfg.norm_momentum)
    return None


def _nonlin(cfg: NnUNetConfigBase) -> nn.Module | None:
    if cfg.nonlin == "leaky_relu":
        return nn.LeakyReLU(cfg.negative_slope, inplace=True)
    if cfg.nonlin == "relu":
        return nn.ReLU(inplace=True)
    return None


def _dropout(cfg: NnUNetConfigBase) -> nn.Module | None:
    if cfg.dropout <= 0:
        return None
    return {0: nn.Dropout, 2: nn.Dropout2d, 3: nn.Dropout3d}[cfg.dropout_dims](cfg.dropout)


class StackedConvs(nn.Module):
    """``n`` conv blocks in ``convs`` (a Sequential); only the first one strides."""

    def __init__(
        self, cfg: NnUNetConfigBase, n: int, in_ch: int, out_ch: int, kernel: Sequence[int], stride: Sequence[int] | int
    ) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            *[
                ConvNormAct(cfg, in_ch if i == 0 else out_ch, out_ch, kernel, stride if i == 0 else 1, bias=cfg.conv_bias)
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class BasicBlockD(nn.Module):
    """ResNet-D basic block: ``nonlin(conv2(conv1(x)) + skip(x))``; the skip average-pools when the block strides
    and projects with a 1x1 conv (no bias) + norm when the channel count changes."""

    def __init__(self, cfg: NnUNetConfigBase, in_ch: int, out_ch: int, kernel: Sequence[int], stride: Sequence[int]) -> None:
        super().__init__()
        stride = tuple(stride)
        self.conv1 = ConvNormAct(cfg, in_ch, out_ch, kernel, stride, bias=cfg.conv_bias)
        self.conv2 = ConvNormAct(cfg, out_ch, out_ch, kernel, 1, bias=cfg.conv_bias, activation=False, dropout=False)
        self.nonlin2 = _nonlin(cfg) or nn.Identity()
        ops: list[nn.Module] = []
        if any(s != 1 for s in stride):
            pool = nn.AvgPool3d if cfg.spatial_dims == 3 else nn.AvgPool2d
            ops.append(pool(stride, stride))
        if in_ch != out_ch:
            ones = (1,) * cfg.spatial_dims
            ops.append(ConvNormAct(cfg, in_ch, out_ch, ones, 1, bias=False, activation=False, dropout=False))
        self.skip: nn.Module = nn.Sequential(*ops) if ops else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.skip(x)
        out = self.conv2(self.conv1(x))
        out += residual
        return self.nonlin2(out)


class ResidualStage(nn.Module):
    """``n`` BasicBlockD in ``blocks``; only the first one strides."""

    def __init__(
        self, cfg: NnUNetConfigBase, n: int, in_ch: int, out_ch: int, kernel: Sequence[int], stride: Sequence[int]
    ) -> None:
        super().__init__()
        ones = (1,) * cfg.spatial_dims
        self.blocks = nn.Sequential(
            *[BasicBlockD(cfg, in_ch if i == 0 else out_ch, out_ch, kernel, stride if i == 0 else ones) for i in range(n)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)
