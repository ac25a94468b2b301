"""nnU-Net's ``default_resampling``, reimplemented: target shapes, the separate low-resolution axis, images and labels.

Images: shape ``round(spacing / target * shape)`` (Python's round-half-even),
``scipy.ndimage.zoom(grid_mode=True, mode="nearest")`` then a clip to the input's range (what
``skimage.transform.resize`` does), order 3; when the spacing is anisotropic (largest / smallest >
3, first the current then the target spacing) the lowest-resolution axis is handled separately:
each slice in-plane with order 3, then nearest neighbour along that axis. Label maps: each label's
indicator resized and the largest wins (batchgenerators' ``resize_segmentation``), the same
separate-axis rule. The export's logits use the half-pixel positions of :func:`nearest_positions`
and :func:`linear_positions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

from ...errors import ConfigError

#: nnU-Net's ``ANISO_THRESHOLD``: largest / smallest spacing above which an axis is resampled separately.
ANISOTROPY_THRESHOLD = 3.0


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
