"""nnU-Net v2's U-Nets (``PlainConvUNet``, ``ResidualEncoderUNet``), rebuilt by DeepSeg from plain config data.

These are DeepSeg's own modules, written so that their ``state_dict`` uses the *canonical* key names
of ``dynamic_network_architectures`` 0.4 (the package nnU-Net v2 builds its networks with), so the
``network_weights`` of an nnU-Net checkpoint load by name:

- plain encoder: ``encoder.stages.{s}.0.convs.{c}.conv.weight`` / ``.bias``, ``...norm.weight`` / ``.bias``;
- residual encoder: ``encoder.stem.convs.0.*``, ``encoder.stages.{s}.blocks.{b}.conv1.*`` / ``conv2.*`` /
  ``skip.{i}.*`` (``skip.0`` is the average pooling of a strided block, then the 1x1 projection);
- decoder: ``decoder.transpconvs.{d}.*``, ``decoder.stages.{d}.convs.{c}.*``, ``decoder.seg_layers.{d}.*``.

An nnU-Net checkpoint holds every conv and norm tensor twice more, as aliases: ``*.all_modules.{i}.*``
(the same module reached through a ``Sequential``) and ``decoder.encoder.*`` (the decoder keeps a
reference to the encoder). :func:`canonical_state_dict` drops them after checking that each alias
equals its canonical tensor.

Each conv block is conv -> [dropout] -> norm -> non-linearity (``nonlin_first`` swaps the last two),
padding ``(k - 1) // 2`` per axis. The decoder upsamples with a transposed conv (kernel = stride),
concatenates ``(upsampled, skip)`` in that order and runs a conv block; every decoder stage has a 1x1
segmentation head (``seg_layers``). In eval mode only the full-resolution head runs and the output
is ``(B, num_classes, *spatial)`` logits; in training mode with ``deep_supervision`` the output is the
list of every head's logits, full resolution first (what
:class:`~deepseg_core.losses.DeepSupervisionLoss` expects), so imported models can be fine-tuned the
way nnU-Net trains them.

Input sizes must be multiples of the product of the strides per axis (nnU-Net's patch sizes are);
the sliding window always feeds whole patches.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError, ShapeError

NORMS = ("instance", "batch", "none")
NONLINS = ("leaky_relu", "relu", "none")


@dataclass(frozen=True)
class NnUNetConfigBase:
    """What nnU-Net's ``PlainConvUNet`` and ``ResidualEncoderUNet`` share (the plans' ``architecture.arch_kwargs``).

    Attributes:
        spatial_dims: 2 or 3 (``conv_op`` Conv2d / Conv3d).
        in_channels: input channels (``channel_names`` of dataset.json).
        num_classes: output channels (background included; one per label value).
        features_per_stage: channels of each encoder stage (``n_stages`` = its length).
        kernel_sizes: conv kernel per stage and axis, in the network's (transposed) axis order.
        strides: downsampling of each stage's first conv per axis (stage 0 is normally all ones).
        n_conv_per_stage_decoder: convs per decoder stage (``n_stages - 1`` entries, bottleneck first).
        conv_bias: convs (and transposed convs) have a bias.
        norm: ``instance`` (InstanceNorm, no running statistics), ``batch`` or ``none``.
        norm_eps: the norm's epsilon.
        norm_affine: the norm has a learnt scale and shift.
        norm_momentum: batch-norm momentum (ignored otherwise).
        dropout: dropout probability after each conv (0: none; nnU-Net's default).
        dropout_dims: 0 for ``Dropout``, else ``Dropout2d`` / ``Dropout3d``.
        nonlin: ``leaky_relu``, ``relu`` or ``none``.
        negative_slope: LeakyReLU slope (nnU-Net's plans leave PyTorch's default 0.01).
        nonlin_first: conv -> non-linearity -> norm instead of conv -> norm -> non-linearity.
        deep_supervision: training-mode output is every head's logits (full resolution first).
    """

    spatial_dims: int = 3
    in_channels: int = 1
    num_classes: int = 2
    features_per_stage: tuple[int, ...] = (32, 64, 128, 256, 320, 320)
    kernel_sizes: tuple[tuple[int, ...], ...] = ((3, 3, 3),) * 6
    strides: tuple[tuple[int, ...], ...] = ((1, 1, 1),) + ((2, 2, 2),) * 5
    n_conv_per_stage_decoder: tuple[int, ...] = (2,) * 5
    conv_bias: bool = True
    norm: str = "instance"
    norm_eps: float = 1e-5
    norm_affine: bool = True
    norm_momentum: float = 0.1
    dropout: float = 0.0
    dropout_dims: int = 0
    nonlin: str = "leaky_relu"
    negative_slope: float = 0.01
    nonlin_first: bool = False
    deep_supervision: bool = True

    @property
    def n_stages(self) -> int:
        """Resolution stages of the encoder."""
        return len(self.features_per_stage)

    @property
    def encoder_blocks(self) -> tuple[int, ...]:
        """Convs (plain) or residual blocks (residual encoder) per encoder stage."""
        raise NotImplementedError

    @property
    def size_divisor(self) -> tuple[int, ...]:
        """Input sizes must be multiples of this per axis (the product of the strides)."""
        divisor = [1] * self.spatial_dims
        for stride in self.strides:
            divisor = [d * s for d, s in zip(divisor, stride, strict=True)]
        return tuple(divisor)

    def __post_init__(self) -> None:
        def bad(field: str, expected: str, found: object) -> ConfigError:
            return ConfigError(f"invalid {type(self).__name__}.{field}", expected=expected, found=repr(found))

        n = self.n_stages
        if self.spatial_dims not in (2, 3):
            raise bad("spatial_dims", "2 or 3", self.spatial_dims)
        if self.in_channels < 1 or self.num_classes < 1:
            raise bad("in_channels / num_classes", ">= 1", (self.in_channels, self.num_classes))
        if n < 2 or any(f < 1 for f in self.features_per_stage):
            raise bad("features_per_stage", "at least 2 stages of positive channel counts", self.features_per_stage)
        for field in ("kernel_sizes", "strides"):
            value = getattr(self, field)
            if len(value) != n or any(len(v) != self.spatial_dims or min(v) < 1 for v in value):
                raise bad(field, f"{n} entries of {self.spatial_dims} positive ints", value)
        if len(self.encoder_blocks) != n or min(self.encoder_blocks) < 1:
            raise bad("n_conv_per_stage / n_blocks_per_stage", f"{n} positive ints", self.encoder_blocks)
        if len(self.n_conv_per_stage_decoder) != n - 1 or min(self.n_conv_per_stage_decoder) < 1:
            raise bad("n_conv_per_stage_decoder", f"{n - 1} positive ints", self.n_conv_per_stage_decoder)
        if self.norm not in NORMS:
            raise bad("norm", f"one of {NORMS}", self.norm)
        if self.nonlin not in NONLINS:
            raise bad("nonlin", f"one of {NONLINS}", self.nonlin)
        if not 0.0 <= self.dropout < 1.0 or self.dropout_dims not in (0, 2, 3):
            raise bad("dropout", "a probability in [0, 1) and dropout_dims 0, 2 or 3", (self.dropout, self.dropout_dims))


@dataclass(frozen=True)
class NnUNetPlainConfig(NnUNetConfigBase):
    """Architecture of an nnU-Net ``PlainConvUNet`` (fields of :class:`NnUNetConfigBase`, and:)

    Attributes:
        n_conv_per_stage: convs per encoder stage.
    """

    n_conv_per_stage: tuple[int, ...] = (2,) * 6

    @property
    def encoder_blocks(self) -> tuple[int, ...]:
        return self.n_conv_per_stage


@dataclass(frozen=True)
class NnUNetResEncConfig(NnUNetConfigBase):
    """Architecture of an nnU-Net ``ResidualEncoderUNet`` with BasicBlockD (the ResEnc M / L / XL presets).

    Attributes:
        n_blocks_per_stage: residual blocks per encoder stage (the presets: 1, 3, 4, 6, 6, 6, ...).
        stem_channels: channels of the stem conv (None: ``features_per_stage[0]``).
    """

    n_blocks_per_stage: tuple[int, ...] = (1, 3, 4, 6, 6, 6)
    stem_channels: int | None = None

    @property
    def encoder_blocks(self) -> tuple[int, ...]:
        return self.n_blocks_per_stage


def _conv_type(dims: int) -> type[nn.Module]:
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
        self.conv = _conv_type(cfg.spatial_dims)(
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


class PlainEncoder(nn.Module):
    """Stages of stacked convs; returns every stage's output (the skips, bottleneck last)."""

    def __init__(self, cfg: NnUNetPlainConfig) -> None:
        super().__init__()
        stages = []
        in_ch = cfg.in_channels
        for s, out_ch in enumerate(cfg.features_per_stage):
            # the extra Sequential reproduces nnU-Net's key path encoder.stages.{s}.0.convs...
            stages.append(
                nn.Sequential(StackedConvs(cfg, cfg.encoder_blocks[s], in_ch, out_ch, cfg.kernel_sizes[s], cfg.strides[s]))
            )
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class ResidualEncoder(nn.Module):
    """A stem conv, then stages of BasicBlockD; returns every stage's output (bottleneck last)."""

    def __init__(self, cfg: NnUNetResEncConfig) -> None:
        super().__init__()
        stem = cfg.stem_channels or cfg.features_per_stage[0]
        self.stem = StackedConvs(cfg, 1, cfg.in_channels, stem, cfg.kernel_sizes[0], 1)
        stages = []
        in_ch = stem
        for s, out_ch in enumerate(cfg.features_per_stage):
            stages.append(ResidualStage(cfg, cfg.n_blocks_per_stage[s], in_ch, out_ch, cfg.kernel_sizes[s], cfg.strides[s]))
            in_ch = out_ch
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class UNetDecoder(nn.Module):
    """Transposed-conv upsampling, concatenation ``(upsampled, skip)``, stacked convs, a 1x1 head per stage.

    It holds no reference to the encoder module (nnU-Net's does, which is where the
    ``decoder.encoder.*`` aliases in its checkpoints come from).
    """

    def __init__(self, cfg: NnUNetConfigBase) -> None:
        super().__init__()
        conv = _conv_type(cfg.spatial_dims)
        transposed = nn.ConvTranspose3d if cfg.spatial_dims == 3 else nn.ConvTranspose2d
        features, n = cfg.features_per_stage, cfg.n_stages
        transpconvs, stages, heads = [], [], []
        for s in range(1, n):
            below, skip = features[-s], features[-(s + 1)]
            stride = cfg.strides[-s]
            transpconvs.append(transposed(below, skip, stride, stride, bias=cfg.conv_bias))
            stages.append(StackedConvs(cfg, cfg.n_conv_per_stage_decoder[s - 1], 2 * skip, skip, cfg.kernel_sizes[-(s + 1)], 1))
            heads.append(conv(skip, cfg.num_classes, 1, 1, 0, bias=True))
        self.transpconvs = nn.ModuleList(transpconvs)
        self.stages = nn.ModuleList(stages)
        self.seg_layers = nn.ModuleList(heads)

    def forward(self, skips: list[torch.Tensor], all_heads: bool) -> torch.Tensor | list[torch.Tensor]:
        lres = skips[-1]
        outputs = []
        last = len(self.stages) - 1
        for s, (up, stage) in enumerate(zip(self.transpconvs, self.stages, strict=True)):
            x = torch.cat((up(lres), skips[-(s + 2)]), dim=1)
            x = stage(x)
            if all_heads:
                outputs.append(self.seg_layers[s](x))
            elif s == last:
                outputs.append(self.seg_layers[-1](x))
            lres = x
        return outputs[::-1] if all_heads else outputs[0]


class _NnUNetBase(nn.Module):
    config: NnUNetConfigBase

    def _check_input(self, x: torch.Tensor) -> None:
        cfg = self.config
        if x.ndim != cfg.spatial_dims + 2 or x.shape[1] != cfg.in_channels:
            raise ShapeError(
                "network input has the wrong shape",
                expected=f"(batch, {cfg.in_channels}, {', '.join(['size'] * cfg.spatial_dims)})",
                found=str(tuple(x.shape)),
            )
        divisor = cfg.size_divisor
        if any(s % d for s, d in zip(x.shape[2:], divisor, strict=True)):
            raise ShapeError(
                "input size is not a multiple of the network's downsampling factor",
                expected=f"multiples of {divisor} per spatial axis (nnU-Net patches are)",
                found=str(tuple(x.shape[2:])),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits ``(B, num_classes, *spatial)`` for ``x`` ``(B, in_channels, *spatial)`` (a list in deep-supervised training)."""
        self._check_input(x)
        return self.decoder(self.encoder(x), all_heads=self.config.deep_supervision and self.training)

    def _initialise(self) -> None:
        # nnU-Net's InitWeights_He(1e-2): only matters for training from scratch (imports load weights)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                nn.init.kaiming_normal_(module.weight, a=1e-2)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


class NnUNetPlainUNet(_NnUNetBase):
    """nnU-Net's ``PlainConvUNet`` (see the module docstring)."""

    def __init__(self, config: NnUNetPlainConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = PlainEncoder(config)
        self.decoder = UNetDecoder(config)
        self._initialise()


class NnUNetResEncUNet(_NnUNetBase):
    """nnU-Net's ``ResidualEncoderUNet`` with BasicBlockD (the ResEnc presets; see the module docstring)."""

    def __init__(self, config: NnUNetResEncConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = ResidualEncoder(config)
        self.decoder = UNetDecoder(config)
        self._initialise()
        # nnU-Net's init_last_bn_before_add_to_0: each residual branch starts as the identity
        for module in self.modules():
            if isinstance(module, BasicBlockD) and module.conv2.norm is not None and module.conv2.norm.weight is not None:
                nn.init.zeros_(module.conv2.norm.weight)


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


__all__ = [
    "NnUNetConfigBase",
    "NnUNetPlainConfig",
    "NnUNetPlainUNet",
    "NnUNetResEncConfig",
    "NnUNetResEncUNet",
    "canonical_state_dict",
]
