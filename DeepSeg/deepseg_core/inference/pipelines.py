"""Segmentation pipelines: how a model's input is prepared and how blended slabs become labels.

A model card names its pipeline (``card.pipeline["name"]``; none means DeepSeg's own). The
:class:`~deepseg_core.inference.predictor.Segmenter` checks the inputs, asks the pipeline for the
network input (:meth:`Pipeline.prepare`) and the sliding-window settings, runs the memory-bounded
sliding window, and hands each finished z-slab to the pipeline's :class:`SlabCollector`, which
returns the labels (and, when asked, probabilities and uncertainty) on the input grid.

- ``deepseg`` (:class:`DeepSegPipeline`): resample to the card's spacing (linear, same origin and
  direction), normalise, blend softmax probabilities, and resample them back slab by slab
  (:class:`StreamingGridCollector`), so memory stays bounded for any number of classes.
- imported models bring their own pipeline (``nnunetv2``, ``monai_bundle``), which reproduce the
  original tool's preprocessing and export; they are registered in :data:`PIPELINES` by module
  path and imported on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ..errors import ConfigError
from ..io import Volume
from ..preprocessing import needs_resampling, normalize, resample_to_spacing, resampled_shape_zyx, stack_neighbour_slices
from ..uncertainty import normalised_entropy
from .sliding_window import SlidingWindowConfig

if TYPE_CHECKING:
    from ..model_card import ModelCard
    from .predictor import SegmentOptions

#: pipeline name -> "module:Class" (imported on first use, so the core stays light).
PIPELINES: dict[str, str] = {
    "deepseg": "deepseg_core.inference.pipelines:DeepSegPipeline",
    "nnunetv2": "deepseg_core.pipelines.nnunet:NnUNetPipeline",
    "monai_bundle": "deepseg_core.pipelines.monai_bundle:MonaiBundlePipeline",
}


@dataclass
class PreparedInput:
    """The network input of one case and what its pipeline needs to map results back.

    Attributes:
        image_czyx: normalised network input ``(C_net, Z, Y, X)`` float32 (2D / 2.5D models:
            ``(k * C, Z, Y, X)``, tiled one slice at a time).
        grid: geometry of ``image_czyx``'s voxels when it is a plain resampling of the input (the
            DeepSeg pipeline), else None.
        context: pipeline-specific facts (crop box, axis order, shapes).
    """

    image_czyx: np.ndarray
    grid: Volume | None = None
    context: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class NetworkGrid:
    """The grid a pipeline puts one input on for the network, known without preparing the input.

    Attributes:
        shape_zyx: voxels per axis in the network's axis order (nnU-Net's: after its crop to the
            non-zero voxels; a MONAI bundle's: before its ``CropForegroundd``).
        spacing_zyx_mm: voxel spacing per axis in the same order (mm).
        input_axes: for each network axis, the input image's array axis (``z``, ``y`` or ``x``) it
            runs along (imported pipelines may reorient and transpose).
    """

    shape_zyx: tuple[int, int, int]
    spacing_zyx_mm: tuple[float, float, float]
    input_axes: tuple[str, str, str] = ("z", "y", "x")


@dataclass
class CollectedOutput:
    """What a collector returns: everything on the input (reference) grid.

    Attributes:
        labels_zyx: label values ``(Z, Y, X)`` (uint8, or uint16 above 255 classes).
        probabilities: ``(K, Z, Y, X)`` float16 class probabilities when asked for, else None.
        entropy_zyx: normalised predictive entropy ``(Z, Y, X)`` float32 in [0, 1] when asked for.
    """

    labels_zyx: np.ndarray
    probabilities: np.ndarray | None = None
    entropy_zyx: np.ndarray | None = None


class SlabCollector(Protocol):
    """Receives the sliding window's finished slabs in z order; returns the result at the end."""

    def add(self, z_start: int, z_stop: int, blended: np.ndarray) -> None:
        """One finished slab ``(K, z_stop - z_start, Y, X)`` of the network grid."""

    def finish(self) -> CollectedOutput:
        """Labels (and the rest) on the input grid, once every slab was added."""


@dataclass(frozen=True)
class TrainingScheme:
    """How a fine-tune weighs a model's losses (the pipeline's tool decides; DeepSeg's own by default).

    Attributes:
        dice_reduction: ``"batch"`` or ``"sample"`` for the loss's Dice / Tversky terms; None keeps the
            loss's own default (batch).
        drop_lowest_output: weigh the lowest-resolution deep-supervision output 0.
        target_sampling: how targets are down-sampled for the lower-resolution outputs
            (``nearest`` or ``nearest-exact``, see :data:`deepseg_core.losses.compound.TARGET_SAMPLINGS`).
    """

    dice_reduction: str | None = None
    drop_lowest_output: bool = False
    target_sampling: str = "nearest"


class Pipeline:
    """DeepSeg's own pipeline (see the module docstring); imported pipelines subclass it.

    Args:
        card: the model card.
        spatial_dims: 2 or 3 (from the architecture config).
        context_slices: 2.5D neighbour slices ``k`` (1 for 2D and 3D).
    """

    name = "deepseg"

    def __init__(self, card: ModelCard, spatial_dims: int, context_slices: int) -> None:
        self.card = card
        self.spatial_dims = spatial_dims
        self.context_slices = context_slices

    @property
    def config(self) -> dict[str, Any]:
        """The card's pipeline settings (``card.pipeline["config"]``)."""
        return dict(self.card.pipeline.get("config", {})) if self.card.pipeline else {}

    @property
    def region_values(self) -> tuple[tuple[int, ...], ...]:
        """The label values of each output channel when the channels are sigmoid regions (nnU-Net's
        region-based models), else empty: the channels are softmax labels."""
        return ()

    @property
    def training_scheme(self) -> TrainingScheme:
        """How a fine-tune weighs this model's losses: DeepSeg's own choices (imported tools: theirs)."""
        return TrainingScheme()

    @property
    def output_channels(self) -> int:
        """The network's output channels: background and one per label value up to the largest
        (``card.num_classes``); pipelines whose channels are not labels (nnU-Net's regions) say otherwise."""
        return self.card.num_classes

    @property
    def network_input_channels(self) -> int:
        """The channels of the network's input (the first axis of :meth:`prepare`'s image, ``C_net``): one per
        image channel, times the neighbour slices of a 2.5D model."""
        return len(self.card.inputs.channels) * self.context_slices

    def prepare(self, channels: Sequence[Volume]) -> PreparedInput:
        """Resample each channel to the card's spacing, normalise, stack (and 2.5D-stack)."""
        target = self.card.preprocessing.target_spacing_xyz_mm
        normalised = []
        grid = channels[0]
        for volume in channels:
            resampled = resample_to_spacing(volume, target)
            grid = resampled
            normalised.append(normalize(resampled.array_zyx, self.card.preprocessing.normalization))
        stacked = np.stack(normalised)
        if self.spatial_dims == 2:
            stacked = stack_neighbour_slices(stacked, self.context_slices).transpose(1, 0, 2, 3)
        return PreparedInput(np.ascontiguousarray(stacked), grid)

    def prepare_with_previous_stage(self, channels: Sequence[Volume], previous_labels_zyx: np.ndarray) -> PreparedInput:
        """The network input of a cascade's second stage: the channels and the first stage's labels (on their
        grid, ``(Z, Y, X)``) as extra input channels. Only nnU-Net's cascade has one."""
        raise ConfigError(f"model {self.card.ref}: the {self.name} pipeline has no cascade stages")

    def network_grid(self, channels: Sequence[Volume]) -> NetworkGrid:
        """The model grid :meth:`prepare` resamples the channels onto (2D / 2.5D: one slice per tile)."""
        target = self.card.preprocessing.target_spacing_xyz_mm
        return NetworkGrid(resampled_shape_zyx(channels[0], target), (float(target[2]), float(target[1]), float(target[0])))

    def prepare_training_case(self, images: Sequence[Volume], label: Volume) -> tuple[np.ndarray, np.ndarray]:
        """A dataset case as the network sees it in training: ``(C, Z, Y, X)`` float32 and labels ``(Z, Y, X)``.

        DeepSeg's own: resampled to the card's spacing (images linear, labels nearest) and
        normalised as the card says; an imported model's pipeline prepares it as its tool would.
        """
        target = self.card.preprocessing.target_spacing_xyz_mm
        channels = [normalize(resample_to_spacing(v, target).array_zyx, self.card.preprocessing.normalization) for v in images]
        labels = resample_to_spacing(label, target, is_label=True).array_zyx
        return np.stack(channels).astype(np.float32), labels

    def window_config(self, options: SegmentOptions) -> SlidingWindowConfig:
        """Sliding-window settings from the card, overridden by ``options``."""
        defaults = self.card.inference
        patch = tuple(defaults.patch_size_zyx)
        if self.spatial_dims == 2:
            patch = (1, patch[-2], patch[-1])
        all_axes = (1, 2) if self.spatial_dims == 2 else (0, 1, 2)
        mirror = all_axes if options.tta or options.uncertainty == "tta" else ()
        return SlidingWindowConfig(
            patch_size_zyx=patch,  # type: ignore[arg-type]
            overlap=defaults.overlap if options.overlap is None else options.overlap,
            batch_size=options.batch_size or defaults.batch_size,
            mirror_axes=mirror,
            intensity_perturbations=options.uncertainty_perturbations if options.uncertainty == "tta" else (),
            repeats=options.uncertainty_passes if options.uncertainty == "mc_dropout" else 1,
        )

    def collector(self, prepared: PreparedInput, reference: Volume, options: SegmentOptions) -> SlabCollector:
        """Probability slabs -> labels on ``reference`` (streamed when the grids differ)."""
        if prepared.grid is None:
            raise ConfigError("internal: the DeepSeg pipeline needs the model grid of its input")
        return StreamingGridCollector(
            prepared.grid,
            reference,
            self.card.num_classes,
            keep_probabilities=options.keep_probabilities,
            uncertainty=options.uncertainty is not None,
        )


DeepSegPipeline = Pipeline


def pipeline_for(card: ModelCard, spatial_dims: int, context_slices: int) -> Pipeline:
    """The card's pipeline (DeepSeg's own when the card names none)."""
    name = card.pipeline.get("name", "deepseg") if card.pipeline else "deepseg"
    try:
        target = PIPELINES[name]
    except KeyError:
        raise ConfigError(
            f"unknown segmentation pipeline {name!r} in the model card",
            expected=f"one of {sorted(PIPELINES)}",
            found=name,
            hint="The model was written by a newer DeepSeg; update DeepSeg.",
        ) from None
    module_name, class_name = target.split(":")
    cls = getattr(importlib.import_module(module_name), class_name)
    return cls(card, spatial_dims, context_slices)


#: from this many values per plane (the scores without the argmax's axis), :func:`first_argmax` compares the
#: planes in turn; below, the loop's cost per plane outweighs what it saves, and the axis is moved last
RUNNING_ARGMAX_MIN_PLANE = 16384


def torch_view(array: np.ndarray, dtype: type | None = None) -> torch.Tensor:
    """``array`` as a CPU tensor (of ``dtype``), sharing its memory when it is C-contiguous with no
    negative stride, else from a copy. ``np.ascontiguousarray`` alone is not enough: numpy calls an
    array whose flipped axes all have length 1 contiguous, and ``torch.from_numpy`` refuses its
    negative stride."""
    contiguous = np.ascontiguousarray(array, dtype=dtype)
    if any(stride < 0 for stride in contiguous.strides):
        contiguous = contiguous.copy()
    return torch.from_numpy(contiguous)


def first_argmax(scores: np.ndarray | torch.Tensor, axis: int) -> np.ndarray:
    """Index of the largest value along ``axis`` (the first one on ties, and the first NaN where there
    is one, as ``np.argmax`` and ``torch.argmax``), with that axis removed: uint8 for at most 256
    entries along ``axis``, else int64.

    An argmax over a short leading or middle axis of a large array is many times slower in torch and
    numpy than over the last one (3 x 40 x 512 x 512 float32 on 2 cores: 2.0 s over the middle axis).
    Where a plane along ``axis`` has at least :data:`RUNNING_ARGMAX_MIN_PLANE` values, the planes are
    compared in turn (a running maximum, in threads): 0.08 s there, against 0.13 s for moving the axis
    last and taking the argmax over it, and for any number of planes (ad hoc: 118 float16 class planes of
    512 x 512, 0.08 s against 0.16 s; ``bench_nnunet_export.py`` times the whole export). Smaller arrays
    move the axis last.
    """
    tensor = torch.as_tensor(scores).detach()
    count = tensor.shape[axis]
    dtype = torch.uint8 if count <= 256 else torch.int64
    small = tensor.numel() < RUNNING_ARGMAX_MIN_PLANE * count
    if count == 0 or small or not tensor.is_floating_point():
        return torch.argmax(tensor.movedim(axis, -1).contiguous(), dim=-1).to(dtype).numpy()
    planes = tensor.unbind(axis)
    best = planes[0].clone()
    index = torch.zeros(best.shape, dtype=dtype)
    better = torch.empty(best.shape, dtype=torch.bool)  # reused: a fresh mask per class costs more than the compare
    for k in range(1, count):
        # strictly greater: on a tie the earlier class stays
        index.masked_fill_(torch.gt(planes[k], best, out=better), k)
        torch.maximum(best, planes[k], out=best)
    if bool(best.isnan().any()):
        # torch.maximum carried a NaN into ``best``, which no comparison can place: let argmax find the first
        return torch.argmax(tensor.movedim(axis, -1).contiguous(), dim=-1).to(dtype).numpy()
    return index.numpy()


def _label_dtype(num_classes: int) -> type:
    return np.uint8 if num_classes <= 256 else np.uint16


#: the most a step of :class:`StreamingGridCollector` holds in interpolated float32 values (bytes),
#: beside the model slices it keeps, unless one class alone needs more: a chunk of input slices for a
#: group of classes
RESAMPLE_CHUNK_BYTES = 96 * 2**20
#: input slices per step of :class:`StreamingGridCollector`: every step interpolates in plane the model
#: slices it needs, so fewer slices per step repeat more of that work for the slices two steps share
RESAMPLE_CHUNK_SLICES = 16


@dataclass(frozen=True)
class LinearAxis:
    """ITK's linear interpolation along one axis between two grids with the same direction.

    Input (output) sample ``i`` lies at the continuous index ``c = positions[i]`` of the model grid
    along this axis. As ``itk::LinearInterpolateImageFunction`` does: the lower neighbour is
    ``floor(c)``, raised to 0 below the first sample (no interpolation there), the upper one is the
    next sample or, past the last, none (the lower one's value). Unlike ITK, which gives its default
    value 0 to a sample more than half a voxel past the last one, the last value is kept there too (the
    edge extends, as MONAI's ``padding_mode="border"`` does): an input voxel the model
    grid's rounded extent leaves out gets the nearest model slice's probabilities, not background.

    Attributes:
        lower, upper: model-grid indices ``(n_out,)`` int64.
        matrix: ``(n_in, n_out)`` float32, column ``i`` holding ``1 - w`` at ``lower`` and ``w`` at
            ``upper``, where ``w = c - lower`` (0 without an upper neighbour).
    """

    lower: torch.Tensor
    upper: torch.Tensor
    matrix: torch.Tensor

    @classmethod
    def build(cls, positions: np.ndarray, n_in: int) -> LinearAxis:
        """``positions``: continuous model-grid indices of the output samples (float64); ``n_in``: model samples."""
        lower = np.clip(np.floor(positions), 0, n_in - 1).astype(np.int64)
        upper = np.minimum(lower + 1, n_in - 1)
        # below the first sample the distance is negative, and ITK takes the lower value as it is
        weight = np.where(upper > lower, np.clip(positions - lower, 0.0, None), 0.0).astype(np.float32)
        matrix = np.zeros((n_in, len(positions)), dtype=np.float32)
        columns = np.arange(len(positions))
        matrix[lower, columns] = 1.0 - weight
        np.add.at(matrix, (upper, columns), weight)
        return cls(torch.from_numpy(lower), torch.from_numpy(upper), torch.from_numpy(matrix))

    def rows(self, start: int, stop: int) -> LinearAxis:
        """This axis for output samples ``[start, stop)`` only."""
        return LinearAxis(self.lower[start:stop], self.upper[start:stop], self.matrix[:, start:stop])

    def apply(self, block: torch.Tensor, axis: int, offset: int = 0, out: torch.Tensor | None = None) -> torch.Tensor:
        """``block`` (float32, contiguous) interpolated along ``axis``, one of its last three;
        ``offset``: model index of the block's first sample along it; ``out``: a contiguous tensor of
        the result's shape to write into.

        A product with :attr:`matrix` (``v[lower] * (1 - w) + v[upper] * w``, within a float32 rounding of
        ITK's ``v[lower] + (v[upper] - v[lower]) * w``). Gathering ``v[lower]`` and ``v[upper]``
        (``index_select``) and combining them wrote each output four times more and took twice as long."""
        weights = self.matrix[offset : offset + block.shape[axis]]
        if axis == block.ndim - 1:
            return torch.matmul(block, weights, out=out)
        if axis == block.ndim - 2:
            return torch.matmul(weights.T, block, out=out)
        if axis == block.ndim - 3:
            plane = block.shape[-2:]
            flat = torch.matmul(weights.T, block.flatten(-2), out=None if out is None else out.flatten(-2))
            return flat.unflatten(-1, plane)
        raise ValueError(f"axis {axis} of a {block.ndim}-dimensional block: one of the last three")


def linear_axes(model_grid: Volume, reference: Volume) -> tuple[LinearAxis, LinearAxis, LinearAxis]:
    """The z, y and x interpolation from ``model_grid`` onto ``reference``, two grids with the same direction.

    Raises:
        ConfigError: the directions differ (then the interpolation is not separable).
    """
    direction = np.asarray(reference.direction_lps, dtype=float).reshape(3, 3)
    model_direction = np.asarray(model_grid.direction_lps, dtype=float).reshape(3, 3)
    if not np.allclose(direction, model_direction, atol=1e-6):
        raise ConfigError(
            "internal: the model grid must have the input's direction",
            expected=str(direction.ravel().round(6).tolist()),
            found=str(model_direction.ravel().round(6).tolist()),
        )
    # the input's first voxel centre in model-grid voxels along each axis (0 for resample_to_spacing's grid)
    shift = direction.T @ (np.asarray(reference.origin_lps, dtype=float) - np.asarray(model_grid.origin_lps, dtype=float))
    axes = []
    for axis_xyz in (2, 1, 0):
        n_out, n_in = reference.shape_zyx[2 - axis_xyz], model_grid.shape_zyx[2 - axis_xyz]
        step = reference.spacing_xyz_mm[axis_xyz] / model_grid.spacing_xyz_mm[axis_xyz]
        first = shift[axis_xyz] / model_grid.spacing_xyz_mm[axis_xyz]
        axes.append(LinearAxis.build(np.arange(n_out, dtype=np.float64) * step + first, n_in))
    return axes[0], axes[1], axes[2]


def resample_linear(
    block_czyx: torch.Tensor,
    axes: Sequence[LinearAxis],
    z_offset: int = 0,
    buffer: Callable[[str, tuple[int, ...]], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``(C, m, Y', X')`` model-grid values (from model slice ``z_offset``) -> ``(C, r, Y, X)`` float32 on
    the input grid, by :class:`LinearAxis` ``(z, y, x)`` along x, then y, then z, as ITK interpolates.
    Voxels past the model grid's last ones take its edge values (:class:`LinearAxis`).

    ``buffer(name, shape)``: float32 tensors to write the steps into (the result is ``"z"``'s), so
    that a caller resampling group after group reuses them instead of allocating four each time."""
    along_z, along_y, along_x = axes
    channels, depth, height, width = block_czyx.shape
    shapes = {
        "source": (channels, depth, height, width),
        "x": (channels, depth, height, along_x.matrix.shape[1]),
        "y": (channels, depth, along_y.matrix.shape[1], along_x.matrix.shape[1]),
        "z": (channels, along_z.matrix.shape[1], along_y.matrix.shape[1], along_x.matrix.shape[1]),
    }
    out = {name: None if buffer is None else buffer(name, shape) for name, shape in shapes.items()}
    source = block_czyx.float() if out["source"] is None else out["source"].copy_(block_czyx)
    in_plane = along_y.apply(along_x.apply(source, 3, out=out["x"]), 2, out=out["y"])
    return along_z.apply(in_plane, 1, z_offset, out=out["z"])


class StreamingGridCollector:
    """Softmax probability slabs on the model grid -> labels on the input grid, slab by slab.

    The model grid has the input's origin and direction and another spacing (``resample_to_spacing``),
    so model slice ``k`` lies at ``k * sz_model`` along the slice axis and input slice ``r`` at
    ``r * sz_input``. Input slices are resampled as soon as the model slices they interpolate between
    have arrived (with two slices of margin). The resampling is ITK's linear interpolation
    (:class:`LinearAxis`, what ``SimpleITK.Resample`` with ``sitkLinear`` gives, to float32 rounding),
    separable because the grids share their direction: along x, then y, then z, in torch's threads,
    in steps of :data:`RESAMPLE_CHUNK_SLICES` input slices and groups of classes that fit
    :data:`RESAMPLE_CHUNK_BYTES`. Input voxels past the model grid's last voxels (its extent is rounded
    to whole model voxels, so up to one model voxel of the input can lie beyond it) take the grid's edge
    values, where ITK would give 0 and so background. Only the
    model slices still needed are kept, as float16: memory does not grow with the number of classes
    times the number of slices. Without resampling, labels are the slab's argmax.

    Args:
        model_grid: geometry of the slabs (``Volume``; its array is not used).
        reference: the input grid.
        num_classes: network output classes (``K = max(num_classes, 2)`` probability channels).
        keep_probabilities: also return float16 probabilities on the input grid.
        uncertainty: also return the normalised predictive entropy on the input grid.

    Raises:
        ConfigError: the model grid's origin or direction is not the input's (it comes from the input).
    """

    MARGIN = 2

    def __init__(
        self, model_grid: Volume, reference: Volume, num_classes: int, *, keep_probabilities: bool, uncertainty: bool
    ) -> None:
        self.model_grid, self.reference = model_grid, reference
        self.channels = max(num_classes, 2)
        self.resampled = needs_resampling(reference.spacing_xyz_mm, model_grid.spacing_xyz_mm) or not model_grid.same_grid(
            reference
        )
        shape = reference.shape_zyx
        self.labels = np.zeros(shape, dtype=_label_dtype(num_classes))
        self.probabilities = np.zeros((self.channels, *shape), dtype=np.float16) if keep_probabilities else None
        self.entropy = np.zeros(shape, dtype=np.float32) if uncertainty else None
        self.z_scale = reference.spacing_zyx_mm[0] / model_grid.spacing_zyx_mm[0]
        self.model_depth = model_grid.shape_zyx[0]
        self._buffer: list[tuple[int, np.ndarray, np.ndarray | None]] = []  # (model z0, probs f16, entropy)
        self._received = 0  # model slices received so far
        self._emitted = 0  # input slices done so far
        self.max_buffered_slices = 0  # the memory bound: model slices held at once
        if self.resampled and not np.allclose(model_grid.origin_lps, reference.origin_lps, atol=1e-4):
            # which model slices an input slice needs (``_last_ready``) counts from a shared first slice
            raise ConfigError(
                "internal: the model grid must start at the input's first voxel (resample_to_spacing's grid)",
                expected=str(tuple(round(v, 4) for v in reference.origin_lps)),
                found=str(tuple(round(v, 4) for v in model_grid.origin_lps)),
            )
        self.axes = linear_axes(model_grid, reference) if self.resampled else ()
        self._buffers: dict[str, torch.Tensor] = {}

    def add(self, z_start: int, z_stop: int, blended: np.ndarray) -> None:
        entropy = normalised_entropy(blended) if self.entropy is not None else None
        if not self.resampled:
            self.labels[z_start:z_stop] = first_argmax(blended, 0)
            if self.probabilities is not None:
                self.probabilities[:, z_start:z_stop] = blended
            if self.entropy is not None:
                self.entropy[z_start:z_stop] = entropy
            return
        # float16 as numpy's astype rounds (to nearest even), in torch's threads
        self._buffer.append((z_start, torch_view(blended, np.float32).half().numpy(), entropy))
        self._received = z_stop
        self.max_buffered_slices = max(self.max_buffered_slices, sum(p.shape[1] for _, p, _ in self._buffer))
        self._emit()

    def _last_ready(self) -> int:
        """Input slices ``< r`` can be computed from the model slices received so far."""
        depth = self.reference.shape_zyx[0]
        if self._received >= self.model_depth:
            return depth
        r = self._emitted
        while r < depth and int(np.floor(r * self.z_scale)) + self.MARGIN < self._received:
            r += 1
        return r

    def _emit(self) -> None:
        r1 = self._last_ready()
        if r1 <= self._emitted:
            return
        for r0 in range(self._emitted, r1, RESAMPLE_CHUNK_SLICES):
            self._emit_rows(r0, min(r0 + RESAMPLE_CHUNK_SLICES, r1))
        self._buffers.clear()  # not held while the network computes the next slab
        self._emitted = r1
        keep_from = max(0, int(np.floor(r1 * self.z_scale)) - self.MARGIN)
        self._buffer = [(z0, p, e) for z0, p, e in self._buffer if z0 + p.shape[1] > keep_from]

    def _emit_rows(self, r0: int, r1: int) -> None:
        """Input slices ``[r0, r1)``: every class resampled, the first maximum's label, and what was asked for.

        Classes go in groups whose interpolation steps fit :data:`RESAMPLE_CHUNK_BYTES` (one class at a
        time when one alone does not: thick input slices need many model slices per step), each group's
        maximum set against the earlier groups' (strictly greater: on a tie the earlier class keeps the voxel)."""
        along_z = self.axes[0].rows(r0, r1)
        axes = (along_z, *self.axes[1:])
        m0, m1 = int(along_z.lower.min()), int(along_z.upper.max()) + 1
        step_shape = (r1 - r0, *self.reference.shape_zyx[1:])
        # float32 bytes per class of this step: the model slices, then after x, after y, after z
        (depth, height, width), (model_height, model_width) = step_shape, self.model_grid.shape_zyx[1:]
        per_model_slice = model_height * model_width + model_height * width + height * width
        per_class = 4 * ((m1 - m0) * per_model_slice + depth * height * width)
        group = max(1, RESAMPLE_CHUNK_BYTES // per_class)
        best = self._buffer_for("best", step_shape)
        better = torch.empty(step_shape, dtype=torch.bool)
        labels = np.zeros(step_shape, dtype=self.labels.dtype)
        for c0 in range(0, self.channels, group):
            # this group's model slices only: all classes' would be another 0.25 GB at 117 classes
            block = self._gathered(m0, m1, lambda probs, entropy, c0=c0: probs[c0 : c0 + group])
            resampled = resample_linear(torch_view(block), axes, m0, self._buffer_for)
            if self.probabilities is not None:
                self.probabilities[c0 : c0 + group, r0:r1] = resampled.half().numpy()
            if len(resampled) == 1:
                highest, index = resampled[0], None
            else:
                highest = torch.amax(resampled, 0, out=self._buffer_for("highest", step_shape))
                index = first_argmax(resampled, 0).astype(labels.dtype) + labels.dtype.type(c0)
            if c0 == 0:
                best.copy_(highest)
                if index is not None:
                    labels = index
                continue
            torch.gt(highest, best, out=better)
            np.copyto(labels, labels.dtype.type(c0) if index is None else index, where=better.numpy())
            torch.maximum(best, highest, out=best)
        self.labels[r0:r1] = labels
        if self.entropy is not None:
            entropy = torch_view(self._gathered(m0, m1, lambda probs, entropy: entropy)[None])
            self.entropy[r0:r1] = resample_linear(entropy, axes, m0)[0].clamp_(0.0, 1.0).numpy()

    def _buffer_for(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A float32 tensor of ``shape`` kept for the next step of this slab: the steps' shapes repeat, and
        allocating and freeing tens of megabytes per class group left the allocator holding 0.35 GB more
        at 117 classes."""
        kept = self._buffers.get(name)
        if kept is None or tuple(kept.shape) != tuple(shape):
            kept = self._buffers[name] = torch.empty(shape, dtype=torch.float32)
        return kept

    def _gathered(self, m0: int, m1: int, part: Callable[[np.ndarray, np.ndarray | None], np.ndarray | None]) -> np.ndarray:
        """Model slices ``[m0, m1)`` of ``part(probs, entropy)`` of the buffered slabs, ``(C, m1 - m0, Y', X')``
        (``(m1 - m0, Y', X')`` for the entropy): a view into one slab when it holds them all."""
        pieces = [(z0, block) for z0, probs, entropy in self._buffer if (block := part(probs, entropy)) is not None]
        for z0, block in pieces:
            if z0 <= m0 and m1 <= z0 + block.shape[-3]:
                return block[..., m0 - z0 : m1 - z0, :, :]
        first = pieces[0][1]
        out = np.zeros((*first.shape[:-3], m1 - m0, *first.shape[-2:]), dtype=first.dtype)
        for z0, block in pieces:
            lo, hi = max(z0, m0), min(z0 + block.shape[-3], m1)
            if lo < hi:
                out[..., lo - m0 : hi - m0, :, :] = block[..., lo - z0 : hi - z0, :, :]
        return out

    def finish(self) -> CollectedOutput:
        if self.resampled and self._emitted < self.reference.shape_zyx[0]:
            self._received = self.model_depth
            self._emit()
        return CollectedOutput(self.labels, self.probabilities, self.entropy)


@dataclass(frozen=True)
class Geometry:
    """A voxel grid without voxels: shape ``(Z, Y, X)``, spacing (x, y, z) mm, LPS origin and direction."""

    shape_zyx: tuple[int, int, int]
    spacing_xyz_mm: tuple[float, float, float]
    origin_lps: tuple[float, float, float]
    direction_lps: tuple[float, ...]
