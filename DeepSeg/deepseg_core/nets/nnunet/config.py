"""The architecture of nnU-Net's U-Nets as config data: what a model card stores, checked on creation.

The fields are the plans' ``architecture.arch_kwargs`` in DeepSeg's words (the importer maps one
onto the other, :func:`deepseg_core.importers.nnunet.network_config`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import ConfigError

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
