"""The per-class steps as their definitions read: one pass over the whole array per class.

DeepSeg runs them inside each class's bounding box (``io.class_boxes``) and its surface distances
with a k-d tree; the tests and ``Testing/Benchmarks/bench_postprocessing.py`` / ``bench_compare.py``
hold them to these, value for value. Written plainly, for reading against the library, not for speed.
Arrays are ``(Z, Y, X)``; ``spacing_mm`` in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

FULL_3D = np.ones((3, 3, 3), dtype=bool)


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` with a face neighbour outside it (the array's edge counts as outside)."""
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1), border_value=0)


def surface_distances(from_mask: np.ndarray, to_mask: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """The Euclidean distance transform of the whole array to ``to_mask``'s surface, read at ``from_mask``'s."""
    return ndimage.distance_transform_edt(~surface(to_mask), sampling=tuple(spacing_mm))[surface(from_mask)]


def distance_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing_mm: Sequence[float], tolerance_mm: float
) -> tuple[float, float, float]:
    """(HD95, ASSD, surface Dice) of two non-empty masks from :func:`surface_distances`."""
    d_pr, d_rp = surface_distances(pred, ref, spacing_mm), surface_distances(ref, pred, spacing_mm)
    hd95 = float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))
    assd = float((d_pr.sum() + d_rp.sum()) / (d_pr.size + d_rp.size))
    within = np.count_nonzero(d_pr <= tolerance_mm) + np.count_nonzero(d_rp <= tolerance_mm)
    return hd95, assd, float(within / (d_pr.size + d_rp.size))


def largest_component(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Each class of ``values`` keeps its largest 26-connected component; the rest becomes 0."""
    out = labels.copy()
    for value in values:
        mask = labels == value
        components, count = ndimage.label(mask, structure=FULL_3D)
        if count > 1:
            out[mask & (components != int(np.argmax(np.bincount(components.ravel())[1:])) + 1)] = 0
    return out


def holes_filled(labels: np.ndarray, values: Sequence[int]) -> np.ndarray:
    """Each class's enclosed holes that are still 0 become the class, class by class."""
    out = labels.copy()
    for value in values:
        out[ndimage.binary_fill_holes(labels == value) & (out == 0)] = value
    return out


def instances(
    labels: np.ndarray, values: Sequence[int], voxel_mm3: float, min_size_mm3: float
) -> tuple[np.ndarray, list[tuple[int, int, int, float, tuple[float, ...]]]]:
    """Instance ids and ``(id, label, voxels, mm3, centroid_zyx)`` rows: components of each class, largest
    first, those under ``min_size_mm3`` left at 0; centroids by ``ndimage.center_of_mass``."""
    ids, rows = np.zeros(labels.shape, np.int32), []
    for value in values:
        components, count = ndimage.label(labels == value, structure=FULL_3D)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel())[1:]
        centroids = ndimage.center_of_mass(np.ones_like(components), components, range(1, count + 1))
        lookup = np.zeros(count + 1, np.int32)
        for component in np.argsort(-sizes, kind="stable") + 1:
            size = int(sizes[component - 1])
            if size * voxel_mm3 < min_size_mm3:
                continue
            lookup[component] = len(rows) + 1
            rows.append((len(rows) + 1, value, size, size * voxel_mm3, tuple(float(c) for c in centroids[component - 1])))
        ids = np.maximum(ids, np.where(components > 0, lookup[components], 0))
    return ids, rows


def segment_uncertainty(
    labels: np.ndarray, entropy: np.ndarray, values: Sequence[int], threshold: float
) -> list[tuple[float, int]]:
    """(mean entropy, voxels at or above ``threshold`` in the class or its one-voxel shell) per class."""
    rows = []
    for value in values:
        mask = labels == value
        near = ndimage.binary_dilation(mask, structure=FULL_3D)
        rows.append((float(entropy[mask].mean()), int(np.count_nonzero((entropy >= threshold) & near))))
    return rows


def extents(labels: np.ndarray, values: Sequence[int]) -> list[tuple[int, ...] | None]:
    """Each class's (z0, z1, y0, y1, x0, x1), last voxels included, from ``np.nonzero``; None when absent."""
    found = []
    for value in values:
        z, y, x = np.nonzero(labels == value)
        found.append(tuple(int(v) for v in (z.min(), z.max(), y.min(), y.max(), x.min(), x.max())) if z.size else None)
    return found


def class_voxels(labels: np.ndarray, cap: int = 4096) -> dict[int, np.ndarray]:
    """Each foreground class's voxel indices ``(N, 3)`` in scan order, thinned to every k-th past ``cap``
    (what training patches are centred on)."""
    found = {}
    for value in np.unique(labels):
        if value > 0:
            coords = np.argwhere(labels == value)
            if len(coords) > cap:
                coords = coords[:: len(coords) // cap + 1]
            found[int(value)] = coords
    return found
