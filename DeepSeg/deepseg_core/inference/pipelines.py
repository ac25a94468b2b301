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
import SimpleITK as sitk
import torch

from ..errors import ConfigError
from ..io import Volume
from ..preprocessing import needs_resampling, normalize, resample_to_spacing, stack_neighbour_slices
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


#: up to this many classes :func:`first_argmax` compares class planes in turn; above, it moves the class axis last
RUNNING_ARGMAX_MAX_CLASSES = 64


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
    Up to :data:`RUNNING_ARGMAX_MAX_CLASSES` entries, the planes along ``axis`` are compared in turn (a
    running maximum, in threads): 0.08 s there, against 0.13 s for moving the axis last and taking the
    argmax over it, which is what larger counts do.
    """
    tensor = torch.as_tensor(scores).detach()
    count = tensor.shape[axis]
    dtype = torch.uint8 if count <= 256 else torch.int64
    if count == 0 or count > RUNNING_ARGMAX_MAX_CLASSES or not tensor.is_floating_point():
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


class StreamingGridCollector:
    """Softmax probability slabs on the model grid -> labels on the input grid, slab by slab.

    The model grid has the input's origin and direction and another spacing (``resample_to_spacing``),
    so model slice ``k`` lies at ``k * sz_model`` along the slice axis and input slice ``r`` at
    ``r * sz_input``. Input slices are resampled (linear, SimpleITK, one class at a time with a
    running argmax) as soon as the model slices they interpolate between have arrived, from a
    sub-volume with two slices of margin, which gives exactly what resampling the whole volume
    gives. Only those model slices are kept, as float16: memory does not grow with the number of
    classes times the number of slices. Without resampling, labels are the slab's argmax.

    Args:
        model_grid: geometry of the slabs (``Volume``; its array is not used).
        reference: the input grid.
        num_classes: network output classes (``K = max(num_classes, 2)`` probability channels).
        keep_probabilities: also return float16 probabilities on the input grid.
        uncertainty: also return the normalised predictive entropy on the input grid.
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
        r0 = self._emitted
        m0 = max(0, int(np.floor(r0 * self.z_scale)) - self.MARGIN)
        m1 = min(self._received, int(np.floor((r1 - 1) * self.z_scale)) + self.MARGIN + 1)
        source = self._sub_grid(self.model_grid, m0, m1 - m0)
        target = self._sub_grid(self.reference, r0, r1 - r0)
        best = np.full(target.shape_zyx, -1.0, dtype=np.float32)
        labels = np.zeros(target.shape_zyx, dtype=self.labels.dtype)
        better = np.empty(target.shape_zyx, dtype=bool)
        for channel in range(self.channels):
            on_grid = _resample_linear(source, self._model_slices(m0, m1, channel), target)
            # masked copies, not boolean indexing (a gather and a scatter): a third faster per class
            np.greater(on_grid, best, out=better)
            np.copyto(best, on_grid, where=better)
            np.copyto(labels, channel, where=better)
            if self.probabilities is not None:
                self.probabilities[channel, r0:r1] = on_grid
        self.labels[r0:r1] = labels
        if self.entropy is not None:
            self.entropy[r0:r1] = np.clip(_resample_linear(source, self._model_entropy(m0, m1), target), 0.0, 1.0)
        self._emitted = r1
        keep_from = max(0, int(np.floor(r1 * self.z_scale)) - self.MARGIN)
        self._buffer = [(z0, p, e) for z0, p, e in self._buffer if z0 + p.shape[1] > keep_from]

    def _model_slices(self, m0: int, m1: int, channel: int) -> np.ndarray:
        """Model slices ``[m0, m1)`` of one class, ``(m1 - m0, Y', X')`` float32, from the buffered slabs.

        One class at a time: all classes at once were another float16 copy of the buffer (0.9 GB at
        117 classes and 273 x 273 model voxels per slice)."""
        return self._gathered(m0, m1, lambda probs, entropy: probs[channel])

    def _model_entropy(self, m0: int, m1: int) -> np.ndarray:
        """Model slices ``[m0, m1)`` of the normalised entropy, ``(m1 - m0, Y', X')`` float32."""
        return self._gathered(m0, m1, lambda probs, entropy: entropy)

    def _gathered(self, m0: int, m1: int, part: Callable[[np.ndarray, np.ndarray | None], np.ndarray | None]) -> np.ndarray:
        """Model slices ``[m0, m1)`` of ``part(probs, entropy)`` of each buffered slab, float32."""
        out = np.zeros((m1 - m0, *self.model_grid.shape_zyx[1:]), dtype=np.float32)
        for z0, probs, entropy in self._buffer:
            lo, hi = max(z0, m0), min(z0 + probs.shape[1], m1)
            block = part(probs, entropy)
            if lo < hi and block is not None:
                out[lo - m0 : hi - m0] = block[lo - z0 : hi - z0]
        return out

    @staticmethod
    def _sub_grid(grid: Volume, z0: int, depth: int) -> Geometry:
        """The geometry of ``grid``'s slices ``[z0, z0 + depth)``."""
        direction = np.asarray(grid.direction_lps, dtype=float).reshape(3, 3)
        origin = np.asarray(grid.origin_lps, dtype=float) + direction[:, 2] * grid.spacing_xyz_mm[2] * z0
        return Geometry((depth, *grid.shape_zyx[1:]), tuple(grid.spacing_xyz_mm), tuple(origin), tuple(direction.ravel()))

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


def _resample_linear(source: Geometry, array_zyx: np.ndarray, target: Geometry) -> np.ndarray:
    """Linear resampling of ``array_zyx`` (on ``source``) onto ``target``, float32 ``target.shape_zyx``."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx, dtype=np.float32))
    image.SetSpacing(source.spacing_xyz_mm)
    image.SetOrigin(source.origin_lps)
    image.SetDirection(source.direction_lps)
    reference = sitk.Image([int(s) for s in target.shape_zyx[::-1]], sitk.sitkUInt8)
    reference.SetSpacing(target.spacing_xyz_mm)
    reference.SetOrigin(target.origin_lps)
    reference.SetDirection(target.direction_lps)
    resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)
