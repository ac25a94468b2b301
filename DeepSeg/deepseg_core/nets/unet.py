"""One configurable U-Net for 2D, 2.5D and 3D segmentation.

Encoder: per level a block of ``convs_per_level`` (conv -> norm -> dropout -> activation); levels
below the first start by downsampling (strided conv, or max-pooling). Decoder: transposed-conv
upsampling, concatenation with the encoder's skip feature map, a conv block. A 1x1 conv head gives
class logits. With deep supervision the training-mode output is a list of logits at decreasing
resolution (full resolution first); in eval mode it is always the full-resolution tensor.

2.5D is a 2D U-Net whose input channels are ``context_slices`` neighbouring slices of every
modality: input ``(B, modalities * k, H, W)``, output the centre slice ``(B, classes, H, W)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, ShapeError

NORMS = ("instance", "batch", "none")
ACTIVATIONS = ("leaky_relu", "relu", "gelu")
DOWNSAMPLINGS = ("conv", "maxpool")
SIZE_POLICIES = ("pad", "refuse")


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a :class:`UNet` (what a model card stores to rebuild it).

    Attributes:
        spatial_dims: 2 (2D / 2.5D) or 3.
        in_channels: input modalities (e.g. 1 for CT, 3 for T1+T2+FLAIR).
        num_classes: output channels (background included); 1 means a single sigmoid logit.
        context_slices: k neighbouring slices stacked as channels (odd; 1 = plain 2D or 3D).
        features: channels per level; its length is the depth.
        strides: downsampling factor per level transition, one entry per axis (None: 2 everywhere).
        convs_per_level: conv layers in each encoder/decoder block.
        kernel_size: conv kernel size (odd).
        norm: ``instance``, ``batch`` or ``none``.
        activation: ``leaky_relu``, ``relu`` or ``gelu``.
        dropout: dropout probability after each conv (0 disables).
        downsampling: ``conv`` (strided conv, nnU-Net style) or ``maxpool``.
        deep_supervision: return lower-resolution logits too (training mode only).
        size_policy: ``pad`` inputs whose size is not a multiple of the downsampling factor (and
            crop the output back), or ``refuse`` them with a :class:`ShapeError`.
    """

    spatial_dims: int = 3
    in_channels: int = 1
    num_classes: int = 2
    context_slices: int = 1
    features: tuple[int, ...] = (16, 32, 64, 128)
    strides: tuple[tuple[int, ...], ...] | None = None
    convs_per_level: int = 2
    kernel_size: int = 3
    norm: str = "instance"
    activation: str = "leaky_relu"
    dropout: float = 0.0
    downsampling: str = "conv"
    deep_supervision: bool = False
    size_policy: str = "pad"

    def __post_init__(self) -> None:
        def bad(field: str, expected: str, found: object) -> ConfigError:
            return ConfigError(f"invalid UNetConfig.{field}", expected=expected, found=repr(found))

        if self.spatial_dims not in (2, 3):
            raise bad("spatial_dims", "2 or 3", self.spatial_dims)
        if self.in_channels < 1:
            raise bad("in_channels", ">= 1", self.in_channels)
        if self.num_classes < 1:
            raise bad("num_classes", ">= 1", self.num_classes)
        if self.context_slices < 1 or self.context_slices % 2 == 0:
            raise bad("context_slices", "an odd number >= 1", self.context_slices)
        if self.context_slices > 1 and self.spatial_dims != 2:
            raise bad("context_slices", "1 for a 3D net (2.5D needs spatial_dims=2)", self.context_slices)
        if len(self.features) < 1 or any(f < 1 for f in self.features):
            raise bad("features", "one positive channel count per level", self.features)
        if self.strides is not None and (
            len(self.strides) != len(self.features) - 1 or any(len(s) != self.spatial_dims or min(s) < 1 for s in self.strides)
        ):
            raise bad("strides", f"{len(self.features) - 1} entries of {self.spatial_dims} positive ints", self.strides)
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise bad("kernel_size", "an odd number", self.kernel_size)
        if self.convs_per_level < 1:
            raise bad("convs_per_level", ">= 1", self.convs_per_level)
        if self.norm not in NORMS:
            raise bad("norm", f"one of {NORMS}", self.norm)
        if self.activation not in ACTIVATIONS:
            raise bad("activation", f"one of {ACTIVATIONS}", self.activation)
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "a probability in [0, 1)", self.dropout)
        if self.downsampling not in DOWNSAMPLINGS:
            raise bad("downsampling", f"one of {DOWNSAMPLINGS}", self.downsampling)
        if self.size_policy not in SIZE_POLICIES:
            raise bad("size_policy", f"one of {SIZE_POLICIES}", self.size_policy)

    @property
    def network_in_channels(self) -> int:
        """Channels the first conv sees: modalities x context slices."""
        return self.in_channels * self.context_slices

    @property
    def level_strides(self) -> tuple[tuple[int, ...], ...]:
        """Downsampling factor per level transition and axis."""
        if self.strides is not None:
            return self.strides
        return tuple((2,) * self.spatial_dims for _ in range(len(self.features) - 1))

    @property
    def size_divisor(self) -> tuple[int, ...]:
        """Input sizes must be multiples of this per axis (the total downsampling factor)."""
        divisor = [1] * self.spatial_dims
        for stride in self.level_strides:
            divisor = [d * s for d, s in zip(divisor, stride, strict=True)]
        return tuple(divisor)

    @property
    def kind(self) -> str:
        """``"2d"``, ``"2.5d"`` or ``"3d"``."""
        if self.spatial_dims == 3:
            return "3d"
        return "2.5d" if self.context_slices > 1 else "2d"


def unet_config(arch: str, in_channels: int = 1, num_classes: int = 2, context_slices: int = 5, **kwargs: object) -> UNetConfig:
    """Config for ``arch`` in ``{"2d", "2.5d", "3d"}``; other fields pass through to :class:`UNetConfig`."""
    if arch == "3d":
        return UNetConfig(spatial_dims=3, in_channels=in_channels, num_classes=num_classes, **kwargs)  # type: ignore[arg-type]
    if arch == "2d":
        return UNetConfig(spatial_dims=2, in_channels=in_channels, num_classes=num_classes, **kwargs)  # type: ignore[arg-type]
    if arch == "2.5d":
        return UNetConfig(
            spatial_dims=2,
            in_channels=in_channels,
            num_classes=num_classes,
            context_slices=context_slices,
            **kwargs,  # type: ignore[arg-type]
        )
    raise ConfigError(f"unknown architecture {arch!r}", expected="one of ['2d', '2.5d', '3d']", found=arch)


def _conv(dims: int) -> type[nn.Module]:
    return nn.Conv3d if dims == 3 else nn.Conv2d


def _norm(kind: str, dims: int, channels: int) -> nn.Module:
    if kind == "instance":
        return (nn.InstanceNorm3d if dims == 3 else nn.InstanceNorm2d)(channels, affine=True)
    if kind == "batch":
        return (nn.BatchNorm3d if dims == 3 else nn.BatchNorm2d)(channels)
    return nn.Identity()


def _activation(kind: str) -> nn.Module:
    if kind == "leaky_relu":
        return nn.LeakyReLU(0.01, inplace=True)
    if kind == "relu":
        return nn.ReLU(inplace=True)
    return nn.GELU()


class ConvBlock(nn.Sequential):
    """``n`` x (conv -> norm -> dropout -> activation); the first conv may stride."""

    def __init__(self, cfg: UNetConfig, in_ch: int, out_ch: int, stride: tuple[int, ...] | int = 1) -> None:
        layers: list[nn.Module] = []
        conv = _conv(cfg.spatial_dims)
        for i in range(cfg.convs_per_level):
            layers.append(
                conv(
                    in_ch if i == 0 else out_ch,
                    out_ch,
                    kernel_size=cfg.kernel_size,
                    stride=stride if i == 0 else 1,
                    padding=cfg.kernel_size // 2,
                    bias=cfg.norm == "none",
                )
            )
            layers.append(_norm(cfg.norm, cfg.spatial_dims, out_ch))
            if cfg.dropout > 0:
                layers.append((nn.Dropout3d if cfg.spatial_dims == 3 else nn.Dropout2d)(cfg.dropout))
            layers.append(_activation(cfg.activation))
        super().__init__(*layers)


class UNet(nn.Module):
    """U-Net with skip connections by concatenation.

    Input ``(B, network_in_channels, *spatial)``; output logits ``(B, num_classes, *spatial)``
    (plus lower-resolution logits in a list when deep supervision is on and the net is training).
    """

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        dims, feats, strides = config.spatial_dims, config.features, config.level_strides
        conv = _conv(dims)
        self.encoder = nn.ModuleList()
        for level, out_ch in enumerate(feats):
            in_ch = config.network_in_channels if level == 0 else feats[level - 1]
            if level == 0:
                self.encoder.append(ConvBlock(config, in_ch, out_ch))
            elif config.downsampling == "conv":
                self.encoder.append(ConvBlock(config, in_ch, out_ch, stride=strides[level - 1]))
            else:
                pool = (nn.MaxPool3d if dims == 3 else nn.MaxPool2d)(strides[level - 1])
                self.encoder.append(nn.Sequential(pool, ConvBlock(config, in_ch, out_ch)))
        transpose = nn.ConvTranspose3d if dims == 3 else nn.ConvTranspose2d
        self.upsamplers = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for level in range(len(feats) - 1, 0, -1):
            stride = strides[level - 1]
            self.upsamplers.append(transpose(feats[level], feats[level - 1], kernel_size=stride, stride=stride, bias=False))
            self.decoder.append(ConvBlock(config, 2 * feats[level - 1], feats[level - 1]))
        self.head = conv(feats[0], config.num_classes, kernel_size=1)
        # deep_heads[m - 1] reads decoder level m (m = 1 .. depth - 2), finest first
        self.deep_heads = nn.ModuleList(
            [conv(feats[m], config.num_classes, kernel_size=1) for m in range(1, len(feats) - 1)]
            if config.deep_supervision
            else []
        )
        self._initialise()

    def _initialise(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(module.weight, a=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def _check_input(self, x: torch.Tensor) -> None:
        cfg = self.config
        if x.ndim != cfg.spatial_dims + 2 or x.shape[1] != cfg.network_in_channels:
            raise ShapeError(
                "network input has the wrong shape",
                expected=f"(batch, {cfg.network_in_channels}, {', '.join(['size'] * cfg.spatial_dims)})"
                f" for a {cfg.kind} net with {cfg.in_channels} modality(ies) x {cfg.context_slices} slice(s)",
                found=str(tuple(x.shape)),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits for ``x`` of shape ``(B, C_in, *spatial)``."""
        self._check_input(x)
        spatial = tuple(x.shape[2:])
        padded = pad_to_divisor(x, self.config)
        skips: list[torch.Tensor] = []
        h = padded
        for block in self.encoder:
            h = block(h)
            skips.append(h)
        outputs: list[torch.Tensor] = []
        for i, (up, block) in enumerate(zip(self.upsamplers, self.decoder, strict=True)):
            h = block(torch.cat([up(h), skips[-(i + 2)]], dim=1))
            outputs.append(h)
        if not outputs:
            outputs.append(h)
        main = _crop(self.head(outputs[-1]), spatial)
        if not (self.config.deep_supervision and self.training):
            return main
        # outputs[i] is decoder level len(outputs) - 1 - i, so level m is outputs[-1 - m]
        deep = [head(outputs[-1 - m]) for m, head in enumerate(self.deep_heads, start=1)]
        shapes = _deep_supervision_shapes(spatial, self.config)
        return [main] + [_crop(d, s) for d, s in zip(deep, shapes, strict=True)]


def _crop(t: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    return t[(slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)]


def _deep_supervision_shapes(spatial: tuple[int, ...], cfg: UNetConfig) -> list[tuple[int, ...]]:
    """Valid (un-padded) sizes of the lower-resolution outputs, finest first."""
    shapes = []
    current = list(spatial)
    for stride in cfg.level_strides[:-1]:
        current = [-(-c // s) for c, s in zip(current, stride, strict=True)]
        shapes.append(tuple(current))
    return shapes


def pad_to_divisor(x: torch.Tensor, cfg: UNetConfig) -> torch.Tensor:
    """Pad ``x`` (replicate, at the high end) to multiples of ``cfg.size_divisor``, or refuse.

    Raises:
        ShapeError: when ``cfg.size_policy == "refuse"`` and a size is not a multiple.
    """
    spatial = tuple(x.shape[2:])
    divisor = cfg.size_divisor
    target = tuple(-(-s // d) * d for s, d in zip(spatial, divisor, strict=True))
    if target == spatial:
        return x
    if cfg.size_policy == "refuse":
        raise ShapeError(
            "input size is not a multiple of the network's downsampling factor",
            expected=f"multiples of {divisor} per spatial axis",
            found=str(spatial),
            hint=f"Pad or crop to e.g. {target}, or build the net with size_policy='pad'.",
        )
    pads: list[int] = []
    for s, t in zip(reversed(spatial), reversed(target), strict=True):
        pads.extend([0, t - s])
    return F.pad(x, pads, mode="replicate")
