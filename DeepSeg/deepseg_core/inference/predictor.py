"""Segment a volume with a stored model: preprocess, sliding window, labels back on the input grid.

The same :class:`Segmenter` serves ``deepseg segment``, the Slicer module's subprocess and the
Segment Editor effect. Steps:

1. check the inputs against the card (channel count, same grid for all channels, modality);
2. resample each channel to the model's spacing (linear) and normalise it as the card says;
3. 2D / 2.5D models: stack ``k`` neighbouring slices as channels and tile slice by slice;
4. memory-bounded sliding window (:mod:`.sliding_window`), argmax per finished slab;
5. back onto the input grid: labels directly when no resampling was needed, otherwise each class
   probability is resampled linearly and the argmax taken there (no nearest-neighbour blockiness);
6. optional clean-up (largest component, hole filling) and instances of "thing" classes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import domain_shift, postprocessing
from ..domain_shift import DomainReport
from ..errors import ConfigError, DeepSegError, ImageError
from ..io import Volume
from ..model_card import ModelCard, ModelError
from ..model_store import ModelStore, load_network, resolve_model
from ..preprocessing import needs_resampling, normalize, resample_to_grid, resample_to_spacing, stack_neighbour_slices
from ..uncertainty import normalised_entropy
from .sliding_window import ProgressCallback, SlidingWindowConfig, sliding_window_predict

log = logging.getLogger(__name__)


def choose_device(requested: str = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu`` / ``cuda`` / ``cuda:N`` as asked."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise DeepSegError(
            "CUDA was requested but no CUDA device is available",
            expected="an NVIDIA GPU with a CUDA build of torch",
            found=f"torch {torch.__version__}, cuda available: False",
            hint="Use --device cpu (or auto), or install the CUDA build of torch for your GPU.",
        )
    try:
        return torch.device(requested)
    except RuntimeError:
        raise DeepSegError("unknown device", expected="auto, cpu, cuda or cuda:N", found=requested) from None


#: ``tta``: all mirror combinations plus these (gain, shift) perturbations of the normalised input;
#: ``mc_dropout``: ``uncertainty_passes`` passes with the network's dropout layers active.
UNCERTAINTY_METHODS = ("tta", "mc_dropout")
UNCERTAINTY_INTENSITY_PERTURBATIONS: tuple[tuple[float, float], ...] = ((0.9, 0.0), (1.1, 0.0), (1.0, -0.2), (1.0, 0.2))


@dataclass(frozen=True)
class SegmentOptions:
    """Per-run choices; ``None`` means the model card's default."""

    device: str = "auto"
    overlap: float | None = None
    batch_size: int | None = None
    tta: bool = False
    instances: bool = False
    min_instance_mm3: float = 10.0
    largest_component: bool = False
    fill_holes: bool = False
    keep_probabilities: bool = False
    check_modality: bool = True
    uncertainty: str | None = None
    uncertainty_passes: int = 8
    uncertainty_perturbations: tuple[tuple[float, float], ...] = UNCERTAINTY_INTENSITY_PERTURBATIONS

    def __post_init__(self) -> None:
        if self.uncertainty not in (None, *UNCERTAINTY_METHODS):
            raise ConfigError(
                "unknown uncertainty method", expected=f"one of {list(UNCERTAINTY_METHODS)}", found=str(self.uncertainty)
            )
        if self.uncertainty_passes < 2:
            raise ConfigError("Monte-Carlo dropout needs at least 2 passes", found=str(self.uncertainty_passes))


@dataclass
class SegmentationResult:
    """Labels on the input grid, and what else was asked for.

    Attributes:
        labels: label values of the card on the input grid (uint8, or uint16 above 255).
        probabilities: ``(K, Z, Y, X)`` float16 class probabilities on the input grid, or None.
        instance_ids: ``(Z, Y, X)`` int32 instance ids of thing classes (0 = none), or None.
        instances: one summary per instance.
        uncertainty: normalised predictive entropy (float32, 0..1) on the input grid, or None
            (see :mod:`deepseg_core.uncertainty`).
        domain_check: the input-versus-training-data report (see :mod:`deepseg_core.domain_shift`).
        card: the model card used.
        timings_s: seconds per stage.
    """

    labels: Volume
    card: ModelCard
    probabilities: np.ndarray | None = None
    instance_ids: np.ndarray | None = None
    instances: list[postprocessing.Instance] = field(default_factory=list)
    uncertainty: Volume | None = None
    domain_check: DomainReport | None = None
    timings_s: dict[str, float] = field(default_factory=dict)


class _SliceNet(nn.Module):
    """Runs a 2D network on ``(B, C, 1, Y, X)`` tiles (one slice each)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x[:, :, 0]).unsqueeze(2)


def check_modality(card: ModelCard, image: Volume, subject: str) -> None:
    """Refuse an image that cannot be of the model's modality (see README: modality check).

    CT: every CT holds air or fat, i.e. voxels below 0 HU; an image without any negative value is
    not in Hounsfield units. MR: a model trained on MR refuses images whose lowest 0.5% lie below
    -500 (CT air).
    """
    array = image.array_zyx
    if card.inputs.modality == "CT" and float(array.min()) >= 0:
        raise ImageError(
            "does not look like a CT in Hounsfield units",
            subject=subject,
            expected=f"a CT image for model {card.ref} (air about -1000 HU, fat about -100 HU)",
            found=f"no voxel below 0 (range {float(array.min()):g} .. {float(array.max()):g})",
            hint="Check the modality, or apply the rescale slope/intercept; --skip-modality-check overrides.",
        )
    if card.inputs.modality == "MR" and float(np.percentile(array, 0.5)) < -500:
        raise ImageError(
            "looks like a CT, but the model expects MR",
            subject=subject,
            expected=f"an MR image for model {card.ref}",
            found=f"0.5th percentile {float(np.percentile(array, 0.5)):g} (CT air)",
            hint="--skip-modality-check overrides.",
        )


class Segmenter:
    """A loaded model, ready to segment many volumes (load once, run many)."""

    def __init__(self, card: ModelCard, net: nn.Module, device: torch.device) -> None:
        self.card, self.device = card, device
        config = card.architecture.config
        self.spatial_dims = int(config.get("spatial_dims", 3))
        self.context_slices = int(config.get("context_slices", 1))
        self.net = (_SliceNet(net) if self.spatial_dims == 2 else net).to(device).eval()

    @classmethod
    def load(cls, model: str | Path, device: str = "auto", store: ModelStore | None = None) -> Segmenter:
        """Load ``model`` (folder or ``NAME[:VERSION]``) onto ``device``."""
        torch_device = choose_device(device)
        folder = resolve_model(model, store)
        card, net = load_network(folder, device="cpu")
        return cls(card, net, torch_device)

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

    def check_inputs(self, channels: Sequence[Volume]) -> DomainReport:
        """Compare the input channels with the training-data fingerprint of the card (never raises for a shift)."""
        return domain_shift.check_input(self.card, channels)

    def prepare(self, channels: Sequence[Volume], options: SegmentOptions, subjects: Sequence[str]) -> tuple[np.ndarray, Volume]:
        """Normalised network input ``(C_net, Z, Y, X)`` on the model grid, and that grid."""
        card = self.card
        expected = len(card.inputs.channels)
        if len(channels) != expected:
            raise ImageError(
                f"model {card.ref} needs {expected} input channel(s) {list(card.inputs.channels)}",
                expected=f"{expected} image(s)",
                found=f"{len(channels)}",
                hint="Give one image per channel, in the card's order.",
            )
        for volume, subject in zip(channels[1:], subjects[1:], strict=True):
            if not volume.same_grid(channels[0]):
                raise ImageError(
                    "is not on the same grid as the first channel", subject=subject, hint="Resample it onto the first image."
                )
        if options.check_modality:
            for volume, subject in zip(channels, subjects, strict=True):
                check_modality(card, volume, subject)
        target = card.preprocessing.target_spacing_xyz_mm
        normalised = []
        grid = channels[0]
        for volume in channels:
            resampled = resample_to_spacing(volume, target)
            grid = resampled
            normalised.append(normalize(resampled.array_zyx, card.preprocessing.normalization))
        stacked = np.stack(normalised)
        if self.spatial_dims == 2:
            stacked = stack_neighbour_slices(stacked, self.context_slices).transpose(1, 0, 2, 3)
        return np.ascontiguousarray(stacked), grid

    def segment(
        self,
        channels: Sequence[Volume],
        options: SegmentOptions = SegmentOptions(),
        *,
        subjects: Sequence[str] | None = None,
        on_progress: ProgressCallback | None = None,
        should_cancel: Callable[[], bool] | None = None,
        domain_check: DomainReport | None = None,
    ) -> SegmentationResult:
        """Segment one case (one :class:`Volume` per input channel, all on one grid).

        ``domain_check``: a report already made by :meth:`check_inputs` (made here when None).
        """
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        subjects = list(subjects or [f"channel {i}" for i in range(len(channels))])
        image, model_grid = self.prepare(channels, options, subjects)
        if domain_check is None:
            domain_check = self.check_inputs(channels)
        timings["preprocess"] = time.perf_counter() - clock
        reference = channels[0]
        resampled = needs_resampling(reference.spacing_xyz_mm, model_grid.spacing_xyz_mm) or not model_grid.same_grid(reference)
        keep_probs = options.keep_probabilities or resampled
        num_classes = self.card.num_classes
        label_dtype = np.uint8 if num_classes <= 256 else np.uint16
        labels_model = np.zeros(model_grid.shape_zyx, dtype=label_dtype)
        probs_model = np.zeros((max(num_classes, 2), *model_grid.shape_zyx), dtype=np.float16) if keep_probs else None
        entropy_model = np.zeros(model_grid.shape_zyx, dtype=np.float32) if options.uncertainty else None

        def on_slab(z0: int, z1: int, probs: np.ndarray) -> None:
            labels_model[z0:z1] = np.argmax(probs, axis=0)
            if probs_model is not None:
                probs_model[:, z0:z1] = probs
            if entropy_model is not None:
                entropy_model[z0:z1] = normalised_entropy(probs)

        clock = time.perf_counter()
        with _mc_dropout(self.net, options.uncertainty == "mc_dropout", self.card.ref):
            sliding_window_predict(
                self.net,
                image,
                num_classes,
                self.window_config(options),
                on_slab,
                device=self.device,
                on_progress=on_progress,
                should_cancel=should_cancel,
            )
        timings["network"] = time.perf_counter() - clock
        clock = time.perf_counter()
        probabilities = None
        if resampled:
            labels_array, probabilities = _probabilities_to_grid(probs_model, model_grid, reference, options.keep_probabilities)
        else:
            labels_array = labels_model
            probabilities = probs_model if options.keep_probabilities else None
        labels_array = labels_array.astype(label_dtype, copy=False)
        result = self._postprocess(reference.with_array(labels_array), options)
        result.probabilities = probabilities
        result.domain_check = domain_check
        if entropy_model is not None:
            entropy = model_grid.with_array(entropy_model)
            if resampled:
                entropy = resample_to_grid(entropy, reference)
            result.uncertainty = reference.with_array(np.clip(entropy.array_zyx, 0.0, 1.0).astype(np.float32))
        timings["postprocess"] = time.perf_counter() - clock
        result.timings_s = timings
        return result

    def _postprocess(self, labels: Volume, options: SegmentOptions) -> SegmentationResult:
        array = labels.array_zyx
        stuff = [label.value for label in self.card.labels if not label.thing]
        things = [label.value for label in self.card.labels if label.thing]
        if options.largest_component:
            array = postprocessing.keep_largest_component(array, stuff)
        if options.fill_holes:
            array = postprocessing.fill_holes(array, stuff)
        result = SegmentationResult(labels=labels.with_array(array), card=self.card)
        if options.instances:
            result.instance_ids, result.instances = postprocessing.label_instances(
                array, things, labels.spacing_zyx_mm, options.min_instance_mm3
            )
        return result


@contextmanager
def _mc_dropout(net: nn.Module, enable: bool, ref: str) -> Iterator[None]:
    """Dropout layers in training mode (stochastic) for the duration; everything else stays in eval."""
    if not enable:
        yield
        return
    dropouts = [m for m in net.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]
    if not dropouts:
        raise ConfigError(
            f"model {ref} has no dropout layers, so Monte-Carlo dropout cannot vary its output",
            expected="a network trained with dropout > 0",
            found="dropout 0 in every layer",
            hint="Use the test-time-augmentation method (CLI: --uncertainty-method tta).",
        )
    for module in dropouts:
        module.train()
    try:
        yield
    finally:
        for module in dropouts:
            module.eval()


def _probabilities_to_grid(
    probs_model: np.ndarray | None, model_grid: Volume, reference: Volume, keep: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-class linear resampling onto ``reference`` with a running argmax (one class at a time)."""
    if probs_model is None:
        raise ModelError("internal: probabilities needed for resampling were not kept")
    best = np.full(reference.shape_zyx, -1.0, dtype=np.float32)
    labels = np.zeros(reference.shape_zyx, dtype=np.uint16)
    kept = np.zeros((probs_model.shape[0], *reference.shape_zyx), dtype=np.float16) if keep else None
    for channel in range(probs_model.shape[0]):
        on_grid = resample_to_grid(model_grid.with_array(probs_model[channel].astype(np.float32)), reference).array_zyx
        better = on_grid > best
        best[better] = on_grid[better]
        labels[better] = channel
        if kept is not None:
            kept[channel] = on_grid
    return labels, kept
