"""nnU-Net's ``default_resampling``, reimplemented: target shapes, the separate low-resolution axis, images and labels.

Images: shape ``round(spacing / target * shape)`` (Python's round-half-even),
``scipy.ndimage.zoom(grid_mode=True, mode="nearest")`` then a clip to the input's range (what
``skimage.transform.resize`` does), order 3; when the spacing is anisotropic (largest / smallest >
3, first the current then the target spacing) the lowest-resolution axis is handled separately:
each slice in-plane with order 3, then nearest neighbour along that axis. Label maps: each label's
indicator resized and the largest wins (batchgenerators' ``resize_segmentation``), the same
separate-axis rule. The export's logits use the half-pixel positions of :func:`nearest_positions`
and :func:`linear_positions`.

scipy's zoom runs on one thread and makes three float64 copies of the volume (input, padded,
prefiltered): 8.2 s for a 512 x 512 x 300 CT to 1.5 mm. :func:`resize_array` computes the same
result bit for bit in threads with one copy: the edge padding (straight into float64) and each
axis of the spline prefilter (independent lines, in place) in slabs, the interpolation in slabs of
output rows, each by scipy's own ``zoom_shift`` kernel with the slab's first row as an integer
shift (so every output position maps to the same input coordinate as in the whole-volume call).
That kernel is private to scipy, so the result is checked once per process against
``ndimage.zoom``; where they differ, scipy's zoom is used as it is.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from ...errors import ConfigError

log = logging.getLogger(__name__)

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


def resize_array(array: np.ndarray, shape: Sequence[int], order: int, *, threads: int | None = None) -> np.ndarray:
    """``skimage.transform.resize(array, shape, order, mode="edge", anti_aliasing=False)`` for float data, float64.

    That is ``scipy.ndimage.zoom`` with the factors skimage passes, ``grid_mode=True`` (pixel centres
    at half-integer positions), ``mode="nearest"``, then a clip to the input's min/max. When the
    shape does not change, scipy's zoom itself runs (recent versions return the input unchanged,
    older ones the spline's approximation of it), so the result follows the installed scipy.

    Args:
        array: 2D or 3D voxels, any real dtype (read, never modified).
        shape: the output shape.
        order: spline order, 0 to 5.
        threads: worker threads (default: ``torch.get_num_threads()``, the thread count the
            network runs with); the result does not depend on it.
    """
    data = np.asarray(array)
    with np.errstate(divide="ignore"):  # an output axis of 0 voxels: zoom 0, an empty result
        factors = np.divide(data.shape, tuple(shape))
    zoom = [1 / f for f in factors]
    workers = _workers(threads)
    if data.ndim >= 2 and not all(z == 1 for z in zoom) and _split_zoom_matches_scipy():
        out = _split_zoom(data, zoom, order, workers)
    else:
        out = ndimage.zoom(np.asarray(data, dtype=np.float64), zoom, order=order, mode="nearest", grid_mode=True)
    np.clip(out, float(data.min()), float(data.max()), out=out)
    return out


#: scipy pads by this many voxels before the spline prefilter when ``mode="nearest"``
#: (``_prepad_for_spline_filter``); the check against ``ndimage.zoom`` catches a change.
_SCIPY_NEAREST_PREPAD = 12


def _workers(threads: int | None) -> int:
    return max(1, int(threads if threads is not None else torch.get_num_threads()))


def _slabs(length: int, parts: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges that split ``range(length)`` into at most ``parts`` near-equal slabs."""
    parts = max(1, min(parts, length))
    edges = np.linspace(0, length, parts + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a]


def _in_threads(task: Callable[[int, int], None], length: int, workers: int) -> None:
    """``task(start, stop)`` over the slabs of ``range(length)``, ``workers`` at a time; errors are raised here."""
    slabs = _slabs(length, workers)
    if not slabs:  # an empty axis: nothing to compute
        return
    if len(slabs) == 1:
        task(*slabs[0])
        return
    with ThreadPoolExecutor(max_workers=len(slabs)) as pool:
        for finished in [pool.submit(task, a, b) for a, b in slabs]:
            finished.result()


def _edge_padded(data: np.ndarray, npad: int, workers: int) -> np.ndarray:
    """``np.pad(data, npad, mode="edge")`` as float64, filled by slabs of axis 0 in threads."""
    padded = np.empty([n + 2 * npad for n in data.shape], dtype=np.float64)
    inner = tuple(slice(npad, npad + n) for n in data.shape[1:])

    def fill(z0: int, z1: int) -> None:
        slab = padded[npad + z0 : npad + z1]
        slab[(slice(None), *inner)] = data[z0:z1]
        # Each later axis copies whole planes, edges of the earlier ones included, so a corner
        # takes the corner voxel, as np.pad's axis-by-axis edge mode does.
        for axis in range(1, data.ndim):
            n = data.shape[axis]
            low = (slice(0, npad), slice(npad, npad + 1))
            high = (slice(npad + n, None), slice(npad + n - 1, npad + n))
            for target, source in (low, high):
                to: list[Any] = [slice(None)] * data.ndim
                take: list[Any] = [slice(None)] * data.ndim
                to[axis], take[axis] = target, source
                slab[tuple(to)] = slab[tuple(take)]

    _in_threads(fill, data.shape[0], workers)
    n0 = data.shape[0]
    padded[:npad] = padded[npad : npad + 1]
    padded[npad + n0 :] = padded[npad + n0 - 1 : npad + n0]
    return padded


def _spline_prefilter_in_place(coefficients: np.ndarray, order: int, workers: int) -> None:
    """``ndimage.spline_filter(mode="nearest")`` in place: each axis's 1-D filter in threads over slabs of another axis."""
    for axis in range(coefficients.ndim):
        split = 1 if axis == 0 else 0

        def filter_slab(a: int, b: int, axis: int = axis, split: int = split) -> None:
            index: list[Any] = [slice(None)] * coefficients.ndim
            index[split] = slice(a, b)
            view = coefficients[tuple(index)]
            ndimage.spline_filter1d(view, order, axis, output=view, mode="nearest")

        _in_threads(filter_slab, coefficients.shape[split], workers)


def _split_zoom(data: np.ndarray, zoom: Sequence[float], order: int, workers: int) -> np.ndarray:
    """``ndimage.zoom(data, zoom, order, mode="nearest", grid_mode=True)`` computed by slabs in threads, float64."""
    from scipy.ndimage import _nd_image, _ni_support

    output_shape = tuple(int(round(n * z)) for n, z in zip(data.shape, zoom, strict=True))
    # scipy's own factor: input over output size (grid mode), not the zoom passed in
    sizes = np.array(output_shape)
    factors = np.divide(np.array(data.shape), sizes, out=np.ones(data.ndim), where=sizes != 0)
    if order > 1:
        npad = _SCIPY_NEAREST_PREPAD
        coefficients = _edge_padded(data, npad, workers)
        _spline_prefilter_in_place(coefficients, order, workers)
    else:
        npad, coefficients = 0, np.ascontiguousarray(data, dtype=np.float64)
    mode = _ni_support._extend_mode_to_code("nearest")
    out = np.empty(output_shape, dtype=np.float64)

    def interpolate(a: int, b: int) -> None:
        shift = np.zeros(data.ndim, dtype=np.float64)
        shift[0] = a  # an integer: row a of the slab maps to the same coordinate as in the whole call
        _nd_image.zoom_shift(coefficients, factors, shift, out[a:b], order, mode, 0.0, npad, True)

    _in_threads(interpolate, output_shape[0], workers)
    return out


_CHECK_LOCK = threading.Lock()


def _split_zoom_matches_scipy() -> bool:
    """Whether :func:`_split_zoom` gives ``ndimage.zoom``'s result bit for bit on this scipy (checked once
    per process, also when several threads ask at once)."""
    with _CHECK_LOCK:
        return _check_split_zoom()


@functools.cache
def _check_split_zoom() -> bool:
    rng = np.random.default_rng(7)
    cases = [((9, 11, 7), (13, 6, 8), 3), ((17, 10), (7, 15), 3), ((8, 9, 10), (5, 12, 10), 1), ((12, 7), (9, 9), 0)]
    try:
        for shape, new_shape, order in cases:
            data = rng.normal(size=shape).astype(np.float32)
            zoom = [n / s for n, s in zip(new_shape, shape, strict=True)]
            expected = ndimage.zoom(data.astype(np.float64), zoom, order=order, mode="nearest", grid_mode=True)
            if not np.array_equal(_split_zoom(data, zoom, order, 3), expected):
                log.warning("the threaded spline zoom differs from scipy %s's; resampling on one thread", _scipy_version())
                return False
    except Exception as error:  # a private scipy kernel whose signature changed
        log.warning("the threaded spline zoom does not run on scipy %s (%s); resampling on one thread", _scipy_version(), error)
        return False
    return True


def _scipy_version() -> str:
    import scipy

    return scipy.__version__


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
    threads: int | None = None,
) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg_to_shape`` for images: ``(C, *shape)`` -> ``(C, *new_shape)``, input dtype.

    The input itself is returned when the shape does not change. Spacings are in the array's axis
    order (mm). ``threads``: as in :func:`resize_array` (a separate axis's slices are resized in
    parallel); the result does not depend on it.
    """
    shape = tuple(data_czyx.shape[1:])
    new_shape = tuple(int(s) for s in new_shape)
    if shape == new_shape:
        return data_czyx
    axis = separate_axis(current_spacing, new_spacing, force_separate_z, threshold)
    workers = _workers(threads)
    out = np.zeros((data_czyx.shape[0], *new_shape), dtype=data_czyx.dtype)
    for c in range(data_czyx.shape[0]):
        if axis is None:
            out[c] = resize_array(data_czyx[c], new_shape, order, threads=workers)
            continue
        inplane = [s for i, s in enumerate(new_shape) if i != axis]
        resize = functools.partial(resize_array, shape=inplane, order=order, threads=1)
        partial = _resize_slices(data_czyx[c], axis, inplane, resize, np.float64, workers)
        out[c] = partial if shape[axis] == new_shape[axis] else _along_axis(partial, axis, new_shape[axis], order_z)
    return out


def _resize_slices(
    volume_zyx: np.ndarray,
    axis: int,
    inplane: Sequence[int],
    resize: Callable[[np.ndarray], np.ndarray],
    dtype: Any,
    workers: int,
) -> np.ndarray:
    """``resize`` of each slice of ``volume_zyx`` across ``axis`` (to ``inplane``, as ``dtype``), stacked
    along ``axis`` again, ``workers`` slices at a time (``resize`` runs on one thread)."""
    shape = list(inplane)
    shape.insert(axis, volume_zyx.shape[axis])
    stacked = np.zeros(shape, dtype=dtype)

    def resize_range(k0: int, k1: int) -> None:
        for k in range(k0, k1):
            index: list[Any] = [slice(None)] * volume_zyx.ndim
            index[axis] = k
            stacked[tuple(index)] = resize(volume_zyx[tuple(index)])

    _in_threads(resize_range, volume_zyx.shape[axis], workers)
    return stacked


def resize_labels(labels: np.ndarray, shape: Sequence[int], order: int, *, threads: int | None = None) -> np.ndarray:
    """Resample a label map as nnU-Net does (batchgenerators 0.25 ``resize_segmentation``), same dtype.

    Order 0: nearest neighbour. Otherwise each label's indicator is resized with ``order`` and the
    label with the largest value wins; an exact tie goes to the nearest-neighbour label when it is
    among the tied ones, else to the lowest label. ``threads``: as in :func:`resize_array`.
    """
    dtype = labels.dtype
    if order == 0:
        return resize_array(labels.astype(np.float64), shape, 0, threads=threads).astype(dtype)
    values = np.unique(labels)
    if len(values) == 1:
        return np.full(tuple(shape), values[0], dtype=dtype)
    nearest = resize_array(labels.astype(np.float64), shape, 0, threads=threads).astype(dtype)
    best = None
    winner = np.zeros(tuple(shape), dtype=np.int32)
    nearest_score = np.zeros(tuple(shape))
    for i, value in enumerate(values):
        score = resize_array((labels == value).astype(np.float64), shape, order, threads=threads)
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
    threads: int | None = None,
) -> np.ndarray:
    """nnU-Net's ``resample_data_or_seg_to_shape(is_seg=True)`` for one label map ``(Z, Y, X)``, same dtype.

    ``threads``: as in :func:`resample_image`; the result does not depend on it."""
    shape = tuple(labels_zyx.shape)
    new_shape = tuple(int(s) for s in new_shape)
    if shape == new_shape:
        return labels_zyx
    axis = separate_axis(current_spacing, new_spacing, force_separate_z, threshold)
    if axis is None:
        return resize_labels(labels_zyx, new_shape, order, threads=threads)
    if order_z != 0 and shape[axis] != new_shape[axis]:
        raise ConfigError(
            "resampling labels along a separate axis is supported with order_z 0 only",
            found=str(order_z),
            hint="nnU-Net's default plans use order_z 0 for segmentations.",
        )
    inplane = [s for i, s in enumerate(new_shape) if i != axis]
    resize = functools.partial(resize_labels, shape=inplane, order=order, threads=1)
    partial = _resize_slices(labels_zyx, axis, inplane, resize, labels_zyx.dtype, _workers(threads))
    if shape[axis] == new_shape[axis]:
        return partial
    return np.take(partial, nearest_positions(shape[axis], new_shape[axis]), axis=axis)
