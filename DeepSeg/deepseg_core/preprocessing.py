"""Turning volumes into network inputs: resampling, intensity normalisation, 2.5D stacking.

All functions take and return arrays in ``(Z, Y, X)`` order (``(C, Z, Y, X)`` for several
channels); physical geometry travels in :class:`~deepseg_core.io.Volume`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from .errors import ConfigError, ShapeError
from .io import Volume
from .model_card import Normalization

#: Relative spacing difference below which no resampling is done (avoids needless interpolation).
SPACING_TOLERANCE = 1e-3


def needs_resampling(spacing_xyz_mm: Sequence[float], target_xyz_mm: Sequence[float]) -> bool:
    """True when the spacings differ by more than :data:`SPACING_TOLERANCE` (relative) on any axis."""
    return any(abs(s - t) > SPACING_TOLERANCE * t for s, t in zip(spacing_xyz_mm, target_xyz_mm, strict=True))


def resampled_shape_zyx(volume: Volume, target_xyz_mm: Sequence[float]) -> tuple[int, int, int]:
    """The ``(Z, Y, X)`` size of :func:`resample_to_spacing`'s grid for ``volume``, without resampling:
    the same physical extent in whole voxels of ``target_xyz_mm``, at least one per axis."""
    if not needs_resampling(volume.spacing_xyz_mm, target_xyz_mm):
        return tuple(int(n) for n in volume.shape_zyx)  # type: ignore[return-value]
    size_xyz = volume.shape_zyx[::-1]
    new_size = [max(1, int(round(n * s / t))) for n, s, t in zip(size_xyz, volume.spacing_xyz_mm, target_xyz_mm, strict=True)]
    return (new_size[2], new_size[1], new_size[0])


def resample_to_spacing(volume: Volume, target_xyz_mm: Sequence[float], *, is_label: bool = False) -> Volume:
    """Resample onto a grid with ``target_xyz_mm`` spacing, same origin and direction.

    Images use linear interpolation, labels nearest neighbour. The new size covers the same
    physical extent (rounded to whole voxels). On a finer axis the rounding can put the new grid's
    last voxel centres beyond the input's last voxel by more than half an input voxel, where
    ``SimpleITK.Resample`` would give 0 (0 HU, or background): there the input's last voxel is
    repeated (edge extension, as MONAI's ``padding_mode="border"``), at the cost of one padded copy of
    the input (157 MB for a 512 x 512 x 300 int16 CT) when an axis needs it.
    """
    if not needs_resampling(volume.spacing_xyz_mm, target_xyz_mm):
        return volume
    size_xyz = volume.shape_zyx[::-1]
    new_size = list(resampled_shape_zyx(volume, target_xyz_mm)[::-1])
    reference = sitk.Image(new_size, sitk.sitkUInt8)
    reference.SetSpacing(tuple(float(t) for t in target_xyz_mm))
    reference.SetOrigin(volume.origin_lps)
    reference.SetDirection(tuple(volume.direction_lps.reshape(-1)))
    # an axis needs the edge where the last new centre passes the input's last voxel (half of it, minus a
    # rounding margin: padding where ITK would still interpolate changes nothing, the pad repeats the edge)
    edge_xyz = [
        int((m - 1) * t > (n - 0.5 - 1e-6) * s)
        for n, m, s, t in zip(size_xyz, new_size, volume.spacing_xyz_mm, target_xyz_mm, strict=True)
    ]
    source = volume.to_sitk()
    if any(edge_xyz):
        source = sitk.ZeroFluxNeumannPad(source, [0, 0, 0], edge_xyz)
    interpolator = sitk.sitkNearestNeighbor if is_label else sitk.sitkLinear
    out_type = source.GetPixelID() if is_label else sitk.sitkFloat32
    return Volume.from_sitk(sitk.Resample(source, reference, sitk.Transform(), interpolator, 0.0, out_type))


def normalize(array_zyx: np.ndarray, norm: Normalization) -> np.ndarray:
    """Normalised float32 copy of ``array_zyx`` (see :class:`~deepseg_core.model_card.Normalization`)."""
    data = np.asarray(array_zyx, dtype=np.float32)
    if norm.scheme == "ct":
        if norm.window is None or norm.mean is None or norm.std is None:
            raise ConfigError("CT normalisation needs window, mean and std", found=str(norm))
        out = np.clip(data, norm.window[0], norm.window[1])
        out -= np.float32(norm.mean)
        out /= np.float32(norm.std)
        return out
    if norm.scheme == "zscore":
        floor = np.percentile(data, 1.0)
        body = data[data > floor]
        body = body if body.size > 0.05 * data.size else data.ravel()
        return ((data - body.mean()) / max(float(body.std()), 1e-6)).astype(np.float32)
    if norm.scheme == "percentile":
        low_p, high_p = norm.percentiles or (0.5, 99.5)
        low, high = np.percentile(data, [low_p, high_p])
        clipped = np.clip(data, low, high)
        return ((clipped - clipped.mean()) / max(float(clipped.std()), 1e-6)).astype(np.float32)
    raise ConfigError(
        f"unknown normalisation {norm.scheme!r}", expected="one of ['ct', 'zscore', 'percentile']", found=norm.scheme
    )


def stack_neighbour_slices(volume_czyx: np.ndarray, context_slices: int) -> np.ndarray:
    """2.5D input: for each z, the ``k`` slices centred on it, of every modality, as channels.

    Args:
        volume_czyx: ``(C, Z, Y, X)`` modalities first.
        context_slices: ``k``, odd; slices beyond the volume repeat the edge slice.

    Returns:
        ``(Z, k * C, Y, X)``; channel ``j * C + c`` is modality ``c`` at offset ``j - k // 2``.
    """
    if volume_czyx.ndim != 4:
        raise ShapeError("2.5D stacking needs (C, Z, Y, X)", expected="4 axes", found=str(volume_czyx.shape))
    if context_slices < 1 or context_slices % 2 == 0:
        raise ConfigError("context_slices must be odd and >= 1", found=str(context_slices))
    channels, depth = volume_czyx.shape[:2]
    half = context_slices // 2
    offsets = np.arange(-half, half + 1)
    index = np.clip(np.arange(depth)[:, None] + offsets[None, :], 0, depth - 1)  # (Z, k)
    stacked = volume_czyx[:, index]  # (C, Z, k, Y, X)
    out_shape = (depth, context_slices * channels, *volume_czyx.shape[2:])
    return np.ascontiguousarray(stacked.transpose(1, 2, 0, 3, 4).reshape(out_shape))


def intensity_fingerprint(arrays: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None = None) -> dict[str, float]:
    """Mean, std and percentiles (0.5, 5, 50, 95, 99.5) of intensities, inside ``masks`` when given."""
    samples = []
    for i, array in enumerate(arrays):
        values = array[masks[i]] if masks is not None else array.ravel()
        if values.size > 200_000:
            values = values[:: values.size // 200_000 + 1]
        samples.append(values.astype(np.float64))
    data = np.concatenate(samples) if samples else np.zeros(1)
    p = np.percentile(data, [0.5, 5, 50, 95, 99.5])
    return {
        "mean": float(data.mean()),
        "std": float(data.std()),
        "p00_5": float(p[0]),
        "p05": float(p[1]),
        "p50": float(p[2]),
        "p95": float(p[3]),
        "p99_5": float(p[4]),
    }


def ct_normalization(foreground_fingerprint: dict[str, float]) -> Normalization:
    """nnU-Net's CT scheme from an :func:`intensity_fingerprint` of the foreground: clip to its
    0.5-99.5 percentiles, then subtract its mean and divide by its std."""
    fp = foreground_fingerprint
    return Normalization(scheme="ct", window=(fp["p00_5"], fp["p99_5"]), mean=fp["mean"], std=fp["std"])
