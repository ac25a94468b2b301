"""nnU-Net v2's inference pipeline, reimplemented by DeepSeg (card pipeline ``nnunetv2``).

An imported nnU-Net model (:mod:`deepseg_core.importers.nnunet`) segments exactly as
``nnUNetPredictor`` does, with DeepSeg's own code (``nnunetv2`` is never imported here):

Preprocessing (:meth:`NnUNetPipeline.prepare`; nnU-Net's ``DefaultPreprocessor``):

1. the channels' voxels as read (``array_zyx``, SimpleITK order; nnU-Net never reorients), stacked
   as float32 ``(C, Z, Y, X)``;
2. ``transpose_forward`` (the model's lowest-resolution axis first);
3. crop to the bounding box of the non-zero voxels of any channel (holes filled; an all-zero image
   is not cropped);
4. normalisation per channel, *before* resampling, in float32: ``CTNormalization`` (clip to the
   training foreground's 0.5-99.5 percentiles, subtract its mean, divide by its std),
   ``ZScoreNormalization`` (the image's own mean/std, inside the non-zero mask when
   ``use_mask_for_norm``), ``RescaleTo01Normalization``, ``RGBTo01Normalization``, ``NoNormalization``;
5. resampling to the target spacing: shape ``round(spacing / target * shape)`` (Python's
   round-half-even), ``scipy.ndimage.zoom(grid_mode=True, mode="nearest")`` then a clip to the
   input's range (what ``skimage.transform.resize`` does), order 3; when the spacing is anisotropic
   (largest / smallest > 3, first the current then the target spacing) the lowest-resolution axis
   is handled separately: each slice in-plane with order 3, then nearest neighbour along that axis.

Network (:meth:`NnUNetPipeline.window_config`): tiles of the plans' patch, tile starts by
nnU-Net's step rule (tile step 0.5 = ``1 - overlap``), nnU-Net's Gaussian importance (sigma 1/8 of
the patch, peak 10, rounded to float16, zeros clamped), centred zero padding of small images, logits
(not probabilities) blended and averaged over folds and mirror passes. nnU-Net's predictor mirrors
along the checkpoint's allowed axes by default; DeepSeg's default stays without test-time
augmentation (``--tta`` turns it on, with exactly those axes). 2D configurations run slice by slice.

Export (:class:`NnUNetExportCollector`; nnU-Net's ``convert_predicted_logits_to_segmentation_with_correct_shape``):
logits resampled to the cropped input shape (order 1 in-plane, nearest along a separate low-resolution
axis, the same anisotropy rule), rounded to float16 as nnU-Net's are, argmax (first maximum wins),
crop reverted (background outside), ``transpose_backward``. It runs slab by slab as the sliding
window finishes them: every interpolation here is separable, so an output slice along the first
(transposed) axis depends only on the one or two network slices its coordinate falls between
(nearest: one; linear: two), and those are all it waits for. Memory holds one slab of float16
logits plus that margin, never the whole ``(K, Z, Y, X)`` logits.

Where DeepSeg differs from ``nnUNetPredictor`` (none of these changes the segmentation beyond
near-ties; the parity tests and ``Testing/Benchmarks/bench_nnunet_parity.py`` measure it):

- tiles are blended in float32 slabs (memory-bounded); nnU-Net accumulates the whole volume's
  logits in float16, which moves logits by up to ~0.5 where 8 tiles overlap (sums reach ~1000, where
  the float16 step is 0.5);
- the export computes the separable interpolation axis by axis in float32; nnU-Net lets
  ``scipy.ndimage.zoom`` sum the tensor-product weights in float64. Both are rounded to float16
  afterwards, so they differ only where a value sits on a float16 rounding boundary;
- order-1 interpolation never leaves the input range (a convex combination), so skimage's clip to
  the input's min/max is dropped in the export (it only trims rounding there).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import ndimage

from ..errors import ConfigError, ImageError
from ..inference.pipelines import CollectedOutput, Pipeline, PreparedInput
from ..inference.sliding_window import IMPORTANCE_MAPS, TILE_PLACEMENTS, SlidingWindowConfig
from ..io import Volume
from ..uncertainty import normalised_entropy

if TYPE_CHECKING:
    from ..inference.predictor import SegmentOptions
    from ..model_card import ModelCard

log = logging.getLogger(__name__)

#: nnU-Net's ``ANISO_THRESHOLD``: largest / smallest spacing above which an axis is resampled separately.
ANISOTROPY_THRESHOLD = 3.0
#: peak of nnU-Net's Gaussian importance map (``value_scaling_factor``).
GAUSSIAN_PEAK = 10.0
NORMALIZATION_SCHEMES = (
    "CTNormalization",
    "ZScoreNormalization",
    "NoNormalization",
    "RescaleTo01Normalization",
    "RGBTo01Normalization",
)
_EPS = 1e-8
#: the export's working memory per chunk of output slices (the chunk shrinks for many classes).
EXPORT_CHUNK_BYTES = 256 << 20


# ------------------------------------------------------------------------------------------------
# sliding window: nnU-Net's tile placement and importance map


def nnunet_tile_starts(length: int, patch: int, overlap: float) -> list[int]:
    """nnU-Net's tile starts along one axis (``compute_steps_for_sliding_window``), ``step = 1 - overlap``.

    ``n = ceil((length - patch) / (patch * step)) + 1`` tiles, starts ``round(i * (length - patch) / (n - 1))``
    with numpy's round-half-even. A patch of 1 (2D networks on a volume) visits every slice.
    """
    if patch == 1:
        return list(range(length))
    if length <= patch:
        return [0]
    step = 1.0 - overlap
    count = int(np.ceil((length - patch) / (patch * step))) + 1
    actual = (length - patch) / (count - 1)
    return [int(np.round(actual * i)) for i in range(count)]


def nnunet_gaussian(patch_size: Sequence[int], sigma_scale: float) -> torch.Tensor:
    """nnU-Net's importance map of a tile (``compute_gaussian``), float32 ``patch_size``.

    A unit impulse at ``patch // 2`` filtered by ``scipy.ndimage.gaussian_filter`` (sigma
    ``sigma_scale * patch``, constant 0 outside), scaled to a peak of 10, rounded to float16 (as nnU-Net
    keeps it) and its zeros set to the smallest non-zero value. Axes of size 1 (2D tiles) are left out
    of the filter, so a 2D network's map is nnU-Net's 2D map.
    """
    sizes = [int(p) for p in patch_size if int(p) > 1] or [1]
    impulse = np.zeros(sizes)
    impulse[tuple(s // 2 for s in sizes)] = 1
    gaussian = ndimage.gaussian_filter(impulse, [s * sigma_scale for s in sizes], 0, mode="constant", cval=0)
    gaussian /= np.max(gaussian) / GAUSSIAN_PEAK
    half = torch.from_numpy(gaussian).to(torch.float16)
    half[half == 0] = torch.min(half[half != 0])
    return half.float().reshape(tuple(int(p) for p in patch_size))


TILE_PLACEMENTS["nnunet"] = nnunet_tile_starts
IMPORTANCE_MAPS["nnunet"] = nnunet_gaussian


# ------------------------------------------------------------------------------------------------
# geometry and resampling (nnU-Net's default_resampling, reimplemented)


def nnunet_target_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float]) -> tuple[int, ...]:
    """``round(spacing / target * shape)`` per axis, Python's round-half-even (``compute_new_shape``)."""
    return tuple(int(round(s / t * n)) for s, t, n in zip(spacing, target, shape, strict=True))


def separate_axis(
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    force_separate_z: bool | None = None,
    threshold: float = ANISOTROPY_THRESHOLD,
) -> int | None:
    """The axis resampled on its own (nearest neighbour), or None for a plain 3D resampling.

    nnU-Net's rule (``determine_do_sep_z_and_axis``): when the current spacing is anisotropic
    (largest / smallest > ``threshold``) its largest-spacing axis, else when the new spacing is, the
    new spacing's; a tie for the largest spacing (2 or 3 axes) means no separate axis.
    ``force_separate_z`` True / False overrides the test (the current spacing's axis is used).
    """

    def lowres(spacing: Sequence[float]) -> int | None:
        values = np.asarray(spacing, dtype=float)
        axes = np.where(max(spacing) / values == 1)[0]
        return int(axes[0]) if len(axes) == 1 else None

    def anisotropic(spacing: Sequence[float]) -> bool:
        return bool(np.max(spacing) / np.min(spacing) > threshold)

    if force_separate_z is not None:
        return lowres(current_spacing) if force_separate_z else None
    if anisotropic(current_spacing):
        return lowres(current_spacing)
    if anisotropic(new_spacing):
        return lowres(new_spacing)
    return None


def resize_array(array: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """``skimage.transform.resize(array, shape, order, mode="edge", anti_aliasing=False)`` for float data, float64.

    That is ``scipy.ndimage.zoom`` with the factors skimage passes, ``grid_mode=True`` (pixel centres
    at half-integer positions), ``mode="nearest"``, then a clip to the input's min/max. Called even
    when the shape does not change (a spline of order > 1 does not reproduce its input exactly).
    """
    data = np.asarray(array, dtype=np.float64)
    factors = np.divide(data.shape, tuple(shape))
    out = ndimage.zoom(data, [1 / f for f in factors], order=order, mode="nearest", grid_mode=True)
    np.clip(out, data.min(), data.max(), out=out)
    return out


def nearest_positions(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each of ``n_out`` positions sampled by nearest neighbour from ``n_in`` (half-pixel centred).

    The coordinate ``(n_in / n_out) * (i + 0.5) - 0.5`` clamped to ``[0, n_in - 1]`` and rounded as
    scipy's order-0 spline does (``floor(c + 0.5)``), i.e. nnU-Net's ``map_coordinates(order=0, mode="nearest")``.
    """
    scale = float(n_in) / n_out
    coords = np.clip(scale * (np.arange(n_out) + 0.5) - 0.5, 0, n_in - 1)
    return np.floor(coords + 0.5).astype(np.int64)


def linear_positions(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Linear interpolation of ``n_out`` half-pixel-centred positions from ``n_in``: ``(i0, i1, t)``.

    Value ``(1 - t) * v[i0] + t * v[i1]``; coordinates clamped to ``[0, n_in - 1]`` first, as scipy's
    ``mode="nearest"`` does (``zoom(order=1, grid_mode=True)`` along one axis).
    """
    zoom = float(n_in) / n_out
    coords = np.clip((np.arange(n_out) + 0.5) * zoom - 0.5, 0, n_in - 1)
    i0 = np.floor(coords).astype(np.int64)
    t = coords - i0
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, t


def _along_axis(array: np.ndarray, axis: int, n_out: int, order: int) -> np.ndarray:
    """``array`` resampled along one axis to ``n_out`` (order 0: nearest, 1: linear), float64."""
    n_in = array.shape[axis]
    if order == 0:
        return np.take(array, nearest_positions(n_in, n_out), axis=axis).astype(np.float64, copy=False)
    if order == 1:
        i0, i1, t = linear_positions(n_in, n_out)
        shape = [1] * array.ndim
        shape[axis] = n_out
        t = t.reshape(shape)
        return (1.0 - t) * np.take(array, i0, axis=axis) + t * np.take(array, i1, axis=axis)
    raise ConfigError("resampling order along a separate axis must be 0 or 1", found=str(order))


def resample_image(
    data_czyx: np.ndarray,
    new_shape: Sequence[int],
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    *,
    order: int = 3,
    order_z: int = 0,
    force_separate_z: bool | None = None,
    threshold: float = ANISOTROPY_THRESHOLD,
) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg_to_shape`` for images: ``(C, *shape)`` -> ``(C, *new_shape)``, input dtype.

    The input itself is returned when the shape does not change. Spacings are in the array's axis
    order (mm).
    """
    shape = tuple(data_czyx.shape[1:])
    new_shape = tuple(int(s) for s in new_shape)
    if shape == new_shape:
        return data_czyx
    axis = separate_axis(current_spacing, new_spacing, force_separate_z, threshold)
    out = np.zeros((data_czyx.shape[0], *new_shape), dtype=data_czyx.dtype)
    for c in range(data_czyx.shape[0]):
        channel = data_czyx[c].astype(np.float64)
        if axis is None:
            out[c] = resize_array(channel, new_shape, order)
            continue
        inplane = [s for i, s in enumerate(new_shape) if i != axis]
        partial_shape = list(new_shape)
        partial_shape[axis] = shape[axis]
        partial = np.zeros(partial_shape)
        for k in range(shape[axis]):
            index: list[Any] = [slice(None)] * 3
            index[axis] = k
            partial[tuple(index)] = resize_array(channel[tuple(index)], inplane, order)
        out[c] = partial if shape[axis] == new_shape[axis] else _along_axis(partial, axis, new_shape[axis], order_z)
    return out


def resize_labels(labels: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """Resample a label map as nnU-Net does (batchgenerators 0.25 ``resize_segmentation``), same dtype.

    Order 0: nearest neighbour. Otherwise each label's indicator is resized with ``order`` and the
    label with the largest value wins; an exact tie goes to the nearest-neighbour label when it is
    among the tied ones, else to the lowest label.
    """
    dtype = labels.dtype
    if order == 0:
        return resize_array(labels.astype(np.float64), shape, 0).astype(dtype)
    values = np.unique(labels)
    if len(values) == 1:
        return np.full(tuple(shape), values[0], dtype=dtype)
    nearest = resize_array(labels.astype(np.float64), shape, 0).astype(dtype)
    best = None
    winner = np.zeros(tuple(shape), dtype=np.int32)
    nearest_score = np.zeros(tuple(shape))
    for i, value in enumerate(values):
        score = resize_array((labels == value).astype(np.float64), shape, order)
        is_nearest = nearest == value
        nearest_score[is_nearest] = score[is_nearest]
        if best is None:
            best = score
            continue
        better = score > best
        winner[better] = i
        best = np.where(better, score, best)
    out = values[winner].astype(dtype)
    tied = (nearest_score == best) & (best > 0)
    out[tied] = nearest[tied]
    return out


def resample_labels(
    labels_zyx: np.ndarray,
    new_shape: Sequence[int],
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
    *,
    order: int = 1,
    order_z: int = 0,
    force_separate_z: bool | None = None,
    threshold: float = ANISOTROPY_THRESHOLD,
) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg_to_shape(is_seg=True)`` for one label map ``(Z, Y, X)``, same dtype."""
    shape = tuple(labels_zyx.shape)
    new_shape = tuple(int(s) for s in new_shape)
    if shape == new_shape:
        return labels_zyx
    axis = separate_axis(current_spacing, new_spacing, force_separate_z, threshold)
    if axis is None:
        return resize_labels(labels_zyx, new_shape, order)
    if order_z != 0 and shape[axis] != new_shape[axis]:
        raise ConfigError(
            "resampling labels along a separate axis is supported with order_z 0 only",
            found=str(order_z),
            hint="nnU-Net's default plans use order_z 0 for segmentations.",
        )
    inplane = [s for i, s in enumerate(new_shape) if i != axis]
    partial_shape = list(new_shape)
    partial_shape[axis] = shape[axis]
    partial = np.zeros(partial_shape, dtype=labels_zyx.dtype)
    for k in range(shape[axis]):
        index: list[Any] = [slice(None)] * 3
        index[axis] = k
        partial[tuple(index)] = resize_labels(labels_zyx[tuple(index)], inplane, order)
    if shape[axis] == new_shape[axis]:
        return partial
    return np.take(partial, nearest_positions(shape[axis], new_shape[axis]), axis=axis)


def nonzero_bbox(data_czyx: np.ndarray) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The filled non-zero mask of all channels and its half-open bounding box per axis (nnU-Net's crop).

    An all-zero image gives the whole image as its box.
    """
    mask = data_czyx[0] != 0
    for c in range(1, data_czyx.shape[0]):
        mask |= data_czyx[c] != 0
    mask = ndimage.binary_fill_holes(mask)
    bbox = []
    for axis in range(mask.ndim):
        present = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        bbox.append((int(present[0]), int(present[-1]) + 1) if present.size else (0, mask.shape[axis]))
    return mask, bbox


def normalise_channels(
    data_czyx: np.ndarray,
    inside_zyx: np.ndarray,
    schemes: Sequence[str],
    use_mask: Sequence[bool],
    properties: dict[str, dict[str, float]],
) -> None:
    """nnU-Net's normalisation of each channel, in place, float32 (see the module docstring).

    ``inside_zyx``: where the mask-based z-score is computed (nnU-Net's ``seg >= 0``: the filled
    non-zero mask, plus labelled voxels in training).
    """
    for c, scheme in enumerate(schemes):
        image = data_czyx[c]
        if scheme == "CTNormalization":
            stats = properties[str(c)]
            np.clip(image, stats["percentile_00_5"], stats["percentile_99_5"], out=image)
            image -= stats["mean"]
            image /= max(stats["std"], _EPS)
        elif scheme == "ZScoreNormalization":
            if use_mask[c]:
                mean, std = image[inside_zyx].mean(), image[inside_zyx].std()
                image[inside_zyx] = (image[inside_zyx] - mean) / max(std, _EPS)
            else:
                mean, std = image.mean(), image.std()
                image -= mean
                image /= max(std, _EPS)
        elif scheme == "RescaleTo01Normalization":
            image -= image.min()
            image /= np.clip(image.max(), a_min=_EPS, a_max=None)
        elif scheme == "RGBTo01Normalization":
            if image.min() < 0 or image.max() > 255:
                raise ImageError(
                    f"channel {c} is not an 8-bit RGB channel",
                    expected="values 0..255 (the model normalises with RGBTo01Normalization)",
                    found=f"range {float(image.min()):g}..{float(image.max()):g}",
                )
            image /= 255.0
        elif scheme != "NoNormalization":
            raise ConfigError(f"unknown nnU-Net normalisation {scheme!r}", expected=f"one of {list(NORMALIZATION_SCHEMES)}")


# ------------------------------------------------------------------------------------------------
# the pipeline


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
    ``allowed_mirroring_axes`` (the checkpoint's, in the patch's axes), ``label_values`` (output
    channel order).
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
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(
                f"model {card.ref}: the nnunetv2 pipeline settings are incomplete ({exc})",
                hint="Re-import the model with `deepseg models import FOLDER`.",
            ) from None
        self.threshold = float(cfg.get("anisotropy_threshold", ANISOTROPY_THRESHOLD))
        axes = cfg.get("allowed_mirroring_axes")
        self.mirroring_axes = tuple(int(a) for a in axes) if axes is not None else None
        if sorted(self.transpose_forward) != [0, 1, 2] or len(self.patch_size) not in (2, 3):
            raise ConfigError("invalid nnunetv2 pipeline settings", found=f"{self.transpose_forward}, patch {self.patch_size}")

    # -- preprocessing ---------------------------------------------------------------------------

    @staticmethod
    def stack_channels(channels: Sequence[Volume]) -> tuple[np.ndarray, list[float]]:
        """The channels' voxels as float32 ``(C, Z, Y, X)`` and the spacing in array order ``(z, y, x)`` mm."""
        data = np.vstack([np.asarray(v.array_zyx)[None] for v in channels], dtype=np.float32, casting="unsafe")
        return data, [abs(float(s)) for s in channels[0].spacing_zyx_mm]

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
        nonzero, bbox = nonzero_bbox(data)
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
        rk = self.resampling["data"]
        image = resample_image(
            data,
            new_shape,
            spacing_t,
            network_spacing,
            order=int(rk.get("order", 3)),
            order_z=int(rk.get("order_z", 0)),
            force_separate_z=rk.get("force_separate_z"),
            threshold=self.threshold,
        )
        if labels is not None:
            sk = self.resampling["seg"]
            labels = resample_labels(
                labels,
                new_shape,
                spacing_t,
                network_spacing,
                order=int(sk.get("order", 1)),
                order_z=int(sk.get("order_z", 0)),
                force_separate_z=sk.get("force_separate_z"),
                threshold=self.threshold,
            )
        context = {
            "shape_before_crop": shape_before,
            "bbox": [list(b) for b in bbox],
            "shape_after_crop": shape_crop,
            "network_shape": tuple(int(s) for s in image.shape[1:]),
            "spacing_transposed": spacing_t,
            "network_spacing": network_spacing,
        }
        return _Preprocessed(np.ascontiguousarray(image, dtype=np.float32), labels, context)

    def prepare(self, channels: Sequence[Volume]) -> PreparedInput:
        """Network input ``(C, Z', Y', X')`` float32 in the model's transposed axis order, and the export context."""
        data, spacing_zyx = self.stack_channels(channels)
        done = self.preprocess(data, spacing_zyx)
        log.debug("nnU-Net preprocessing: %s -> %s", done.context["shape_before_crop"], done.context["network_shape"])
        return PreparedInput(done.image_czyx, None, done.context)

    def prepare_training_case(self, images: Sequence[Volume], label: Volume | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """One training case preprocessed as nnU-Net preprocesses it for training (for fine-tuning).

        The image exactly as :meth:`prepare` makes it; the labels cropped with it and resampled as
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
        data, spacing_zyx = self.stack_channels(images)
        done = self.preprocess(data, spacing_zyx, array)
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
            threshold=self.threshold,
            keep_probabilities=options.keep_probabilities,
            uncertainty=options.uncertainty is not None,
        )


# ------------------------------------------------------------------------------------------------
# export


@dataclass(frozen=True)
class _AxisMap:
    """How one axis of the network grid maps onto the cropped input grid: ``identity``, ``nearest`` or ``linear``."""

    mode: str
    i0: np.ndarray
    i1: np.ndarray
    t: np.ndarray

    @classmethod
    def build(cls, n_in: int, n_out: int, order: int) -> _AxisMap:
        if n_in == n_out:
            index = np.arange(n_out)
            return cls("identity", index, index, np.zeros(n_out))
        if order == 0:
            index = nearest_positions(n_in, n_out)
            return cls("nearest", index, index, np.zeros(n_out))
        if order == 1:
            return cls("linear", *linear_positions(n_in, n_out))
        raise ConfigError(
            "the nnunetv2 export interpolates logits with order 0 or 1 only", found=f"order {order}", hint="Re-import the model."
        )

    def apply(self, block: np.ndarray, axis: int, offset: int = 0) -> np.ndarray:
        """``block`` (float32) mapped along ``axis``; ``offset``: index of the block's first slice along it."""
        if self.mode == "identity" and offset == 0 and block.shape[axis] == len(self.i0):
            return block
        first = np.take(block, self.i0 - offset, axis=axis)
        if self.mode != "linear":
            return first
        shape = [1] * block.ndim
        shape[axis] = len(self.t)
        t = self.t.reshape(shape).astype(np.float32)
        return (1.0 - t) * first + t * np.take(block, self.i1 - offset, axis=axis)


class NnUNetExportCollector:
    """Blended logit slabs ``(K, dz, Y', X')`` -> nnU-Net's segmentation on the input grid, slab by slab.

    See the module docstring. Output arrays are allocated in the input's axis order and written
    through their transposed views, so reverting ``transpose_forward`` costs no copy.

    Args:
        context: :meth:`NnUNetPipeline.preprocess`'s context (shapes, crop box, spacings).
        label_values: label value of each output channel.
        transpose_forward: the model's axis order.
        resampling: ``resampling_fn_probabilities`` kwargs (``order``, ``order_z``, ``force_separate_z``).
        threshold: the anisotropy threshold.
        keep_probabilities: also return float16 softmax probabilities ``(K, Z, Y, X)``.
        uncertainty: also return the normalised entropy of the softmax.
    """

    def __init__(
        self,
        context: dict[str, Any],
        label_values: Sequence[int],
        transpose_forward: Sequence[int],
        resampling: dict[str, Any],
        *,
        threshold: float = ANISOTROPY_THRESHOLD,
        keep_probabilities: bool = False,
        uncertainty: bool = False,
    ) -> None:
        self.values = np.asarray(label_values)
        self.channels = len(self.values)
        tf = [int(a) for a in transpose_forward]
        before = tuple(int(s) for s in context["shape_before_crop"])
        self.crop = [tuple(int(v) for v in b) for b in context["bbox"]]
        self.crop_shape = tuple(int(s) for s in context["shape_after_crop"])
        self.network_shape = tuple(int(s) for s in context["network_shape"])
        original = [0, 0, 0]
        for i, a in enumerate(tf):
            original[a] = before[i]
        dtype = np.uint8 if int(self.values.max()) < 255 else np.uint16
        self.labels = np.zeros(original, dtype=dtype)
        self._labels_t = self.labels.transpose(tf)
        self.probabilities = None
        self._probabilities_t = None
        if keep_probabilities:
            self.probabilities = np.zeros((self.channels, *original), dtype=np.float16)
            self.probabilities[0] = 1  # background outside the crop, as nnU-Net reverts the crop of probabilities
            self._probabilities_t = self.probabilities.transpose([0, *[a + 1 for a in tf]])
        self.entropy = np.zeros(original, dtype=np.float32) if uncertainty else None
        self._entropy_t = self.entropy.transpose(tf) if self.entropy is not None else None
        order, order_z = int(resampling.get("order", 1)), int(resampling.get("order_z", 0))
        axis = None
        if self.network_shape != self.crop_shape:
            axis = separate_axis(
                context["network_spacing"], context["spacing_transposed"], resampling.get("force_separate_z"), threshold
            )
        self.maps = [
            _AxisMap.build(n_in, n_out, order_z if a == axis else order)
            for a, (n_in, n_out) in enumerate(zip(self.network_shape, self.crop_shape, strict=True))
        ]
        first = self.maps[0]
        self._lo, self._hi = first.i0, (first.i1 if first.mode == "linear" else first.i0)
        self._buffer: list[tuple[int, np.ndarray]] = []  # (network z0, float16 logits)
        self._received = 0
        self._emitted = 0
        self.max_buffered_slices = 0  # the memory bound: network slices held at once

    def add(self, z_start: int, z_stop: int, blended: np.ndarray) -> None:
        """One finished slab of logits ``(K, z_stop - z_start, Y', X')`` (z in order)."""
        if blended.shape[0] != self.channels:
            raise ConfigError(
                "internal: logit slab has the wrong channel count", expected=str(self.channels), found=str(blended.shape)
            )
        # nnU-Net's logits are float16 (its accumulators are); so are the slices kept here
        self._buffer.append((z_start, np.asarray(blended).astype(np.float16)))
        self._received = z_stop
        self.max_buffered_slices = max(self.max_buffered_slices, sum(b.shape[1] for _, b in self._buffer))
        ready = int(np.searchsorted(self._hi, self._received, side="left"))
        if ready > self._emitted:
            self._emit(ready)

    def _emit(self, stop: int) -> None:
        # bytes per output slice: every channel's float32 interpolation and float16 copy (+ float32 softmax)
        plane = self.crop_shape[1] * self.crop_shape[2]
        per_slice = plane * self.channels * (10 if self.probabilities is not None or self.entropy is not None else 6)
        chunk = max(1, EXPORT_CHUNK_BYTES // max(per_slice, 1))
        for start in range(self._emitted, stop, chunk):
            self._emit_rows(start, min(start + chunk, stop))
        self._emitted = stop
        keep_from = int(self._lo[stop]) if stop < len(self._lo) else self._received
        self._buffer = [(z0, b) for z0, b in self._buffer if z0 + b.shape[1] > keep_from]

    def _source(self, m0: int, m1: int) -> np.ndarray:
        """Network slices ``[m0, m1)`` of all channels, float16, from the buffered slabs."""
        out = np.empty((self.channels, m1 - m0, *self.network_shape[1:]), dtype=np.float16)
        for z0, block in self._buffer:
            lo, hi = max(z0, m0), min(z0 + block.shape[1], m1)
            if lo < hi:
                out[:, lo - m0 : hi - m0] = block[:, lo - z0 : hi - z0]
        return out

    def _logits(self, source: np.ndarray, rows: slice, m0: int) -> torch.Tensor:
        """All channels' logits on the cropped input grid for output ``rows``: ``(n, K, Yc, Xc)`` float32 tensor
        holding float16 values.

        ``source``: network slices ``[m0, ...)`` of all channels, ``(K, m, Y', X')`` float16. nnU-Net's export
        buffer is float16 (ties are decided there), so the interpolated values are rounded to float16; they
        are kept as float32 for fast arithmetic.
        """
        first = self.maps[0]
        block = source.astype(np.float32)
        if first.mode == "identity":
            block = block[:, rows.start - m0 : rows.stop - m0]
        else:
            block = _AxisMap(first.mode, first.i0[rows], first.i1[rows], first.t[rows]).apply(block, 1, m0)
        # nearest-neighbour axes first: a selection commutes with the linear interpolation of the other axis
        for axis, mapping in ((2, self.maps[1]), (3, self.maps[2])):
            if mapping.mode == "nearest":
                block = np.take(block, mapping.i0, axis=axis)
        planes = torch.from_numpy(np.ascontiguousarray(block.transpose(1, 0, 2, 3)))  # (n, K, Y, X)
        size = self.crop_shape[1:]
        if tuple(planes.shape[2:]) != size:
            # bilinear with half-pixel centres and clamped edges (torch's align_corners=False) is scipy's
            # zoom(order=1, grid_mode=True, mode="nearest"); an axis already at its size maps to itself
            planes = torch.nn.functional.interpolate(planes, size=size, mode="bilinear", align_corners=False)
        return planes.to(torch.float16).to(torch.float32)

    def _emit_rows(self, r0: int, r1: int) -> None:
        rows = slice(r0, r1)
        m0, m1 = int(self._lo[r0]), int(self._hi[r1 - 1]) + 1
        logits = self._logits(self._source(m0, m1), rows, m0)
        (z0, _), (y0, y1), (x0, x1) = self.crop
        target = (slice(z0 + r0, z0 + r1), slice(y0, y1), slice(x0, x1))
        if self.probabilities is None and self.entropy is None:
            # torch's argmax returns the first maximum, as numpy's does in nnU-Net
            self._labels_t[target] = self.values[torch.argmax(logits, dim=1).numpy()]
            return
        probabilities = torch.softmax(logits, dim=1)
        self._labels_t[target] = self.values[torch.argmax(probabilities, dim=1).numpy()]
        by_class = probabilities.numpy().transpose(1, 0, 2, 3)
        if self._probabilities_t is not None:
            self._probabilities_t[(slice(None), *target)] = by_class
        if self._entropy_t is not None:
            self._entropy_t[target] = normalised_entropy(by_class)

    def finish(self) -> CollectedOutput:
        """Labels (and the rest) on the input grid, in the input's axis order."""
        if self._emitted < self.crop_shape[0]:
            if self._received < self.network_shape[0]:
                raise ConfigError(
                    "internal: the sliding window ended before the last slab",
                    expected=f"{self.network_shape[0]} slices",
                    found=str(self._received),
                )
            self._emit(self.crop_shape[0])
        return CollectedOutput(self.labels, self.probabilities, self.entropy)


__all__ = [
    "ANISOTROPY_THRESHOLD",
    "NORMALIZATION_SCHEMES",
    "NnUNetExportCollector",
    "NnUNetPipeline",
    "linear_positions",
    "nearest_positions",
    "nnunet_gaussian",
    "nnunet_target_shape",
    "nnunet_tile_starts",
    "resample_image",
    "resample_labels",
    "resize_array",
    "resize_labels",
    "separate_axis",
]
