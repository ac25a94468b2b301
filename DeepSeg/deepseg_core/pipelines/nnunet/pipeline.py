"""The ``nnunetv2`` pipeline class: nnU-Net's preprocessing, sliding-window settings and export hooked together.

Preprocessing (:meth:`NnUNetPipeline.prepare`; nnU-Net's ``DefaultPreprocessor``): the channels'
voxels as read (``array_zyx``, SimpleITK order; nnU-Net never reorients; with ``reorient: "ras"``
they are first permuted and flipped to the closest RAS orientation, as TotalSegmentator does,
:mod:`.orientation`), stacked as float32 ``(C, Z, Y, X)``; ``transpose_forward`` (the model's
lowest-resolution axis first); the crop (:mod:`.crop`); normalisation per channel before resampling
(:mod:`.normalization`); resampling to the target spacing (:mod:`.resampling`).

Network (:meth:`NnUNetPipeline.window_config`): tiles of the plans' patch, nnU-Net's step rule and
Gaussian (:mod:`.tiling`), centred zero padding of small images, logits (not probabilities) blended
and averaged over folds and mirror passes. nnU-Net's predictor mirrors along the checkpoint's
allowed axes by default; DeepSeg's default stays without test-time augmentation (``--tta`` turns
it on, with exactly those axes). 2D configurations run slice by slice. Tiles are blended in float32
slabs (memory-bounded); nnU-Net accumulates the whole volume's logits in float16, which moves logits
by up to ~0.5 where 8 tiles overlap (sums reach ~1000, where the float16 step is 0.5).

Export (:meth:`NnUNetPipeline.collector`): :class:`~.export.NnUNetExportCollector`, which also
undoes the reorientation.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ...errors import ConfigError, ImageError
from ...inference.pipelines import NetworkGrid, Pipeline, PreparedInput, TrainingScheme
from ...inference.sliding_window import SlidingWindowConfig
from ...io import Volume
from . import tiling  # noqa: F401  (registers the sliding window's placement and importance "nnunet")
from .crop import mask_box, nonzero_bbox, nonzero_mask
from .export import NnUNetExportCollector
from .normalization import normalise_channels
from .orientation import AxisReorder, check_reorient, reorientation, reoriented_spacing_zyx
from .resampling import ANISOTROPY_THRESHOLD, nnunet_target_shape, resample_image, resample_labels

if TYPE_CHECKING:
    from ...inference.predictor import SegmentOptions
    from ...model_card import ModelCard

# the package's name, not this module's: log lines keep the name they had before the package was split
log = logging.getLogger(__package__)


@dataclass(frozen=True)
class _Preprocessed:
    """One case after nnU-Net's preprocessing, and what the export needs to undo it (transposed axis order)."""

    image_czyx: np.ndarray
    labels_zyx: np.ndarray | None
    context: dict[str, Any]


class NnUNetPipeline(Pipeline):
    """nnU-Net v2's preprocessing, tiling and export (see the module docstring); settings in ``card.pipeline["config"]``.

    Config keys (written by :func:`deepseg_core.importers.nnunet.import_nnunet`): ``transpose_forward``,
    ``transpose_backward``, ``spacing`` (target, nnU-Net's transposed axis order; 2 entries for 2D),
    ``patch_size`` (same order), ``normalization_schemes``, ``use_mask_for_norm``,
    ``foreground_intensity_properties_per_channel``, ``resampling_data`` / ``resampling_seg`` /
    ``resampling_probabilities`` (``order``, ``order_z``, ``force_separate_z``), ``anisotropy_threshold``,
    ``allowed_mirroring_axes`` (the checkpoint's, in the patch's axes), ``label_values`` (the label
    value of each output channel), ``reorient`` (``none`` when missing, or ``ras``: :mod:`.orientation`),
    ``regions`` (region-based models only: ``{"name", "values"}`` per output channel; the channels are
    sigmoids and ``label_values`` is nnU-Net's ``regions_class_order``, see :mod:`.export`),
    ``batch_dice`` (the plans' choice for nnU-Net's training loss; True when missing).
    """

    name = "nnunetv2"

    def __init__(self, card: ModelCard, spatial_dims: int, context_slices: int) -> None:
        super().__init__(card, spatial_dims, context_slices)
        cfg = self.config
        try:
            self.transpose_forward = [int(a) for a in cfg["transpose_forward"]]
            self.transpose_backward = [int(a) for a in cfg["transpose_backward"]]
            self.target_spacing = [float(s) for s in cfg["spacing"]]
            self.patch_size = [int(p) for p in cfg["patch_size"]]
            self.schemes = list(cfg["normalization_schemes"])
            self.use_mask = [bool(u) for u in cfg["use_mask_for_norm"]]
            self.intensity_properties = dict(cfg["foreground_intensity_properties_per_channel"])
            self.resampling = {k: dict(cfg[f"resampling_{k}"]) for k in ("data", "seg", "probabilities")}
            self.label_values = [int(v) for v in cfg["label_values"]]
            self.regions = [(str(r["name"]), tuple(int(v) for v in r["values"])) for r in cfg.get("regions") or ()]
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"model {card.ref}: the nnunetv2 pipeline settings are incomplete ({exc})",
                hint="Re-import the model with `deepseg models import FOLDER`.",
            ) from None
        self.batch_dice = bool(cfg.get("batch_dice", True))
        self.threshold = float(cfg.get("anisotropy_threshold", ANISOTROPY_THRESHOLD))
        axes = cfg.get("allowed_mirroring_axes")
        self.mirroring_axes = tuple(int(a) for a in axes) if axes is not None else None
        self.reorient = check_reorient(cfg.get("reorient", "none"))
        if sorted(self.transpose_forward) != [0, 1, 2] or len(self.patch_size) not in (2, 3):
            raise ConfigError("invalid nnunetv2 pipeline settings", found=f"{self.transpose_forward}, patch {self.patch_size}")
        if self.regions and len(self.regions) != len(self.label_values):
            raise ConfigError(
                f"model {card.ref}: the nnunetv2 regions and their label values differ in number",
                found=f"{len(self.regions)} regions, {len(self.label_values)} values",
                hint="Re-import the model with `deepseg models import FOLDER`.",
            )

    @property
    def output_channels(self) -> int:
        """One channel per label value, background included, or one sigmoid channel per region."""
        return len(self.label_values)

    @property
    def region_values(self) -> tuple[tuple[int, ...], ...]:
        """Each sigmoid channel's label values (region-based models), else empty."""
        return tuple(values for _, values in self.regions)

    @property
    def training_scheme(self) -> TrainingScheme:
        """nnU-Net's trainer's: Dice counts summed over the batch or per sample as the plans' ``batch_dice``
        says, the lowest-resolution output weighted 0, targets down-sampled ``nearest-exact``
        (``DownsampleSegForDSTransform``)."""
        return TrainingScheme(
            dice_reduction="batch" if self.batch_dice else "sample", drop_lowest_output=True, target_sampling="nearest-exact"
        )

    def region_training_problems(self) -> list[str]:
        """Why a label map of this model's values cannot train its regions (empty when it can).

        Training turns each voxel's value into region targets (region on where the value is one of
        its values). The export writes value ``regions_class_order[i]`` where region ``i`` is on and
        every later region off, so that value must be one of region ``i``'s values and of no later
        region's, or a corrected voxel would teach the opposite of what it shows (BraTS, KiTS and
        nnU-Net's examples all keep this). Training label maps are 8-bit, so values stop at 255.
        """
        problems = []
        for i, ((name, values), written) in enumerate(zip(self.regions, self.label_values, strict=True)):
            if written not in values:
                problems.append(f"value {written}, which region '{name}' writes, is not one of its values {list(values)}")
            for later, later_values in self.regions[i + 1 :]:
                if written in later_values:
                    problems.append(
                        f"value {written}, which region '{name}' writes where '{later}' is off, is one of '{later}'s values"
                    )
            if written > 255:
                problems.append(f"value {written} does not fit the 8-bit training label maps")
        return problems

    # -- preprocessing ---------------------------------------------------------------------------

    @staticmethod
    def stack_channels(channels: Sequence[Volume], reorder: AxisReorder | None = None) -> tuple[np.ndarray, list[float]]:
        """The channels' voxels as float32 ``(C, Z, Y, X)`` and the spacing in array order ``(z, y, x)`` mm.

        ``reorder``: the voxels' axes are permuted and flipped so first (:mod:`.orientation`); the
        spacing is that of the reordered axes.
        """
        reorder = reorder or AxisReorder()
        data = np.vstack([reorder.apply(np.asarray(v.array_zyx))[None] for v in channels], dtype=np.float32, casting="unsafe")
        return data, reoriented_spacing_zyx(channels[0], reorder)

    def reorder_for(self, volume: Volume) -> AxisReorder:
        """The voxel reorder the ``reorient`` setting asks for on ``volume``'s grid (nothing moves for ``none``)."""
        return reorientation(volume, self.reorient)

    def network_grid(self, channels: Sequence[Volume]) -> NetworkGrid:
        """nnU-Net's network grid for ``channels`` (reoriented, cropped to the non-zero voxels of any
        channel, transposed, resampled), found from the crop box alone: no voxel is reoriented,
        normalised or resampled."""
        volume = channels[0]
        reorder = self.reorder_for(volume)
        box = mask_box(nonzero_mask([v.array_zyx for v in channels]))
        cropped_zyx = [stop - start for start, stop in box]
        # a reorder permutes and flips axes: the box's lengths move with their axes
        names = reorder.input_axis_names()
        shape_zyx = [cropped_zyx["zyx".index(name)] for name in names]
        spacing_zyx = reoriented_spacing_zyx(volume, reorder)
        shape_t = [int(shape_zyx[a]) for a in self.transpose_forward]
        spacing_t = [float(spacing_zyx[a]) for a in self.transpose_forward]
        network_spacing = self._network_spacing(spacing_t)
        shape = nnunet_target_shape(shape_t, spacing_t, network_spacing)
        return NetworkGrid(
            (shape[0], shape[1], shape[2]),
            (network_spacing[0], network_spacing[1], network_spacing[2]),
            (names[self.transpose_forward[0]], names[self.transpose_forward[1]], names[self.transpose_forward[2]]),
        )

    def _network_spacing(self, spacing_t: Sequence[float]) -> list[float]:
        """The network grid's spacing in transposed order (2D: the slice axis keeps the input's)."""
        return list(self.target_spacing) if len(self.target_spacing) == 3 else [spacing_t[0], *self.target_spacing]

    def preprocess(
        self, data_czyx: np.ndarray, spacing_zyx: Sequence[float], labels_zyx: np.ndarray | None = None
    ) -> _Preprocessed:
        """nnU-Net's ``DefaultPreprocessor.run_case_npy`` (see the module docstring).

        Args:
            data_czyx: float32 ``(C, Z, Y, X)`` as read; modified in place.
            spacing_zyx: voxel spacing per array axis (mm).
            labels_zyx: training labels on the same grid, or None at inference.
        """
        tf = self.transpose_forward
        data = data_czyx.transpose([0, *[a + 1 for a in tf]])
        spacing_t = [float(spacing_zyx[a]) for a in tf]
        shape_before = tuple(int(s) for s in data.shape[1:])
        # the filled mask only matters to a masked z-score and to training labels
        needs_mask = labels_zyx is not None or any(
            scheme == "ZScoreNormalization" and masked for scheme, masked in zip(self.schemes, self.use_mask, strict=False)
        )
        nonzero, bbox = nonzero_bbox(data, fill_holes=needs_mask)
        box = tuple(slice(a, b) for a, b in bbox)
        data = data[(slice(None), *box)]
        inside = nonzero[box]
        labels = None
        if labels_zyx is not None:
            labels = np.asarray(labels_zyx).transpose(tf)[box].astype(np.int16)
            # nnU-Net marks background outside the non-zero mask as -1 (the z-score mask is labels >= 0)
            labels[(labels == 0) & ~inside] = -1
            inside = labels >= 0
        shape_crop = tuple(int(s) for s in data.shape[1:])
        network_spacing = self._network_spacing(spacing_t)
        new_shape = nnunet_target_shape(shape_crop, spacing_t, network_spacing)
        normalise_channels(data, inside, self.schemes, self.use_mask, self.intensity_properties)
        image = self._resample("data", data, new_shape, spacing_t, network_spacing)
        if labels is not None:
            labels = self._resample("seg", labels, new_shape, spacing_t, network_spacing)
        context = {
            "shape_before_crop": shape_before,
            "bbox": [list(b) for b in bbox],
            "shape_after_crop": shape_crop,
            "network_shape": tuple(int(s) for s in image.shape[1:]),
            "spacing_transposed": spacing_t,
            "network_spacing": network_spacing,
        }
        return _Preprocessed(np.ascontiguousarray(image, dtype=np.float32), labels, context)

    def _resample(
        self, kind: str, array: np.ndarray, new_shape: Sequence[int], spacing_t: Sequence[float], network_spacing: Sequence[float]
    ) -> np.ndarray:
        """``array`` resampled as the plans' ``resampling_fn_<kind>_kwargs`` say: ``data`` (images ``(C, ...)``) or ``seg``."""
        kwargs = self.resampling[kind]
        resample = resample_image if kind == "data" else resample_labels
        return resample(
            array,
            new_shape,
            spacing_t,
            network_spacing,
            order=int(kwargs.get("order", 3 if kind == "data" else 1)),
            order_z=int(kwargs.get("order_z", 0)),
            force_separate_z=kwargs.get("force_separate_z"),
            threshold=self.threshold,
        )

    def prepare(self, channels: Sequence[Volume]) -> PreparedInput:
        """Network input ``(C, Z', Y', X')`` float32 in the model's transposed axis order, and the export context."""
        reorder = self.reorder_for(channels[0])
        data, spacing_zyx = self.stack_channels(channels, reorder)
        done = self.preprocess(data, spacing_zyx)
        log.debug("nnU-Net preprocessing: %s -> %s", done.context["shape_before_crop"], done.context["network_shape"])
        return PreparedInput(done.image_czyx, None, {**done.context, "reorder": reorder})

    @property
    def network_input_channels(self) -> int:
        """The image's channels, and for a cascade's second stage one more per foreground label (see
        :meth:`prepare_with_previous_stage`)."""
        channels = len(self.card.inputs.channels)
        if self.card.previous_stage is None:
            return channels
        return channels + len(self._foreground_values())

    def _foreground_values(self) -> list[int]:
        """The first stage's label values that become one-hot channels of the second stage, ascending."""
        return sorted(v for v in self.label_values if v != 0)

    def prepare_with_previous_stage(self, channels: Sequence[Volume], previous_labels_zyx: np.ndarray) -> PreparedInput:
        """The input of the cascade's second stage (``3d_cascade_fullres``), as nnU-Net's predictor makes it.

        The first stage's labels go through the preprocessing as a segmentation does (reoriented,
        transposed and cropped with the image, -1 outside the non-zero mask, resampled as
        ``resampling_fn_seg``), then one channel per foreground label value (ascending, nnU-Net's
        ``convert_labelmap_to_one_hot``: 1 where the voxel has that value, else 0) follows the image's.

        Returns:
            ``(C + F, Z', Y', X')`` float32, ``F`` the number of foreground labels, and the export context.
        """
        if tuple(previous_labels_zyx.shape) != tuple(channels[0].shape_zyx):
            raise ImageError(
                "the cascade's first stage labels are not on the input grid",
                expected=str(channels[0].shape_zyx),
                found=str(previous_labels_zyx.shape),
            )
        reorder = self.reorder_for(channels[0])
        data, spacing_zyx = self.stack_channels(channels, reorder)
        done = self.preprocess(data, spacing_zyx, reorder.apply(previous_labels_zyx))
        assert done.labels_zyx is not None
        foreground = self._foreground_values()
        image = np.empty((done.image_czyx.shape[0] + len(foreground), *done.image_czyx.shape[1:]), dtype=np.float32)
        image[: done.image_czyx.shape[0]] = done.image_czyx
        for offset, value in enumerate(foreground, start=done.image_czyx.shape[0]):
            image[offset] = done.labels_zyx == value
        return PreparedInput(image, None, {**done.context, "reorder": reorder})

    def prepare_training_case(self, images: Sequence[Volume], label: Volume | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One training case preprocessed as nnU-Net preprocesses it for training (for fine-tuning).

        The image exactly as :meth:`prepare` makes it (reoriented too, when the card says so); the labels
        reoriented and cropped with it and resampled as
        nnU-Net resamples segmentations (``resampling_fn_seg``: each label's indicator with order 1
        in-plane, the winner per voxel, nearest neighbour along a separate axis). nnU-Net's -1
        (background outside the non-zero mask) is returned as 0, as its training transforms do.

        Returns:
            ``(image_czyx, label_zyx)``: float32 ``(C, Z', Y', X')`` and int16 ``(Z', Y', X')`` on the
            network grid (transposed axis order, as the network sees it).
        """
        array = label.array_zyx if isinstance(label, Volume) else np.asarray(label)
        if tuple(array.shape) != tuple(images[0].shape_zyx):
            raise ImageError(
                "label map and image have different shapes", expected=str(images[0].shape_zyx), found=str(array.shape)
            )
        reorder = self.reorder_for(images[0])
        data, spacing_zyx = self.stack_channels(images, reorder)
        done = self.preprocess(data, spacing_zyx, reorder.apply(array))
        assert done.labels_zyx is not None
        labels = np.ascontiguousarray(done.labels_zyx)
        labels[labels < 0] = 0
        return done.image_czyx, labels

    # -- tiling ----------------------------------------------------------------------------------

    def window_config(self, options: SegmentOptions) -> SlidingWindowConfig:
        """nnU-Net's sliding window: its step rule, Gaussian, logits blending, centred padding; mirroring with ``tta``."""
        defaults = self.card.inference
        patch = tuple(self.patch_size) if len(self.patch_size) == 3 else (1, *self.patch_size)
        mirror: tuple[int, ...] = ()
        if options.tta or options.uncertainty == "tta":
            if self.mirroring_axes is None:
                log.warning("model %s was trained without mirroring: test-time augmentation mirrors nothing", self.card.ref)
            else:
                # the checkpoint's axes index the patch; a 2D patch's axes are y and x of the volume's slices
                offset = 3 - len(self.patch_size)
                mirror = tuple(a + offset for a in self.mirroring_axes)
        return SlidingWindowConfig(
            patch_size_zyx=patch,  # type: ignore[arg-type]
            overlap=defaults.overlap if options.overlap is None else options.overlap,
            batch_size=options.batch_size or defaults.batch_size,
            sigma_scale=1.0 / 8.0,
            mirror_axes=mirror,
            intensity_perturbations=options.uncertainty_perturbations if options.uncertainty == "tta" else (),
            # a cascade's second stage: the image's channels are intensities, the first stage's one-hot labels not
            perturbed_channels=len(self.card.inputs.channels) if self.config.get("previous_stage") else None,
            repeats=options.uncertainty_passes if options.uncertainty == "mc_dropout" else 1,
            placement="nnunet",
            importance="nnunet",
            blend="logits",
            pad="center",
        )

    def collector(self, prepared: PreparedInput, reference: Volume, options: SegmentOptions) -> NnUNetExportCollector:
        """Logit slabs -> labels (and probabilities / entropy) on the input grid, as nnU-Net exports them."""
        if "bbox" not in prepared.context:
            raise ConfigError("internal: the nnunetv2 collector needs the context of NnUNetPipeline.prepare")
        return NnUNetExportCollector(
            prepared.context,
            self.label_values,
            self.transpose_forward,
            self.resampling["probabilities"],
            regions=bool(self.regions),
            threshold=self.threshold,
            keep_probabilities=options.keep_probabilities,
            uncertainty=options.uncertainty is not None,
        )
