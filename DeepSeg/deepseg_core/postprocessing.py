"""From labels to cleaned labels, instances and panoptic maps.

* :func:`keep_largest_component` and :func:`fill_holes` clean one class at a time (a voxel removed
  from a class becomes background).
* :func:`label_instances` splits each "thing" class (lesions) into connected components, drops
  components smaller than ``min_size_mm3`` and numbers the rest 1..N.
* :func:`panoptic` combines semantic labels and instance ids: ``label * 1000 + instance`` for
  things, ``label * 1000`` for stuff (instance 0), as in the COCO panoptic convention.

Connectivity is 26 (faces, edges, corners) in 3D.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

PANOPTIC_DIVISOR = 1000
_FULL_3D = np.ones((3, 3, 3), dtype=bool)


def keep_largest_component(labels_zyx: np.ndarray, values: Iterable[int]) -> np.ndarray:
    """Copy of ``labels_zyx`` where each class in ``values`` keeps only its largest component."""
    out = labels_zyx.copy()
    for value in values:
        mask = labels_zyx == value
        components, count = ndimage.label(mask, structure=_FULL_3D)
        if count > 1:
            sizes = np.bincount(components.ravel())[1:]
            out[mask & (components != int(np.argmax(sizes)) + 1)] = 0
    return out


def fill_holes(labels_zyx: np.ndarray, values: Iterable[int]) -> np.ndarray:
    """Copy of ``labels_zyx`` with enclosed background holes of each class in ``values`` filled."""
    out = labels_zyx.copy()
    for value in values:
        filled = ndimage.binary_fill_holes(labels_zyx == value)
        out[filled & (out == 0)] = value
    return out


@dataclass(frozen=True)
class Instance:
    """One connected component of a thing class."""

    instance_id: int
    label: int
    voxels: int
    volume_mm3: float
    centroid_zyx: tuple[float, float, float]


def label_instances(
    labels_zyx: np.ndarray,
    thing_values: Sequence[int],
    spacing_zyx_mm: Sequence[float],
    min_size_mm3: float = 0.0,
) -> tuple[np.ndarray, list[Instance]]:
    """Instance ids (int32, 0 = none) numbered 1..N over all thing classes, and their summaries.

    Components smaller than ``min_size_mm3`` get id 0 (their semantic label is left unchanged).
    Ids are assigned class by class, then by descending size.
    """
    voxel_mm3 = float(np.prod(spacing_zyx_mm))
    ids = np.zeros(labels_zyx.shape, dtype=np.int32)
    instances: list[Instance] = []
    for value in thing_values:
        components, count = ndimage.label(labels_zyx == value, structure=_FULL_3D)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel())[1:]
        centroids = ndimage.center_of_mass(np.ones_like(components), components, range(1, count + 1))
        lookup = np.zeros(count + 1, dtype=np.int32)
        for component in np.argsort(-sizes, kind="stable") + 1:
            size = int(sizes[component - 1])
            if size * voxel_mm3 < min_size_mm3:
                continue
            lookup[component] = len(instances) + 1
            centroid = tuple(float(c) for c in centroids[component - 1])
            instances.append(Instance(len(instances) + 1, int(value), size, size * voxel_mm3, centroid))  # type: ignore[arg-type]
        inside = components > 0
        ids[inside] = np.maximum(ids[inside], lookup[components[inside]])
    return ids, instances


def panoptic(labels_zyx: np.ndarray, instance_ids: np.ndarray, thing_values: Sequence[int]) -> np.ndarray:
    """``label * 1000 + instance`` for thing voxels with an instance, ``label * 1000`` elsewhere (int32)."""
    out = labels_zyx.astype(np.int32) * PANOPTIC_DIVISOR
    things = np.isin(labels_zyx, list(thing_values)) & (instance_ids > 0)
    out[things] += instance_ids[things]
    return out
