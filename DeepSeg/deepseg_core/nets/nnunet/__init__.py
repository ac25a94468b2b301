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
the sliding window always feeds whole patches. One module each:

- :mod:`.config`: the architecture as frozen config data (what a model card stores), checked;
- :mod:`.blocks`: conv -> norm -> non-linearity, stacked convs, ResNet-D basic blocks;
- :mod:`.unet`: the encoders, the decoder and the two U-Nets;
- :mod:`.weights`: an nnU-Net checkpoint's ``network_weights`` reduced to the canonical keys.
"""

from __future__ import annotations

from .blocks import BasicBlockD, ConvNormAct, ResidualStage, StackedConvs
from .config import NONLINS, NORMS, NnUNetConfigBase, NnUNetPlainConfig, NnUNetResEncConfig
from .unet import NnUNetPlainUNet, NnUNetResEncUNet, PlainEncoder, ResidualEncoder, UNetDecoder
from .weights import canonical_state_dict

__all__ = [
    "NONLINS",
    "NORMS",
    "BasicBlockD",
    "ConvNormAct",
    "NnUNetConfigBase",
    "NnUNetPlainConfig",
    "NnUNetPlainUNet",
    "NnUNetResEncConfig",
    "NnUNetResEncUNet",
    "PlainEncoder",
    "ResidualEncoder",
    "ResidualStage",
    "StackedConvs",
    "UNetDecoder",
    "canonical_state_dict",
]
