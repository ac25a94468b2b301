"""Inference backends: who computes a tile batch's logits (torch, OpenVINO, ONNX Runtime).

The sliding window, slabs, test-time augmentation and uncertainty passes stay above this layer:
a backend is a callable ``(B, C, *patch) float32 tensor -> (B, K, *patch) logits tensor``. On CPUs,
OpenVINO and ONNX Runtime run the same weights 1.5-2x faster than PyTorch's eager kernels; they
are optional (``pip install deepseg[cpu-fast]``).

- ``torch``: the network itself (CUDA, AMP, Monte-Carlo dropout).
- ``onnxruntime`` / ``openvino``: the network exported once to ONNX (opset 17, the TorchScript
  exporter) for the patch and a fixed batch, cached per model version: the sliding window's tile batch
  (ONNX Runtime) or one tile (OpenVINO, which runs each tile of a batch as its own request: faster per
  tile, :func:`openvino_tiles`; :func:`graph_input_shape`). A cached
  graph is used only when its key matches: the SHA-256 of the network's actual tensors
  (:func:`weights_digest`, with the model card's architecture where a Segmenter runs it), the
  patch, the batch, the input channels, the exporting torch version and the graph file's own
  SHA-256; otherwise it is rebuilt. Instance norms are exported as
  :class:`PooledInstanceNorm` (the same arithmetic, reduced one axis at a time): OpenVINO's
  merged per-channel reduction drifted by up to 1e-2 in probability on tiles with padding. A
  decoder's convolution of a concatenation is split into one convolution per part, summed, for
  OpenVINO (:func:`split_concatenated_convolutions`), and a strided transposed convolution to one
  or two classes is computed as one convolution per output phase, stacked (:class:`PhaseStackedConvTranspose`).
  With ONNX Runtime, a call with fewer tiles than the fixed batch runs them one at a time through a
  second graph exported for one tile when first needed and cached under its own key (it cannot reshape
  a session).
- ``auto``: OpenVINO, else ONNX Runtime on the CPU, torch on CUDA; any backend that cannot serve
  the run (not installed, CUDA, Monte-Carlo dropout, an export failure) falls back to torch with
  the reason logged.

Precision (CPU only; CUDA runs float16 autocast as before): ``float32`` by default. ``bfloat16``
runs the convolutions in bfloat16 with float32 accumulation (OpenVINO's inference precision hint,
or torch's CPU autocast) on CPUs with native bfloat16 (AMX or AVX512-BF16), several times faster;
bfloat16 keeps 8 significant bits, so probabilities move by up to a few percent and near-tie voxels
can flip (measured in README). ONNX Runtime's CPU provider has no bfloat16 convolutions, and a
CPU without native bfloat16 runs float32 (logged).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import hashlib
import importlib.metadata
import importlib.util
import itertools
import json
import logging
import os
import platform
import re
import shutil
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, DeepSegError
from ..fileutil import atomic_write_text, default_mode, exclusive_lock

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "openvino", "onnxruntime")
PRECISIONS = ("float32", "bfloat16")
#: the Python package each exported backend needs.
BACKEND_PACKAGES = {"openvino": "openvino", "onnxruntime": "onnxruntime"}
ONNX_OPSET = 17
#: how a network becomes a graph; part of the cache key, so graphs exported another way are rebuilt.
EXPORT_FORMAT = "instance-norm-by-pooling"
#: backends whose graphs get :func:`split_concatenated_convolutions` (ONNX Runtime ran nnU-Net's
#: 32-320 network no faster and the MONAI reference UNet 9 % slower with it).
SPLIT_CONCAT_BACKENDS = ("openvino",)
#: backends whose graphs get narrow transposed convolutions as :class:`PhaseStackedConvTranspose`
#: (measured with OpenVINO only), and the widest output it is used for.
PHASE_STACK_BACKENDS = ("openvino",)
PHASE_STACK_MAX_CHANNELS = 2

TileFunction = Callable[[torch.Tensor], torch.Tensor]
Loaded = TypeVar("Loaded")


#: what exporting for a runtime needs besides the runtime itself: OpenVINO's graph is rewritten with ``onnx``
EXPORT_PACKAGES = {"openvino": ("onnx",)}


def installed(backend: str) -> bool:
    """True when ``backend``'s package, and what its export needs (:data:`EXPORT_PACKAGES`), can be imported
    (torch always). Without them every run would export, fail and fall back to torch."""
    if backend not in BACKEND_PACKAGES:
        return True
    packages = (BACKEND_PACKAGES[backend], *EXPORT_PACKAGES.get(backend, ()))
    return all(importlib.util.find_spec(package) is not None for package in packages)


@dataclass(frozen=True)
class BackendChoice:
    """The backend a run uses, and why (``reason`` explains a fallback or the ``auto`` pick)."""

    name: str
    reason: str


def native_bfloat16() -> bool:
    """True when this CPU computes bfloat16 natively (oneDNN's check: AMX or AVX512-BF16)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def check_precision(backend: str, precision: str) -> None:
    """Refuse an unknown precision, or bfloat16 asked of ONNX Runtime (its CPU provider has none)."""
    if precision not in PRECISIONS:
        raise ConfigError("unknown inference precision", expected=f"one of {list(PRECISIONS)}", found=precision)
    if precision == "bfloat16" and backend == "onnxruntime":
        raise ConfigError(
            "ONNX Runtime's CPU provider has no bfloat16 convolutions",
            expected="--backend openvino, torch or auto with --precision bfloat16",
            found="--backend onnxruntime --precision bfloat16",
            hint="Use --precision float32 with ONNX Runtime.",
        )


def choose_backend(
    requested: str, device: torch.device, needs_stochastic_layers: bool = False, precision: str = "float32"
) -> BackendChoice:
    """Resolve ``requested`` (one of :data:`BACKENDS`) for ``device``; never raises for a fallback."""
    if requested not in BACKENDS:
        raise ConfigError("unknown inference backend", expected=f"one of {list(BACKENDS)}", found=requested)
    check_precision(requested, precision)
    if requested == "torch":
        return BackendChoice("torch", "requested")
    if device.type != "cpu":
        return BackendChoice("torch", f"{device.type} runs PyTorch (exported CPU runtimes are for CPUs)")
    if needs_stochastic_layers:
        return BackendChoice("torch", "Monte-Carlo dropout needs PyTorch's stochastic layers (an exported graph has none)")
    candidates = ["openvino", "onnxruntime"] if requested == "auto" else [requested]
    if precision == "bfloat16":
        candidates = [name for name in candidates if name != "onnxruntime"]
        if not candidates:
            return BackendChoice("torch", "ONNX Runtime has no bfloat16: torch's CPU autocast runs it")
    for name in candidates:
        if installed(name):
            return BackendChoice(name, "fastest installed CPU runtime" if requested == "auto" else "requested")
    missing = " and ".join(candidates)
    return BackendChoice("torch", f"{missing} not installed (pip install deepseg[cpu-fast])")


class BFloat16Tiles:
    """A network run under torch's CPU bfloat16 autocast (float32 logits out)."""

    def __init__(self, net: nn.Module) -> None:
        self.net = net

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            return self.net(tiles).float()


def weights_digest(net: nn.Module) -> str:
    """SHA-256 of the network's current tensors (names, dtypes, shapes, bytes): what an exported graph
    computes. Taken from the weights themselves, never from a card, so a network being trained
    can never be run through a graph exported from an earlier state of it."""
    return tensors_digest(net.state_dict())


def tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """:func:`weights_digest` of a network whose ``state_dict()`` would be ``tensors``, from the tensors alone."""
    digest = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        value = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        # the tensor's own memory, not a bytes copy of it (the same digest)
        digest.update((value.float() if value.dtype == torch.bfloat16 else value).numpy())
    return digest.hexdigest()


class DeferredNetwork:
    """A network that is built the first time something needs it, with the digest of its weights before that.

    A run whose graph is cached (:func:`cached_onnx`) computes every tile in the runtime and never calls the
    network itself, so building it would be wasted: for a model imported from a MONAI bundle, building it
    imports MONAI, 3.3 s and about 0.2 GB of a run here. ``build()`` returns the network, with exactly
    ``tensors`` (named as its ``state_dict()`` names them) loaded; it is called until it succeeds once, and
    raises what building raises (a :class:`~deepseg_core.errors.ModelError` for weights that do not fit).
    """

    def __init__(self, build: Callable[[], nn.Module], tensors: Mapping[str, torch.Tensor]) -> None:
        self._build: Callable[[], nn.Module] | None = build
        self._tensors: Mapping[str, torch.Tensor] | None = tensors
        self._net: nn.Module | None = None
        self._digest: str | None = None
        self._lock = threading.Lock()
        #: what the last attempt to build raised, if it did (the next :meth:`network` tries again)
        self.build_error: Exception | None = None

    @classmethod
    def of(cls, net: nn.Module) -> DeferredNetwork:
        """An already built network (one being trained, say): its digest is always taken from it anew."""
        deferred = cls(lambda: net, {})
        deferred.network()
        return deferred

    @property
    def built(self) -> bool:
        """Whether :meth:`network` has built the network."""
        return self._net is not None

    def network(self) -> nn.Module:
        """The network, built now if it was not yet."""
        with self._lock:
            if self._net is None:
                assert self._build is not None
                try:
                    self._net = self._build()
                except Exception as exc:
                    self.build_error = exc
                    raise
                self.build_error = None
                # the network holds the weights now: the file's copy of them would only double the memory
                self._build, self._tensors = None, None
            return self._net

    def weights_sha256(self) -> str:
        """:func:`weights_digest` of the network as it is now, without building it."""
        with self._lock:
            if self._net is not None:
                return weights_digest(self._net)
            if self._digest is None:
                assert self._tensors is not None
                self._digest = tensors_digest(self._tensors)
            return self._digest

    def then(self, transform: Callable[[nn.Module], nn.Module], name_prefix: str = "") -> DeferredNetwork:
        """A deferred ``transform(network)``, whose ``state_dict()`` names the same tensors with ``name_prefix``
        in front (a wrapper module registered under that name). Builds nothing now; the result builds this."""
        if self._net is not None:
            return DeferredNetwork.of(transform(self._net))
        assert self._tensors is not None
        tensors = {f"{name_prefix}{name}": value for name, value in self._tensors.items()}
        return DeferredNetwork(lambda: transform(self.network()), tensors)


def network_of(net: nn.Module | DeferredNetwork) -> nn.Module:
    """``net``, built if it is a :class:`DeferredNetwork`."""
    return net.network() if isinstance(net, DeferredNetwork) else net


def input_free_setup(weights_sha256: Callable[[], str], backend: str) -> str:
    """The part of an exported backend's set-up that needs no input image, which a caller can run beside
    the preprocessing: import the runtime (0.09 s for OpenVINO) and return ``weights_sha256()`` (the graph key,
    from the network's weights, :func:`weights_digest`)."""
    try:
        importlib.import_module(BACKEND_PACKAGES[backend])
    except Exception as exc:  # a runtime that will not import: tile_function meets it again and falls back
        log.debug("importing %s beforehand failed: %s", backend, exc)
    return weights_sha256()


def export_key(weights_sha256: str, backend: str, input_shape: tuple[int, ...]) -> dict[str, object]:
    """What a cached graph must match to be used."""
    return {
        "weights_sha256": weights_sha256,
        "backend": backend,
        "input_shape": list(input_shape),
        "torch": torch.__version__,
        "export_format": EXPORT_FORMAT
        + ("+split-concat-conv" if backend in SPLIT_CONCAT_BACKENDS else "")
        + (
            f"+phase-stacked-upsampling-{PHASE_STACK_MAX_CHANNELS}+phase-space-followers-{PHASE_STACK_MAX_CHANNELS}"
            "-grouped-means+channels-last-depth-to-space+shifted-last-convolution"
            if backend in PHASE_STACK_BACKENDS
            else ""
        ),
    }


def normalised(
    x: torch.Tensor,
    mean_of: Callable[[torch.Tensor], torch.Tensor],
    eps: float,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Instance norm of ``x`` ``(B, C, *spatial)`` with the means ``mean_of`` gives (``(B, C, 1, ...)``: over one
    channel's voxels, or over a class's phase channels): biased variance, ``eps`` inside the square root, then
    the affine ``weight`` and ``bias`` (``(C, 1, ...)``, or None)."""
    mean = mean_of(x)
    centred = x - mean
    scale = torch.rsqrt(mean_of(centred * centred) + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    # x * scale + shift, not centred * scale: the runtime then need not keep ``centred`` for a
    # second pass (about 5 % faster on nnU-Net's network at 128^3)
    return x * scale + shift


class PooledInstanceNorm(nn.Module):
    """Instance norm whose per-channel mean and variance average one spatial axis at a time.

    Same result as ``nn.InstanceNorm2d/3d`` (biased variance, ``eps`` inside the square root, the
    affine weights), written with average pools for export. Exported as ``InstanceNormalization``
    (or as means over all axes, which OpenVINO merges back into one reduction), OpenVINO's CPU
    plugin drifts on tiles that are half constant padding: the bundled model's probabilities were
    1.3e-2 from a float64 forward on such a tile (6.5e-5 without padding), ONNX Runtime's 1.2e-3.
    OpenVINO's CPU source shows why: its Reduce node keeps one float32 running sum per channel lane
    over all spatial elements (131 072 on a 32x64x64 tile), its MVN node adds row sums one after
    another into one float32 sum per lane and thread, nothing compensated. Adding the same padded
    value again and again rounds the same way every time, so the errors add up instead of
    cancelling. A pool sums at most one axis length, and OpenVINO neither merges pools nor fuses
    them into MVN (its ReduceMerge and MVNFusion passes match ReduceMean only): 9e-6 (OpenVINO)
    and 1e-5 (ONNX Runtime) on that tile. OpenVINO runs the bundled and
    the reference network a little faster this way, nnU-Net's 32-320 network at 128^3 4-6 % slower.

    Input and output: ``(B, C, *spatial)`` with two or three spatial axes.
    """

    def __init__(self, norm: nn.InstanceNorm2d | nn.InstanceNorm3d) -> None:
        super().__init__()
        self.eps = norm.eps
        # The affine weights as plain (C, 1, ...) tensors, which the exporter writes as constants. As
        # parameters or buffers, the TorchScript exporter's deduplication of equal initializers (norms
        # still at their initial ones) left a node naming a dropped one, and ONNX Runtime refused the graph.
        spatial = 3 if isinstance(norm, nn.InstanceNorm3d) else 2
        shape = (-1, *([1] * spatial))
        self.weight = norm.weight.detach().clone().reshape(shape) if norm.affine else None
        self.bias = norm.bias.detach().clone().reshape(shape) if norm.affine else None

    @staticmethod
    def spatial_mean(x: torch.Tensor) -> torch.Tensor:
        """``(B, C, *spatial)`` -> ``(B, C, 1, ...)``: the mean over the spatial axes, last axis first."""
        spatial = x.shape[2:]
        pool = torch.nn.functional.avg_pool3d if len(spatial) == 3 else torch.nn.functional.avg_pool2d
        for axis in reversed(range(len(spatial))):
            window = [1] * len(spatial)
            window[axis] = int(spatial[axis])
            x = pool(x, window)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return normalised(x, self.spatial_mean, self.eps, self.weight, self.bias)


class PhaseStackedConvTranspose(nn.Module):
    """A strided transposed convolution computed as one convolution whose output channels are the
    ``s^d`` output phases, then depth-to-space: the same sums, in another order.

    Output voxel ``o = s * m + r`` of a transposed convolution (stride ``s``, kernel ``K``, padding
    ``p``) receives input voxel ``m + t`` through kernel tap ``k = r + p - s * t``, for the ``t``
    that keep ``k`` inside the kernel. So each phase ``r`` is an ordinary convolution of the input
    with a few of the kernel's taps (``K = 3, s = 2, p = 1``: tap 1 for even outputs, taps 2 and 0
    of input voxels ``m`` and ``m + 1`` for odd ones). Stacking the phases as output channels makes
    one convolution with ``s^d`` times the channels; reshaping and transposing them puts each phase
    at its voxels.

    Why: a segmentation head's transposed convolution to 1 or 2 classes (MONAI's UNet for binary
    tasks, the spleen bundle) runs badly vectorised in OpenVINO's CPU plugin, whose kernels block
    output channels by the vector width. On an AVX2 CPU, 32 -> 2 channels at 48^3 -> 96^3, a batch of
    two: 87 ms as a transposed convolution, 51 ms this way; 32 -> 1: 56 ms and 16 ms. With 4 output
    channels the two were even, with 8 this way took twice as long; hence only narrow outputs
    (:data:`PHASE_STACK_MAX_CHANNELS`). Probabilities move by float32 rounding only (5e-6).

    Input ``(B, C_in, *spatial)`` with two or three spatial axes, output as ``transposed`` gives.
    """

    def __init__(self, transposed: nn.ConvTranspose2d | nn.ConvTranspose3d) -> None:
        super().__init__()
        dims = len(transposed.kernel_size)
        kernel, stride, padding = transposed.kernel_size, transposed.stride, transposed.padding
        self.stride, self.padding, self.kernel = stride, padding, kernel
        self.output_padding = transposed.output_padding
        # per axis, the input offsets t (relative to m) that some phase reads: lowest and highest
        self.offsets = []
        for axis in range(dims):
            used = [
                t
                for r in range(stride[axis])
                for t in range(-kernel[axis], kernel[axis] + 1)
                if 0 <= r + padding[axis] - stride[axis] * t < kernel[axis]
            ]
            self.offsets.append((min(used), max(used)))
        taps = [high - low + 1 for low, high in self.offsets]
        source = transposed.weight.detach()  # (C_in, C_out, *kernel)
        weight = torch.zeros(*stride, transposed.out_channels, transposed.in_channels, *taps, dtype=source.dtype)
        for phase in itertools.product(*(range(n) for n in stride)):
            for window in itertools.product(*(range(n) for n in taps)):
                k = [phase[a] + padding[a] - stride[a] * (self.offsets[a][0] + window[a]) for a in range(dims)]
                if all(0 <= k[a] < kernel[a] for a in range(dims)):
                    weight[(*phase, slice(None), slice(None), *window)] = source[(slice(None), slice(None), *k)].T
        phases = int(np.prod(stride))
        # output channel = class * phases + phase (class major), so depth-to-space is one reshape
        weight = weight.movedim(dims, 0).reshape(transposed.out_channels * phases, transposed.in_channels, *taps)
        convolution = (nn.Conv2d if dims == 2 else nn.Conv3d)(
            transposed.in_channels, weight.shape[0], taps, bias=transposed.bias is not None
        )
        convolution.weight.data = weight.contiguous()
        if transposed.bias is not None:
            convolution.bias.data = transposed.bias.detach().repeat_interleave(phases)
        self.convolution = convolution

    def phase_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
        """The output phases stacked as channels, before depth-to-space.

        Returns ``(phases, size, phase_size)``: ``phases`` is ``(B, C_out * s^d, *phase_size)``, channel
        ``class * s^d + phase`` (phases in row-major order of the strides); ``size`` the transposed
        convolution's output size, at most ``phase_size * stride`` along each axis."""
        spatial = x.shape[2:]
        dims = len(spatial)
        size = [
            (spatial[a] - 1) * self.stride[a] - 2 * self.padding[a] + self.kernel[a] + self.output_padding[a] for a in range(dims)
        ]
        phase_size = [-(-size[a] // self.stride[a]) for a in range(dims)]  # m = 0 .. ceil(size / s) - 1
        pad: list[int] = []
        for a in reversed(range(dims)):  # F.pad lists the last axis first
            low, high = self.offsets[a]
            before = max(0, -low)
            # output index m + max(0, low) reads input m + low .. m + high; zeros beyond the input
            after = max(0, phase_size[a] + max(0, low) + high - low - spatial[a] - before)
            pad += [before, after]
        y = self.convolution(torch.nn.functional.pad(x, pad))
        y = y[
            (
                slice(None),
                slice(None),
                *(slice(max(0, low), max(0, low) + n) for (low, _), n in zip(self.offsets, phase_size, strict=True)),
            )
        ]
        return y, size, phase_size

    def cropped(self, size: list[int], phase_size: list[int]) -> bool:
        """Whether depth-to-space gives more voxels than the output ``size`` along some axis (the last
        phases are then cut short, and the phases do not all keep the same number of voxels)."""
        return any(n != phase_size[a] * self.stride[a] for a, n in enumerate(size))

    def depth_to_space(
        self, y: torch.Tensor, size: list[int], phase_size: list[int], shift: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """``(B, C * s^d, *phase_size)`` phases -> ``(B, C, *size)``: each phase at its voxels. ``shift``: the
        phases lie on a grid shifted by ``c`` voxels along each axis with ``c > 0``, one coarse voxel longer there
        (:class:`PhaseSpaceConvolution`); its first ``c`` full-resolution voxels are dropped."""
        dims = len(phase_size)
        shift = shift if shift is not None else (0,) * dims
        phase_size = [n + 1 if c > 0 else n for n, c in zip(phase_size, shift, strict=True)]
        # the channels from the tensor: phase-space followers (PhaseStackedUpsampling) may change their number
        channels = int(y.shape[1]) // int(np.prod(self.stride))
        # Channels last first: OpenVINO's CPU plugin keeps narrow tensors channels last internally, so this
        # transpose costs nothing there, where reshaping channels first made it reorder the whole tensor to planar
        # before transposing (4.0 ms of 5.6 for the reference MONAI UNet's batch of two 96^3 tiles on a Zen 5).
        y = y.permute(0, *range(2, 2 + dims), 1)
        # -1, not the traced batch: the exported graph does not fix the batch it was traced with
        y = y.reshape(-1, *phase_size, channels, *self.stride)
        # (B, m_0, .., m_d, C, s_0, .., s_d) -> (B, C, m_0, s_0, .., m_d, s_d)
        y = y.permute(0, 1 + dims, *itertools.chain.from_iterable((1 + a, 2 + dims + a) for a in range(dims)))
        y = y.reshape(-1, channels, *(phase_size[a] * self.stride[a] for a in range(dims)))
        if self.cropped(size, phase_size):
            y = y[(slice(None), slice(None), *(slice(c, c + n) for n, c in zip(size, shift, strict=True)))]
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.depth_to_space(*self.phase_outputs(x))


#: modules that act on each voxel alone, the same way on every voxel of a channel (dropout: in eval)
ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Identity,
    nn.Dropout,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.PReLU,
)


class PhaseStackedUpsampling(nn.Module):
    """A narrow strided transposed convolution and the instance norm and activations after it, run on
    the stacked output phases; depth-to-space comes last.

    The same arithmetic as ``transposed`` followed by ``after`` (in order), where ``after`` holds at
    most one instance norm that uses the tile's own statistics and modules of
    :data:`ELEMENTWISE_MODULES`. A class's mean and variance are the averages over its ``s^d`` phase
    channels of each phase's spatial mean (:meth:`PooledInstanceNorm.spatial_mean`; every phase has
    the same number of voxels), and a per-channel PReLU weight is repeated over the class's phases.

    Why: after :class:`PhaseStackedConvTranspose`, the norm and activation of a 2-class output ran on
    2-channel tensors, which OpenVINO's CPU plugin stores in blocks of 8 channels, with a layout
    reorder before and after; on the stacked phases (16 channels) they need neither. With the
    reference MONAI UNet's last up-sampling (32 -> 2 at 48^3 -> 96^3) done this way, OpenVINO took
    0.377 s instead of 0.397 s per batch of two 96^3 tiles on an AVX2 CPU (README). Where the output
    is cropped (``phase_size * s`` longer than the output along an axis), the phases do not all keep
    the same number of voxels, and the norm and activations run after depth-to-space.

    Input ``(B, C_in, *spatial)``, output as ``transposed`` then ``after`` give.
    """

    def __init__(self, transposed: nn.ConvTranspose2d | nn.ConvTranspose3d, after: list[nn.Module]) -> None:
        super().__init__()
        self.stacked = PhaseStackedConvTranspose(transposed)
        self.phases = int(np.prod(self.stacked.stride))
        dims = len(transposed.kernel_size)
        # the originals run after depth-to-space where the output is cropped, their phase-space forms otherwise
        self.after = nn.ModuleList(PooledInstanceNorm(m) if _own_statistics_norm(m) else m for m in after)
        self.phase_after = nn.ModuleList(
            PhaseSpaceNorm(m, self.phases)
            if isinstance(m, PooledInstanceNorm)
            else PhaseSpacePReLU(m, self.phases, dims)
            if isinstance(m, nn.PReLU) and m.num_parameters > 1
            else m
            for m in self.after
        )
        # modules that followed this block in the network, moved here by continue_in_phase_space: the
        # originals (run after depth-to-space where the output is cropped) and their phase-space forms
        self.followers = nn.ModuleList()
        self.phase_followers = nn.ModuleList()
        # the last follower's phase-space form with its output on a shifted grid, where that reads fewer coarse
        # voxels (_shifted_tail); it then runs instead of phase_followers[-1]
        self.shifted_tail: nn.Module | None = None
        self.shift: tuple[int, ...] | None = None

    def continue_in_phase_space(self, followers: list[nn.Module]) -> int:
        """Take over the leading ``followers`` (the modules that run after this block, in order) that have a
        phase-space form (:func:`in_phase_space`), so they run on the stacked phases before depth-to-space;
        returns how many were taken (the caller replaces those by ``nn.Identity``)."""
        taken = 0
        for module in followers:
            if isinstance(module, nn.Identity):
                taken += 1
                continue
            converted = in_phase_space(module, self.stacked.stride)
            if converted is None:
                break
            self.followers.append(module)
            self.phase_followers.append(converted)
            taken += 1
        tail = _shifted_tail(self.followers[-1], self.stacked.stride) if self.followers else None
        self.shifted_tail, self.shift = tail if tail is not None else (None, None)
        return taken

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, size, phase_size = self.stacked.phase_outputs(x)
        if self.stacked.cropped(size, phase_size):
            y = self.stacked.depth_to_space(y, size, phase_size)
            for module in [*self.after, *self.followers]:
                y = module(y)
            return y
        followers = list(self.phase_followers)
        if self.shifted_tail is not None:
            followers[-1] = self.shifted_tail
        for module in [*self.phase_after, *followers]:
            y = module(y)
        return self.stacked.depth_to_space(y, size, phase_size, self.shift)


class PhaseSpaceConvolution(nn.Module):
    """A stride-1 convolution with "same" zero padding, applied to the full-resolution image that a
    phase-stacked tensor holds, computed on the phases: input ``(B, C * s^d, *phase_size)``, channel
    ``class * s^d + phase`` as :class:`PhaseStackedConvTranspose` stacks them; output the same, or with
    ``shift`` on a shifted grid (below).

    Full-resolution voxel ``o = s * m + r`` reads voxel ``o + k - p`` through tap ``k``; that voxel is
    phase ``q = (r + k - p) mod s`` of coarse voxel ``m + floor((r + k - p) / s)``. So output phase ``r``
    is a convolution over all input phases at coarse offsets ``floor(-p / s) .. floor((s - 1 + K - 1 - p) / s)``
    (``K = 3, p = 1, s = 2``: -1 .. 1), with tap ``k = s * t + q - r + p`` where that is inside the kernel and
    zero elsewhere. Zeros beyond the coarse grid are zeros beyond the full-resolution one, as every phase
    has ``phase_size`` voxels (the block is not cropped). The weights hold ``s^d`` times more multiplications
    than the convolution, most by zero, but ``s^d`` times the channels, which OpenVINO's CPU plugin
    vectorises where 1 or 2 channels at full resolution run at a tenth of its speed (README).

    ``shift`` ``c`` (per axis, ``0 <= c < s``) puts output phase ``r`` of coarse voxel ``m`` at full-resolution
    voxel ``s * m + r - c`` instead, on ``phase_size + 1`` coarse voxels along a shifted axis (its first ``c``
    and last ``s - c`` full-resolution voxels lie outside the image:
    :meth:`PhaseStackedConvTranspose.depth_to_space` crops them). The offsets become
    ``floor((-c - p) / s) .. floor((s - 1 - c + K - 1 - p) / s)``: for ``K = 3, s = 2``, ``c = 1`` reads two
    coarse voxels instead of three, 8 instead of 27 taps in 3D (:func:`fewest_taps_shift`).
    ``plus_identity``: the convolution plus its input (a residual unit's identity branch), as 1 added to the
    centre tap of each channel's own weights; needs as many channels out as in.
    """

    def __init__(
        self,
        convolution: nn.Conv2d | nn.Conv3d,
        stride: tuple[int, ...],
        shift: tuple[int, ...] | None = None,
        plus_identity: bool = False,
    ) -> None:
        super().__init__()
        dims = len(stride)
        kernel, padding = convolution.kernel_size, convolution.padding
        self.shift = tuple(shift) if shift is not None else (0,) * dims
        if not all(0 <= c < s for c, s in zip(self.shift, stride, strict=True)):
            raise ValueError(f"each shift must be in [0, stride): found {self.shift} for stride {tuple(stride)}")
        if plus_identity and any(2 * p != k - 1 for p, k in zip(padding, kernel, strict=True)):
            raise ValueError(f"plus_identity needs the centre tap at the padding: kernel {kernel}, padding {padding}")
        phases = list(itertools.product(*(range(n) for n in stride)))
        low, high = zip(*(_coarse_offsets(kernel[a], padding[a], stride[a], self.shift[a]) for a in range(dims)), strict=True)
        taps = [high[a] - low[a] + 1 for a in range(dims)]
        source = convolution.weight.detach().clone()  # (C_out, C_in, *kernel)
        out_channels, in_channels = source.shape[:2]
        if plus_identity:
            if out_channels != in_channels:
                raise ValueError(f"plus_identity needs as many channels out as in, found {out_channels} and {in_channels}")
            for channel in range(out_channels):
                source[(channel, channel, *padding)] += 1.0
        weight = torch.zeros(out_channels, len(phases), in_channels, len(phases), *taps, dtype=source.dtype)
        for r_index, r in enumerate(phases):
            for q_index, q in enumerate(phases):
                for window in itertools.product(*(range(n) for n in taps)):
                    k = [stride[a] * (low[a] + window[a]) + q[a] - r[a] + self.shift[a] + padding[a] for a in range(dims)]
                    if all(0 <= k[a] < kernel[a] for a in range(dims)):
                        weight[(slice(None), r_index, slice(None), q_index, *window)] = source[(slice(None), slice(None), *k)]
        self.convolution = (nn.Conv2d if dims == 2 else nn.Conv3d)(
            in_channels * len(phases), out_channels * len(phases), taps, bias=convolution.bias is not None
        )
        self.convolution.weight.data = weight.reshape(out_channels * len(phases), in_channels * len(phases), *taps)
        if convolution.bias is not None:
            self.convolution.bias.data = convolution.bias.detach().repeat_interleave(len(phases))
        # a shifted axis has one more output voxel, so reads one more coarse voxel at its end
        self.pad = [n for a in reversed(range(dims)) for n in (-low[a], high[a] + (self.shift[a] > 0))]  # last axis first

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.convolution(torch.nn.functional.pad(y, self.pad))


def _coarse_offsets(kernel: int, padding: int, stride: int, shift: int) -> tuple[int, int]:
    """Along one axis, the lowest and highest coarse offset a :class:`PhaseSpaceConvolution` with ``shift`` reads:
    ``floor((-c - p) / s)`` and ``floor((s - 1 - c + K - 1 - p) / s)``."""
    return (-shift - padding) // stride, (stride - 1 - shift + kernel - 1 - padding) // stride


def fewest_taps_shift(kernel: tuple[int, ...], padding: tuple[int, ...], stride: tuple[int, ...]) -> tuple[int, ...]:
    """Per axis, the output shift ``c`` (:class:`PhaseSpaceConvolution`) whose phase-space convolution reads the
    fewest coarse voxels; 0 where none reads fewer than no shift."""

    def taps(axis: int, c: int) -> int:
        low, high = _coarse_offsets(kernel[axis], padding[axis], stride[axis], c)
        return high - low + 1

    return tuple(min(range(stride[a]), key=lambda c, a=a: (taps(a, c), c)) for a in range(len(stride)))


def phase_group_mean(y: torch.Tensor, phases: int) -> torch.Tensor:
    """``(B, C * s^d, *phase_size)`` -> ``(B, C * s^d, 1, ...)``: each class's mean over all its phases' voxels
    (every phase has the same number of voxels), repeated on each of its phase channels: the phases' spatial
    means averaged by a 1 x 1 convolution with 1 / s^d in each class's block."""
    classes, ones = int(y.shape[1]) // phases, [1] * (y.dim() - 2)
    group = torch.kron(torch.eye(classes), torch.full((phases, phases), 1.0 / phases)).reshape(classes * phases, -1, *ones)
    convolution = torch.nn.functional.conv3d if y.dim() == 5 else torch.nn.functional.conv2d
    return convolution(PooledInstanceNorm.spatial_mean(y), group.to(y.dtype))


class PhaseSpaceNorm(nn.Module):
    """An instance norm that normalises by the tile's own statistics, on a phase-stacked tensor: each class's
    mean and variance over all its phases (:func:`phase_group_mean`), its affine weights repeated per phase."""

    def __init__(self, norm: nn.InstanceNorm2d | nn.InstanceNorm3d | PooledInstanceNorm, phases: int) -> None:
        super().__init__()
        pooled = norm if isinstance(norm, PooledInstanceNorm) else PooledInstanceNorm(norm)
        self.eps, self.phases = pooled.eps, phases
        self.weight = None if pooled.weight is None else pooled.weight.repeat_interleave(phases, dim=0)
        self.bias = None if pooled.bias is None else pooled.bias.repeat_interleave(phases, dim=0)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return normalised(y, lambda x: phase_group_mean(x, self.phases), self.eps, self.weight, self.bias)


class PhaseSpacePReLU(nn.Module):
    """A PReLU with one weight per channel, on a phase-stacked tensor: each weight repeated per phase."""

    def __init__(self, prelu: nn.PReLU, phases: int, dims: int) -> None:
        super().__init__()
        self.weight = prelu.weight.detach().repeat_interleave(phases).reshape(-1, *([1] * dims))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return torch.where(y >= 0, y, y * self.weight)


class PhaseSpaceResidual(nn.Module):
    """MONAI's ``ResidualUnit`` (``conv(x) + residual(x)``) with both branches in phase space."""

    def __init__(self, convolutions: nn.Module, residual: nn.Module) -> None:
        super().__init__()
        self.convolutions, self.residual = convolutions, residual

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.convolutions(y) + self.residual(y)


def _monai_residual_unit(module: nn.Module) -> bool:
    """MONAI's ``ResidualUnit``, whose forward is ``self.conv(x) + self.residual(x)`` (checked against its source)."""
    kind = type(module)
    return kind.__name__ == "ResidualUnit" and kind.__module__.startswith("monai.") and hasattr(module, "residual")


def _same_size_convolution(module: nn.Module, dims: int) -> bool:
    """A dense stride-1 convolution with symmetric zero padding that keeps the image's size, of at most
    :data:`PHASE_STACK_MAX_CHANNELS` channels in and out: on the phases it multiplies ``s^d`` times more
    (mostly by zero), which pays only where so few channels ran badly vectorised at full resolution. The
    exact class, not a subclass, whose forward may do more than its weights say."""
    return (
        type(module) is (nn.Conv2d if dims == 2 else nn.Conv3d)
        and max(module.in_channels, module.out_channels) <= PHASE_STACK_MAX_CHANNELS
        and module.groups == 1
        and isinstance(module.padding, tuple)
        and module.padding_mode == "zeros"
        and all(s == 1 for s in module.stride)
        and all(d == 1 for d in module.dilation)
        and all(2 * p == k - 1 for p, k in zip(module.padding, module.kernel_size, strict=True))
    )


def in_phase_space(module: nn.Module, stride: tuple[int, ...]) -> nn.Module | None:
    """``module``'s form for phase-stacked tensors of ``stride`` (:class:`PhaseStackedConvTranspose`'s channel
    order), or None where it has none: stride-1 "same" convolutions, own-statistics instance norms,
    :data:`ELEMENTWISE_MODULES`, plain sequentials of these and MONAI's ``ResidualUnit`` of these."""
    dims, phases = len(stride), int(np.prod(stride))
    kind = type(module)  # exact classes: a subclass's forward may do more than its weights say
    if _same_size_convolution(module, dims):
        return PhaseSpaceConvolution(module, stride)
    if (kind in (nn.InstanceNorm2d, nn.InstanceNorm3d) and _own_statistics_norm(module)) or kind is PooledInstanceNorm:
        return PhaseSpaceNorm(module, phases)
    if kind is nn.PReLU and module.num_parameters > 1:
        return PhaseSpacePReLU(module, phases, dims)
    if kind in ELEMENTWISE_MODULES:
        return module
    if _plain_sequential(module):
        parts = [in_phase_space(child, stride) for child in module.children()]
        return None if any(part is None for part in parts) else nn.Sequential(*parts)
    if _monai_residual_unit(module):
        convolutions, residual = in_phase_space(module.conv, stride), in_phase_space(module.residual, stride)
        return None if convolutions is None or residual is None else PhaseSpaceResidual(convolutions, residual)
    return None


def _non_identity_children(module: nn.Module) -> list[nn.Module]:
    """``module``'s children that are not ``nn.Identity`` (the places of modules moved elsewhere), in order."""
    return [child for child in module.children() if not isinstance(child, nn.Identity)]


def _only_module(module: nn.Module) -> nn.Module:
    """``module``, or the one non-identity child of a plain sequential that has one, at any depth."""
    while _plain_sequential(module):
        children = _non_identity_children(module)
        if len(children) != 1:
            return module
        module = children[0]
    return module


def _shifted_convolution(
    convolution: nn.Conv2d | nn.Conv3d, stride: tuple[int, ...], plus_identity: bool
) -> tuple[PhaseSpaceConvolution, tuple[int, ...]] | None:
    shift = fewest_taps_shift(convolution.kernel_size, convolution.padding, stride)
    return (PhaseSpaceConvolution(convolution, stride, shift, plus_identity), shift) if any(shift) else None


def _shifted_tail(module: nn.Module, stride: tuple[int, ...]) -> tuple[nn.Module, tuple[int, ...]] | None:
    """``module``'s phase-space form with its output on the grid shifted by ``shift`` (:class:`PhaseSpaceConvolution`),
    and that shift, where its last step is a same-size convolution that reads fewer coarse voxels so: the
    convolution itself, a plain sequential ending in one, or MONAI's ``ResidualUnit`` of one convolution and an
    identity branch (folded into the weights). None otherwise.

    Why: MONAI's UNet ends in a 2 -> 2 channel 3^3 convolution with an identity branch after its last up-sampling.
    On the phases it read 27 taps of 16 channels; on the shifted grid it reads 8 (a 2^3 kernel), and the identity
    branch costs no addition. For the reference UNet's batch of two 96^3 tiles on an AMD EPYC (Zen 5), OpenVINO's
    own timers gave 3.3 ms for the shifted convolution and 1.0 ms for the crop, against 7.7 ms for the
    convolution and 0.7 ms for the addition before; its sliding window took 0.650 s instead of 0.713 s (medians
    of five turns, README). Only the last step before depth-to-space can be shifted, since depth-to-space is where
    the grid is cropped back."""
    dims = len(stride)
    if _same_size_convolution(module, dims):
        return _shifted_convolution(module, stride, plus_identity=False)
    if _plain_sequential(module):
        children = _non_identity_children(module)
        tail = _shifted_tail(children[-1], stride) if children else None
        head = [in_phase_space(child, stride) for child in children[:-1]]
        if tail is None or any(part is None for part in head):
            return None
        return nn.Sequential(*head, tail[0]), tail[1]
    if _monai_residual_unit(module) and type(module.residual) is nn.Identity:
        convolution = _only_module(module.conv)
        if _same_size_convolution(convolution, dims) and convolution.in_channels == convolution.out_channels:
            return _shifted_convolution(convolution, stride, plus_identity=True)
    return None


def _trailing_upsampling(module: nn.Module) -> PhaseStackedUpsampling | None:
    """The :class:`PhaseStackedUpsampling` whose output is ``module``'s output, if any: ``module`` itself, or
    the last non-identity child of a plain sequential, at any depth."""
    if isinstance(module, PhaseStackedUpsampling):
        return module
    if not _plain_sequential(module):
        return None
    children = _non_identity_children(module)
    return _trailing_upsampling(children[-1]) if children else None


def _continue_in_phase_space(net: nn.Module) -> None:
    """Move, in place, the modules that follow each :class:`PhaseStackedUpsampling` in a plain sequential and
    have a phase-space form into it (they become ``nn.Identity`` where they were); innermost sequentials first,
    so a block that took all its followers passes on to the sequential around it.

    Why: the reference MONAI UNet (and the spleen bundle's) ends in a 2 -> 2 channel convolution at full
    resolution after its last up-sampling, which OpenVINO's CPU plugin ran at 22 GFLOP/s, with layout reorders
    around the depth-to-space before it. On the phases, that network's sliding window took 0.79 s instead of
    0.87 s on an AMD EPYC (Zen 5) (medians of five runs of ``Testing/Benchmarks/bench_sliding_window.py``,
    README)."""
    for parent in reversed(list(net.modules())):
        if not _plain_sequential(parent):
            continue
        children = list(parent.named_children())
        for index, (_, child) in enumerate(children):
            upsampling = _trailing_upsampling(child)
            if upsampling is None:
                continue
            followers = children[index + 1 :]
            taken = upsampling.continue_in_phase_space([module for _, module in followers])
            for name, _ in followers[:taken]:
                setattr(parent, name, nn.Identity())


def _phase_stackable(module: nn.Module) -> bool:
    return (
        isinstance(module, (nn.ConvTranspose2d, nn.ConvTranspose3d))
        and module.out_channels <= PHASE_STACK_MAX_CHANNELS
        and module.groups == 1
        and all(d == 1 for d in module.dilation)
        and any(s > 1 for s in module.stride)
        and module.padding_mode == "zeros"
        and isinstance(module.padding, tuple)
    )


def _own_statistics_norm(module: nn.Module) -> bool:
    """An instance norm that normalises by the tile's own statistics (not by running ones)."""
    return isinstance(module, (nn.InstanceNorm2d, nn.InstanceNorm3d)) and not module.track_running_stats


def _plain_sequential(module: nn.Module) -> bool:
    """An ``nn.Sequential`` (or subclass) that runs its children in order and nothing else."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _fusable_after(module: nn.Module) -> list[nn.Module] | None:
    """``module`` as the modules a :class:`PhaseStackedUpsampling` can run on the phases, else None:
    one of them, or a plain sequential of them (MONAI's ADN), with at most one instance norm."""
    parts = list(module.children()) if _plain_sequential(module) else [module]
    if not parts or not all(_own_statistics_norm(m) or isinstance(m, ELEMENTWISE_MODULES) for m in parts):
        return None
    if sum(_own_statistics_norm(m) for m in parts) > 1 or any(next(m.children(), None) is not None for m in parts):
        return None
    return parts


def _stack_phases(net: nn.Module) -> None:
    """Replace, in place, each phase-stackable transposed convolution of ``net``: together with the
    norm and activations that follow it in a plain sequential by :class:`PhaseStackedUpsampling`
    (the followers become ``nn.Identity``), else alone by :class:`PhaseStackedConvTranspose`."""
    for parent in list(net.modules()):
        children = list(parent.named_children())
        for index, (name, child) in enumerate(children):
            if not _phase_stackable(child):
                continue
            after = None
            if _plain_sequential(parent) and index + 1 < len(children):
                after = _fusable_after(children[index + 1][1])
            if after is None:
                setattr(parent, name, PhaseStackedConvTranspose(child))
                continue
            setattr(parent, name, PhaseStackedUpsampling(child, after))
            setattr(parent, children[index + 1][0], nn.Identity())
    _continue_in_phase_space(net)


def exportable(net: nn.Module, backend: str | None = None) -> nn.Module:
    """A copy of ``net`` for export to ``backend``: every 2D/3D instance norm that normalises by the tile's
    own statistics replaced by :class:`PooledInstanceNorm`; for the backends of :data:`PHASE_STACK_BACKENDS`
    each strided transposed convolution to at most :data:`PHASE_STACK_MAX_CHANNELS` channels by
    :class:`PhaseStackedUpsampling` (with the norm and activations right after it) or
    :class:`PhaseStackedConvTranspose` (``net`` itself is left as it is; no backend: the norms only)."""
    copy_of_net = copy.deepcopy(net).eval().cpu()
    if backend in PHASE_STACK_BACKENDS:
        _stack_phases(copy_of_net)
    for parent in list(copy_of_net.modules()):
        for name, child in list(parent.named_children()):
            if _own_statistics_norm(child):
                setattr(parent, name, PooledInstanceNorm(child))
    return copy_of_net


def split_concatenated_convolutions(graph: Path) -> int:
    """Rewrite each ``Conv(Concat(a, b, ...))`` over channels in the ONNX file ``graph`` as ``Conv(a) + Conv(b) + ...``.

    A U-Net decoder concatenates the upsampled features with the skip connection and convolves the
    result. Convolving each part with its slice of the weights (input channels) and adding gives the
    same logits up to float32 rounding (2e-5 on nnU-Net's 32-320 network) without writing the
    concatenated tensor, and OpenVINO adds the second convolution's output into the first's as it
    computes it: 4 % faster per 128^3 tile on that network. Only a concatenation along axis 1 whose
    sole consumer is a convolution with one group and constant weights is rewritten (its bias, if
    any, goes to the first part). Where a transposed convolution takes the concatenation (MONAI's
    UNet), splitting it made OpenVINO 1.5 % slower, so it is left alone; ONNX Runtime gets the graph
    as exported (:data:`SPLIT_CONCAT_BACKENDS`).

    Returns:
        How many convolutions were rewritten (the file is left as it was when none).
    """
    import onnx
    from onnx import helper, numpy_helper, shape_inference

    model = onnx.load(str(graph))
    nodes = list(model.graph.node)
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for node in nodes for a in node.attribute):
        return 0  # uses inside If / Loop bodies are not counted below: leave such graphs alone
    inferred = shape_inference.infer_shapes(model).graph
    channels: dict[str, int] = {}
    ranks: dict[str, int] = {}
    for value in [*inferred.input, *inferred.value_info, *inferred.output]:
        dims = value.type.tensor_type.shape.dim
        ranks[value.name] = len(dims)
        if len(dims) > 1 and dims[1].HasField("dim_value"):
            channels[value.name] = int(dims[1].dim_value)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    graph_inputs = {value.name for value in model.graph.input}
    graph_outputs = {value.name for value in model.graph.output}
    uses: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    producer = {output: node for node in nodes for output in node.output}
    taken = {*initializers, *graph_inputs, *graph_outputs, *producer, *uses, *(node.name for node in nodes)}

    def fresh(name: str) -> str:
        """``name``, or ``name`` with a counter, not yet used by any tensor or node of the graph."""
        candidate, count = name, 0
        while candidate in taken:
            count += 1
            candidate = f"{name}_{count}"
        taken.add(candidate)
        return candidate

    def attribute(node: onnx.NodeProto, name: str, default: int) -> int:
        return next((int(helper.get_attribute_value(a)) for a in node.attribute if a.name == name), default)

    def channel_axis(concat: onnx.NodeProto) -> bool:
        axis, rank = attribute(concat, "axis", 0), ranks.get(concat.input[0], 0)
        return rank > 1 and (axis if axis >= 0 else axis + rank) == 1

    rewritten, dropped, replacement = 0, set(), {}
    for node in nodes:
        concat = producer.get(node.input[0]) if node.op_type == "Conv" and node.input else None
        if (
            concat is None
            or concat.op_type != "Concat"
            or len(concat.input) < 2
            or not channel_axis(concat)
            or uses.get(concat.output[0]) != 1
            or concat.output[0] in graph_outputs
            or attribute(node, "group", 1) != 1
            or node.input[1] not in initializers
            or node.input[1] in graph_inputs  # weights a caller may replace at run time
            or any(part not in channels for part in concat.input)
        ):
            continue
        weight = numpy_helper.to_array(initializers[node.input[1]])
        widths = [channels[part] for part in concat.input]
        if sum(widths) != weight.shape[1]:
            continue
        # names from the convolution's output, which is unique (two convolutions may share weights)
        stem, label = node.output[0], node.name or node.output[0]
        parts, start = [], 0
        for i, (part, width) in enumerate(zip(concat.input, widths, strict=True)):
            name = fresh(f"{stem}__weight_part{i}")
            model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight[:, start : start + width]), name))
            start += width
            inputs = [part, name] + ([node.input[2]] if i == 0 and len(node.input) > 2 and node.input[2] else [])
            parts.append(helper.make_node("Conv", inputs, [fresh(f"{stem}__part{i}")], name=fresh(f"{label}__part{i}")))
            parts[-1].attribute.extend(node.attribute)
        sums, total = [], parts[0].output[0]
        for i, part_conv in enumerate(parts[1:], start=1):
            out = node.output[0] if i == len(parts) - 1 else fresh(f"{stem}__sum{i}")
            sums.append(helper.make_node("Add", [total, part_conv.output[0]], [out], name=fresh(f"{label}__sum{i}")))
            total = out
        replacement[id(node)] = parts + sums
        dropped.add(id(concat))
        uses[node.input[1]] -= 1
        if uses[node.input[1]] == 0:
            model.graph.initializer.remove(initializers.pop(node.input[1]))
        rewritten += 1
    if not rewritten:
        return 0
    del model.graph.node[:]
    for node in nodes:
        if id(node) not in dropped:
            model.graph.node.extend(replacement.get(id(node), [node]))
    onnx.checker.check_model(model)
    onnx.save(model, str(graph))
    return rewritten


def _sha256(handle: BinaryIO) -> str:
    """SHA-256 of an open file from its start, read into one reused 4 MB buffer: no copy of a graph of
    hundreds of MB, and hashlib lets other threads run meanwhile."""
    digest = hashlib.sha256()
    buffer = bytearray(1 << 22)
    view = memoryview(buffer)
    handle.seek(0)
    while count := handle.readinto(buffer):
        digest.update(view[:count])
    return digest.hexdigest()


def _file_identity(stat: os.stat_result) -> dict[str, int]:
    """What a key records of the graph file it was checked against: size and modification time."""
    return {"graph_bytes": int(stat.st_size), "graph_mtime_ns": int(stat.st_mtime_ns)}


def openvino_cache_dir(graph: Path) -> Path:
    """Where OpenVINO keeps the blob it compiled from ``graph``: one folder per graph, emptied whenever the
    graph is written anew. OpenVINO names its blob after the graph's path and the compile options, and
    checks it against the file's size and whole-second modification time only, so a graph exported
    again in the same second as a damaged one was compiled would otherwise get the damaged one's blob."""
    return graph.parent / "openvino" / graph.stem


def _still_names(graph: Path, hashed: os.stat_result) -> bool:
    """Whether the path ``graph`` still names the file that was hashed (another process may replace it)."""
    try:
        now = graph.stat()
    except OSError:
        return False
    return (now.st_ino, now.st_size, now.st_mtime_ns) == (hashed.st_ino, hashed.st_size, hashed.st_mtime_ns)


def _matching_record(path: Path, wanted: dict[str, object]) -> dict[str, Any] | None:
    """The JSON object in ``path`` when its entries include every one of ``wanted``; None when the file is
    missing, unreadable, not JSON, or written for another key."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or {k: record.get(k) for k in wanted} != wanted:
        return None
    return record


def _recorded_key(key_file: Path, wanted: dict[str, object]) -> dict[str, Any] | None:
    """The key file's content when its key is ``wanted`` and it records the graph's checksum; else None."""
    key = _matching_record(key_file, wanted)
    return key if key is not None and isinstance(key.get("graph_sha256"), str) else None


def _load_while_verifying(graph: Path, recorded_sha256: str, load: Callable[[Path], Loaded]) -> tuple[bool, Loaded | None]:
    """``load(graph)`` in a second thread while this one checks the graph's SHA-256 against the key's.

    Returns ``(True, loaded)`` when the file hashed is intact and still the one at ``graph`` after the
    load (another process may replace it meanwhile: then the runtime may have read either, so it
    counts as damaged); ``load``'s exception, if any, is then raised. Otherwise ``(False, None)``,
    whatever ``load`` made of the file. With OpenVINO's blob cache valid, the load does not read the
    graph, and the two overlap fully: 0.14 s instead of 0.16 + 0.18 s for nnU-Net's 120 MB network.
    """
    with graph.open("rb", buffering=0) as handle:
        hashed = os.fstat(handle.fileno())
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepseg-graph-load")
        try:
            loading = pool.submit(load, graph)
            try:
                intact = _sha256(handle) == recorded_sha256
            except OSError:
                intact = False
            failure: Exception | None = None
            loaded = None
            try:
                loaded = loading.result()
            except Exception as exc:  # a damaged graph may well fail to load: raised only for an intact one
                failure = exc
        except BaseException:  # Ctrl-C while hashing: do not wait for the compilation
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=False)
    if not intact or not _still_names(graph, hashed):
        return False, None
    if failure is not None:
        raise failure
    return True, loaded


def _verified(graph: Path, key: dict[str, Any], key_file: Path, load: Callable[[Path], Loaded] | None) -> tuple[bool, Any]:
    """``(True, load(graph) or graph)`` when the cached graph matches its key's checksum, else ``(False, None)``.

    A graph whose size and modification time are those the key recorded is loaded while it is hashed
    (:func:`_load_while_verifying`). Any other (changed since, or a key from before sizes and times
    were recorded) is hashed before a runtime's parser sees a byte of it, and the key then records
    the file as checked."""
    try:
        current = graph.stat()
    except OSError:
        return False, None
    if load is not None and all(key.get(k) == v for k, v in _file_identity(current).items()):
        return _load_while_verifying(graph, key["graph_sha256"], load)
    with graph.open("rb", buffering=0) as handle:
        hashed = os.fstat(handle.fileno())
        if _sha256(handle) != key["graph_sha256"]:
            return False, None
    if _still_names(graph, hashed):
        try:  # best effort: a read-only cache still works, on this slower path
            atomic_write_text(key_file, json.dumps({**key, **_file_identity(hashed)}, indent=2) + "\n")
        except (OSError, DeepSegError):  # DeepSegError: atomic_write_text's check of the folder
            pass
    return True, load(graph) if load is not None else graph


def _cached_and_intact(
    graph: Path, key_file: Path, wanted: dict[str, object], load: Callable[[Path], Loaded] | None
) -> tuple[bool, Any]:
    """:func:`_verified` of the cached graph when it and a key file recording ``wanted`` are there, else
    ``(False, None)``."""
    if not (graph.is_file() and key_file.is_file()):
        return False, None
    key = _recorded_key(key_file, wanted)
    return (False, None) if key is None else _verified(graph, key, key_file, load)


def _graph_paths(
    weights_sha256: str, backend: str, input_shape: tuple[int, ...], cache_dir: Path
) -> tuple[Path, Path, dict[str, object]]:
    """The cached graph and its key file for this network, backend and input shape, and the key itself."""
    key = export_key(weights_sha256, backend, input_shape)
    stem = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return cache_dir / f"{stem}.onnx", cache_dir / f"{stem}.json", key


#: a temporary graph (``.<stem>.<random>.onnx``) older than this was left by a killed export (an
#: export takes seconds to minutes; its file is written last, just before the rename)
ABANDONED_EXPORT_AGE_S = 3600.0
_TEMPORARY_GRAPH = re.compile(r"\.[0-9a-f]{24}\.[a-z0-9_]{8}\.onnx")  # mkstemp's 8 random characters


def remove_abandoned_exports(cache_dir: Path, older_than_s: float = ABANDONED_EXPORT_AGE_S) -> list[Path]:
    """Remove the temporary graphs that exports killed before their rename left in ``cache_dir`` (a
    SIGKILL, the out-of-memory killer, a power cut: each one up to the graph's size, about 120 MB for
    nnU-Net's default network). Those younger than ``older_than_s`` may belong to an export running
    in another process and are kept. Returns the paths removed."""
    removed: list[Path] = []
    now = time.time()
    for leftover in cache_dir.glob(".*.onnx"):
        if not _TEMPORARY_GRAPH.fullmatch(leftover.name):
            continue
        try:
            if now - leftover.stat().st_mtime > older_than_s:
                leftover.unlink()
                removed.append(leftover)
        except OSError:  # gone meanwhile (its export finished or another run removed it), or read-only
            continue
    if removed:
        log.info("removed %d temporary graph(s) left by killed exports in %s", len(removed), cache_dir)
    return removed


#: failures that say nothing about the network (the disk, memory, a runtime that cannot load): never recorded
_TRANSIENT_FAILURES = (OSError, MemoryError, ImportError)
#: words of the RuntimeErrors by which torch, OpenVINO and ONNX Runtime report memory, the disk or a library
#: that will not load ("DefaultCPUAllocator: can't allocate memory", "std::bad_alloc", "Couldn't create
#: directory", "Cannot load library")
_TRANSIENT_WORDS = (
    "memory", "bad_alloc", "allocat", "directory", "no such file", "permission", "no space", "read-only",
    "cannot load", "couldn't create", "failed to create", "disk", "resource temporarily unavailable",
    "too many open files", "timed out", "timeout",
)  # fmt: skip


def _says_something_about_the_network(error: Exception) -> bool:
    """Whether an export or compilation that raised ``error`` would fail again for the same network, torch,
    runtime and precision; not for the disk, memory or a runtime that cannot load (see ``_TRANSIENT_WORDS``)."""
    if isinstance(error, _TRANSIENT_FAILURES):
        return False
    message = str(error).lower()
    return not any(word in message for word in _TRANSIENT_WORDS)


@functools.cache  # read once per process: several lookups per run (record path, key, will_export)
def _runtime_version(backend: str) -> str | None:
    """The installed version of ``backend``'s package; None when its metadata is missing (a build installed
    under another distribution name, such as ``onnxruntime-gpu``)."""
    try:
        return importlib.metadata.version(BACKEND_PACKAGES[backend])
    except importlib.metadata.PackageNotFoundError:
        return None


def _failure_variant(backend: str, precision: str) -> dict[str, object]:
    """What besides the export key a recorded failure must match: the precision, the runtime's version and
    the computer (a compilation can fail on one CPU and not on another that shares the model store)."""
    return {
        "precision": precision,
        "runtime_version": _runtime_version(backend),
        "host": socket.gethostname(),
        "machine": platform.machine(),
    }


def _failure_key(weights_sha256: str, backend: str, input_shape: tuple[int, ...], precision: str) -> dict[str, object]:
    """What a recorded failure must match to be believed (``input_shape``: the graph's, ``(B, C, *patch)``,
    :func:`graph_input_shape`)."""
    return {**export_key(weights_sha256, backend, input_shape), **_failure_variant(backend, precision)}


def failure_record_path(
    weights_sha256: str, backend: str, input_shape: tuple[int, ...], cache_dir: Path, precision: str = "float32"
) -> Path:
    """Where :func:`tile_function` records that ``backend`` could not export or compile this network
    (``input_shape``: the graph's, ``(B, C, *patch)``, :func:`graph_input_shape`): beside its graph, named after
    the graph and a hash of the precision, runtime version and computer, so that environments and computers
    sharing a store keep their own records."""
    graph, _, _ = _graph_paths(weights_sha256, backend, input_shape, cache_dir)
    variant = json.dumps(_failure_variant(backend, precision), sort_keys=True).encode()
    return graph.with_name(f"{graph.stem}.{hashlib.sha256(variant).hexdigest()[:8]}.failed.json")


def recorded_failure(
    weights_sha256: str, backend: str, input_shape: tuple[int, ...], cache_dir: Path, precision: str = "float32"
) -> str | None:
    """Why ``backend`` could not take this network (``input_shape``: the graph's, ``(B, C, *patch)``,
    :func:`graph_input_shape`) when it was last tried on this computer with the same torch, runtime version
    and precision (the error, as :func:`tile_function` recorded it), or None. A run then goes straight to
    torch: exporting again would cost the same seconds to a minute and fail the same way. Another torch or
    runtime version, or removing the record, tries again; so does a runtime whose version is unknown."""
    if _runtime_version(backend) is None:
        return None
    path = failure_record_path(weights_sha256, backend, input_shape, cache_dir, precision)
    record = _matching_record(path, _failure_key(weights_sha256, backend, input_shape, precision))
    return record["error"] if record is not None and isinstance(record.get("error"), str) else None


def graph_cached(weights_sha256: str, backend: str, input_shape: tuple[int, ...], cache_dir: Path) -> bool:
    """Whether :func:`cached_onnx` will find this graph exported already: its key matches and the graph is
    there (its checksum is checked when it is loaded, and a damaged one exported again). A False means the
    next run exports the network first (a forward pass of the tile shape, so seconds to a minute on a CPU)."""
    graph, key_file, wanted = _graph_paths(weights_sha256, backend, input_shape, cache_dir)
    return graph.is_file() and key_file.is_file() and _recorded_key(key_file, wanted) is not None


def cached_onnx(
    net: nn.Module | DeferredNetwork,
    weights_sha256: str,
    backend: str,
    input_shape: tuple[int, ...],
    cache_dir: Path,
    load: Callable[[Path], Loaded] | None = None,
) -> Loaded | Path:
    """The ONNX graph of ``net`` for ``input_shape`` ``(B, C, *patch)``, exported once and cached, or
    what ``load`` makes of it. A :class:`DeferredNetwork` is built only if the graph must be exported.

    The graph and its key (JSON) sit in ``cache_dir``; a graph whose key or own checksum does not
    match is exported again (written to a temporary name, then renamed, its OpenVINO blobs removed),
    unless another process cached an intact one while this export ran: that one is used.
    ``load`` (a runtime session from the graph's path) runs on a cached graph that still has the size
    and time its key recorded while its checksum is checked (:func:`_verified`), and on a graph
    exported anew; what it made of a damaged graph is dropped. Without ``load``: the path.

    One process at a time looks up, exports and loads a given graph (:func:`graph_lock_path`): the
    others wait, then find it cached, and OpenVINO's blob compiled. So torchrun's ranks, or a Segment
    started while a training or an import prepares the same version, do not export and compile the
    same network side by side on the same cores, each for nothing but the first.
    """
    graph, key_file, wanted = _graph_paths(weights_sha256, backend, input_shape, cache_dir)
    remove_abandoned_exports(cache_dir)  # on every lookup: once a graph is cached, its export never runs again

    waited = False

    def waiting() -> None:
        nonlocal waited
        waited = True
        log.info("another process is preparing the %s graph %s: waiting for it", backend, graph.name)
        _announce(GRAPH_WAIT)

    def before_export() -> None:
        if waited:  # the process waited for went away without the graph (killed, or its export failed)
            log.info("the %s graph %s was not prepared by the process waited for: preparing it", backend, graph.name)
            _announce(GRAPH_EXPORT_AFTER_WAIT)

    with exclusive_lock(graph_lock_path(graph), on_wait=waiting):
        return _cached_or_exported(net, backend, input_shape, graph, key_file, wanted, load, before_export)


#: what :func:`announcing_graph_waits`' callable is told: this lookup waits for another process preparing the
#: graph; or, after such a wait, that process went away without it and this one prepares it after all
GRAPH_WAIT = "waiting"
GRAPH_EXPORT_AFTER_WAIT = "preparing"

_GRAPH_WAIT_ANNOUNCER: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar(
    "graph_wait_announcer", default=None
)


@contextlib.contextmanager
def announcing_graph_waits(announce: Callable[[str], None] | None) -> Iterator[None]:
    """Within the block, ``announce(GRAPH_WAIT)`` is called when a graph lookup starts to wait for another
    process that prepares the same graph (:func:`cached_onnx`), so that a status line can say why nothing
    moves, and ``announce(GRAPH_EXPORT_AFTER_WAIT)`` when that process went away without it and this lookup
    prepares it itself (None: not said). An error raised by ``announce`` (a closed pipe) is logged, not raised:
    the lookup goes on."""
    token = _GRAPH_WAIT_ANNOUNCER.set(announce)
    try:
        yield
    finally:
        _GRAPH_WAIT_ANNOUNCER.reset(token)


def _announce(event: str) -> None:
    announce = _GRAPH_WAIT_ANNOUNCER.get()
    if announce is None:
        return
    try:
        announce(event)
    except Exception:  # saying so is not worth the run: the wait or the export goes on
        log.warning("could not announce the graph lookup's %s", event, exc_info=True)


def graph_lock_path(graph: Path) -> Path:
    """The file locked while ``graph`` is looked up, exported or loaded (an empty file, kept)."""
    return graph.parent / "locks" / f"{graph.stem}.lock"


def _cached_or_exported(
    net: nn.Module | DeferredNetwork,
    backend: str,
    input_shape: tuple[int, ...],
    graph: Path,
    key_file: Path,
    wanted: dict[str, object],
    load: Callable[[Path], Loaded] | None,
    before_export: Callable[[], None],
) -> Loaded | Path:
    """:func:`cached_onnx`'s work, under its lock."""
    cache_dir, stem = graph.parent, graph.stem
    intact, loaded = _cached_and_intact(graph, key_file, wanted, load)
    if intact:
        return loaded
    before_export()
    if graph.is_file() and key_file.is_file():
        log.info("cached %s graph %s is stale or damaged: exporting it again", backend, graph.name)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{stem}.", suffix=".onnx", dir=cache_dir)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        example = torch.zeros(input_shape, dtype=torch.float32)
        # The tracer warns about shape checks (constant for a fixed input shape) and instance norm's
        # train flag (instance norm uses the input's statistics in eval too): both expected.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                exportable(network_of(net), backend),
                (example,),
                str(tmp),
                opset_version=ONNX_OPSET,
                dynamo=False,
                input_names=["tiles"],
                output_names=["logits"],
            )
        if backend in SPLIT_CONCAT_BACKENDS:
            split = split_concatenated_convolutions(tmp)
            log.debug("exported %s graph %s: %d convolutions of concatenations split", backend, graph.name, split)
        os.chmod(tmp, default_mode())
        # A process that could not take the lock (an older DeepSeg, a file system without locks) may have
        # exported this graph while this one did and be compiling it: replacing the file would remove the blob
        # it is writing. Its graph is used instead, if intact.
        intact, loaded = _cached_and_intact(graph, key_file, wanted, load)
        if intact:
            log.info("%s graph %s was exported by another process meanwhile: using that one", backend, graph.name)
            tmp.unlink()
            return loaded
        with tmp.open("rb", buffering=0) as handle:
            written = {"graph_sha256": _sha256(handle), **_file_identity(os.fstat(handle.fileno()))}
        shutil.rmtree(openvino_cache_dir(graph), ignore_errors=True)
        os.replace(tmp, graph)  # keeps the file's size and modification time
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    atomic_write_text(key_file, json.dumps({**wanted, **written}, indent=2) + "\n")
    return load(graph) if load is not None else graph


class ExportedTiles:
    """A fixed-shape exported graph as a tile function (torch tensors in and out, on the CPU).

    ``run``: the graph's runner, numpy tiles in, logits out, for exactly ``batch`` tiles; :func:`openvino_tiles`'
    runner (``batch`` 1) takes any number, one request per tile.
    ``reuses_output``: the runtime writes every call's output into the same buffer, so an output is
    valid only until the next call (callers that keep one across calls copy it first).
    ``run_one``: makes (once, when first needed) a runner of the network for one tile. A call with
    fewer tiles than the batch (one small image, each pass of test-time augmentation, the last batch)
    then runs them one at a time instead of computing padded copies: with the bundled model's batch of
    4, one tile took 0.85 s padded and 0.21 s alone. Without it, or when it cannot be made, the batch
    is padded with copies whose outputs are dropped (``padded_calls`` counts such calls).
    """

    def __init__(
        self,
        run: Callable[[np.ndarray], np.ndarray],
        batch: int,
        *,
        reuses_output: bool = False,
        run_one: Callable[[], Callable[[np.ndarray], np.ndarray]] | None = None,
    ) -> None:
        self._run = run
        self.batch = batch
        self.reuses_output = reuses_output
        self._make_run_one = run_one
        self._run_one: Callable[[np.ndarray], np.ndarray] | None = None
        self.padded_calls = 0

    def prepare_single_tile(self) -> bool:
        """Make the single-tile runner now rather than at the first partial batch (ONNX Runtime exports a
        second graph for it); whether there is one (OpenVINO's graph is of one tile and needs none)."""
        return self._single_tile_runner() is not None

    def _single_tile_runner(self) -> Callable[[np.ndarray], np.ndarray] | None:
        if self._run_one is None and self._make_run_one is not None:
            make, self._make_run_one = self._make_run_one, None  # tried once
            try:
                self._run_one = make()
            except Exception as exc:  # a graph the runtime cannot give another batch: pad instead
                log.info("running partial batches padded (no single-tile graph: %s)", exc)
        return self._run_one

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        count = tiles.shape[0]
        array = np.ascontiguousarray(tiles.detach().to("cpu", torch.float32).numpy())
        if count < self.batch:
            run_one = self._single_tile_runner()
            if run_one is not None:
                return torch.from_numpy(np.concatenate([run_one(array[i : i + 1]) for i in range(count)]))
            # the graph has a fixed batch: pad with copies, drop their outputs
            self.padded_calls += 1
            array = np.concatenate([array, np.repeat(array[-1:], self.batch - count, axis=0)])
        return torch.from_numpy(np.ascontiguousarray(self._run(array)[:count]))


def onnxruntime_session(graph: Path) -> Callable[[np.ndarray], np.ndarray]:
    """An ONNX Runtime session of ``graph`` on the CPU (all cores torch is allowed), as a function of the
    input array."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def onnxruntime_tiles(
    graph: Path, batch: int, run_one: Callable[[], Callable[[np.ndarray], np.ndarray]] | None = None
) -> ExportedTiles:
    """ONNX Runtime on the CPU; ``run_one``: see :class:`ExportedTiles` (ONNX Runtime cannot give a
    session another batch, so :func:`tile_function` exports a second graph for one tile)."""
    return ExportedTiles(onnxruntime_session(graph), batch, run_one=run_one)


def openvino_properties(precision: str = "float32") -> dict[str, str]:
    """How DeepSeg compiles a graph for OpenVINO's CPU plugin: latency hint, torch's thread count, and
    the precision always explicit (on CPUs with AMX or AVX512-BF16 OpenVINO would pick bfloat16)."""
    return {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "bf16" if precision == "bfloat16" else "f32",
        "INFERENCE_NUM_THREADS": str(torch.get_num_threads()),
    }


_OPENVINO_CORE: Any = None
_OPENVINO_CORE_LOCK = threading.Lock()


def openvino_core() -> Any:
    """The process's one ``openvino.Core``, made on first use and kept until the process ends.

    One, and never released, because OpenVINO's CPU plugin (one per Core) installs an alternate
    signal stack for the thread that loads it and, when it is released, puts back the stack it
    found and unmaps its own. Two plugins released in the order they were made leave that thread
    on unmapped memory, and the next signal handled there (Cancel's SIGTERM, Ctrl-C) kills the
    process with SIGSEGV instead of stopping it cleanly (seen with OpenVINO 2026.4). The blob
    cache folder is given per compilation (``CACHE_DIR``), not set on the shared Core.
    """
    global _OPENVINO_CORE
    import openvino  # each call: a runtime that cannot load still raises ImportError here

    with _OPENVINO_CORE_LOCK:
        if _OPENVINO_CORE is None:
            _OPENVINO_CORE = openvino.Core()
        return _OPENVINO_CORE


def graph_input_shape(backend: str, tile_batch_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The input shape of the graph exported for ``backend`` when the sliding window hands it tile batches of
    ``tile_batch_shape`` ``(B, C, *patch)``: one tile for OpenVINO, which runs each tile of a batch as its own
    request (:func:`openvino_tiles`), the batch otherwise. Export keys and failure records use this shape."""
    return (1, *tile_batch_shape[1:]) if backend == "openvino" else tuple(tile_batch_shape)


def openvino_tiles(graph: Path, precision: str = "float32") -> ExportedTiles:
    """OpenVINO compiled model on the CPU (latency hint, torch's thread count) of a one-tile ``graph``
    (:func:`graph_input_shape`): a call with ``n`` tiles runs ``n`` requests, each writing its logits straight into
    its place in one output buffer, which the next call reuses (``ExportedTiles.reuses_output``).

    One tile per request, not the tile batch: on an AMD EPYC (Zen 5, 2 threads) OpenVINO ran a 96^3 tile of
    MONAI's reference UNet in 31.6 ms alone and 34.1 ms per tile in a batch of two (``bench_sliding_window.py``,
    ``openvino_seconds_per_tile_by_request_batch``); ad hoc, the bundled model's 32 x 64 x 64 tile in 36.6 ms
    alone and 41.4 ms per tile in a batch of four, a 2D 256 x 256 network's tile in 49.1 and 52.7 ms (README): a
    batch's activations outgrow the caches. nnU-Net's 128^3 network ran about as fast either way. One graph
    also serves every batch size and partial batches, and its export traces one tile instead of a batch.

    OpenVINO keeps its compiled blob beside the graph (``CACHE_DIR``, :func:`openvino_cache_dir`), so
    later processes skip the compilation. The precision is always asked for explicitly: on CPUs with AMX or AVX512-BF16
    OpenVINO would otherwise pick bfloat16 by itself.
    """
    import openvino

    cache = openvino_cache_dir(graph)
    for legacy in cache.parent.glob("*.blob"):  # blobs of the shared folder used before: never read again
        legacy.unlink(missing_ok=True)
    properties = {**openvino_properties(precision), "CACHE_DIR": str(cache)}
    compiled = openvino_core().compile_model(str(graph), "CPU", properties)
    tile_inputs = list(compiled.input(0).get_shape())
    if tile_inputs[0] != 1:
        raise ValueError(f"OpenVINO runs one tile per request: {graph.name} takes {tile_inputs[0]} (export it for one tile)")
    request = compiled.create_infer_request()
    tile_outputs = [int(n) for n in compiled.output(0).get_shape()]
    slots: list[Any] = []  # an OpenVINO tensor on each tile's place in ``logits``
    logits = np.empty((0, *tile_outputs[1:]), np.float32)

    def run(tiles: np.ndarray) -> np.ndarray:
        nonlocal logits, slots
        count = tiles.shape[0]
        if logits.shape[0] < count:
            logits = np.empty((count, *tile_outputs[1:]), np.float32)
            slots = [openvino.Tensor(logits[i : i + 1], shared_memory=True) for i in range(count)]
        for i in range(count):
            # set before every request: after ``logits`` grows, the request's own reference to an old slot may be
            # to freed memory, which only ``slots`` kept alive
            request.set_output_tensor(slots[i])
            # share_outputs: without it OpenVINO also copies the output it wrote into the slot to a new array
            # (for a 117-class 64 x 128 x 128 tile, 0.47 GB more peak memory and 0.04 s per tile)
            request.infer({0: tiles[i : i + 1]}, share_outputs=True)
        return logits[:count]

    # shared output: no copy of the logits per call (a batch of two 64 x 128 x 128 tiles of 117
    # classes is 1 GB)
    return ExportedTiles(run, 1, reuses_output=True)


def _record_failure(
    error: Exception, weights_sha256: str, backend: str, input_shape: tuple[int, ...], precision: str, record: Path, then: str
) -> None:
    """Write ``error`` (an export or runtime failure for ``input_shape``) to ``record`` for :func:`recorded_failure`,
    where it says something about the network (not the disk, memory or a library) and the runtime's version is
    known; best effort, as the graph cache itself. ``then``: what later runs do instead, for the log."""
    if not (_says_something_about_the_network(error) and _runtime_version(backend) is not None):
        return
    failure = {
        **_failure_key(weights_sha256, backend, input_shape, precision),
        "error": f"{type(error).__name__}: {str(error)[:200]}",
    }
    try:
        atomic_write_text(record, json.dumps(failure, indent=2) + "\n")
        log.warning("recorded in %s: later runs %s at once, until it is removed", record, then)
    except (OSError, DeepSegError):
        pass


def _remove_stale_record(record: Path) -> None:
    """Remove a failure record after a success (one written by a run whose failure this one did not meet:
    another process, a misread error)."""
    if record.exists():
        try:
            record.unlink()
        except OSError:
            pass


def tile_function(
    net: nn.Module | DeferredNetwork,
    choice: BackendChoice,
    weights_sha256: str,
    input_shape: tuple[int, ...],
    cache_dir: Path,
    precision: str = "float32",
) -> tuple[TileFunction, BackendChoice]:
    """The callable the sliding window runs tiles through, and the backend actually used.

    ``weights_sha256``: the export cache's key for ``net``: :func:`weights_digest`, or a digest of more that
    fixes what it computes (a Segmenter's ``network_sha256`` adds the card's architecture). A
    :class:`DeferredNetwork` is built only where it runs the tiles or must be exported. ONNX Runtime's
    single-tile graph (for partial batches) is exported when first needed, and a failure of it recorded the
    same way under its own shape (partial batches are then padded). An export or
    runtime failure falls back to torch (logged with its reason), never a failed run, and is recorded
    beside the graph cache (:func:`recorded_failure`) so that later runs do not export again to fail
    again; failures of the disk, of memory or of loading the runtime are not recorded.
    ``precision``: see the module docstring; the network must be on the CPU for bfloat16.
    """
    check_precision(choice.name, precision)

    def torch_tiles(why: BackendChoice) -> tuple[TileFunction, BackendChoice]:
        if precision == "bfloat16":
            return BFloat16Tiles(network_of(net)), why
        return network_of(net), why

    if choice.name == "torch":
        return torch_tiles(choice)
    input_shape = graph_input_shape(choice.name, input_shape)
    record = failure_record_path(weights_sha256, choice.name, input_shape, cache_dir, precision).absolute()
    earlier = recorded_failure(weights_sha256, choice.name, input_shape, cache_dir, precision)
    if earlier is not None:
        reason = (
            f"{choice.name} could not run this network when last tried ({earlier}); using torch (remove {record} to try again)"
        )
        log.warning("%s", reason)
        return torch_tiles(BackendChoice("torch", reason))
    try:
        if choice.name == "openvino":
            load = functools.partial(openvino_tiles, precision=precision)
        else:
            one_tile = (1, *input_shape[1:])

            announce = _GRAPH_WAIT_ANNOUNCER.get()  # the run's, also for the lookup made later, mid-run

            def single_tile_session() -> Callable[[np.ndarray], np.ndarray]:
                # exported (and cached, under its own key) when a partial batch first needs it; a failure makes
                # the runner pad partial batches, and is recorded as the tile batch's is, so as not to cost every run
                one_record = failure_record_path(weights_sha256, choice.name, one_tile, cache_dir, precision).absolute()
                earlier_one = recorded_failure(weights_sha256, choice.name, one_tile, cache_dir, precision)
                if earlier_one is not None:
                    log.warning(
                        "%s could not take this network's single-tile graph when last tried (%s); padding partial"
                        " batches (remove %s to try again)",
                        choice.name,
                        earlier_one,
                        one_record,
                    )
                    raise RuntimeError(f"not exported again: it failed when last tried ({earlier_one}; remove {one_record})")
                try:
                    with announcing_graph_waits(announce):
                        session = cached_onnx(net, weights_sha256, choice.name, one_tile, cache_dir, onnxruntime_session)
                except Exception as exc:
                    if not (isinstance(net, DeferredNetwork) and net.build_error is exc):
                        _record_failure(exc, weights_sha256, choice.name, one_tile, precision, one_record, "pad partial batches")
                    raise
                _remove_stale_record(one_record)
                return session  # type: ignore[return-value]

            load = functools.partial(
                onnxruntime_tiles, batch=input_shape[0], run_one=single_tile_session if input_shape[0] > 1 else None
            )
        tiles: ExportedTiles = cached_onnx(net, weights_sha256, choice.name, input_shape, cache_dir, load)  # type: ignore[assignment]
    except Exception as exc:  # any exporter/runtime error: the torch path still works
        if isinstance(net, DeferredNetwork) and net.build_error is exc:
            raise  # the network itself cannot be built (weights that do not fit its card): torch cannot run it either
        reason = f"{choice.name} could not run this network ({type(exc).__name__}: {str(exc)[:200]}); using torch"
        log.warning("%s", reason)
        _record_failure(exc, weights_sha256, choice.name, input_shape, precision, record, "use torch")
        return torch_tiles(BackendChoice("torch", reason))
    _remove_stale_record(record)
    return tiles, choice
