"""nnU-Net's ``PlainConvUNet`` and ``ResidualEncoderUNet``: encoders, the shared decoder, the two networks."""

from __future__ import annotations

import torch
from torch import nn

from ...errors import ShapeError
from .blocks import BasicBlockD, ResidualStage, StackedConvs, conv_type
from .config import NnUNetConfigBase, NnUNetPlainConfig, NnUNetResEncConfig


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
        conv = conv_type(cfg.spatial_dims)
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
