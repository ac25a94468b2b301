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

from .io import class_boxes

PANOPTIC_DIVISOR = 1000
_FULL_3D = np.ones((3, 3, 3), dtype=bool)


def keep_largest_component(labels_zyx: np.ndarray, values: Iterable[int]) -> np.ndarray:
    """Copy of ``labels_zyx`` where each class in ``values`` keeps only its largest component (the
    first of equal ones in scan order)."""
    out = labels_zyx.copy()
    for value, box in class_boxes(labels_zyx, values).items():
        mask = labels_zyx[box] == value
        components, count = ndimage.label(mask, structure=_FULL_3D)
        if count > 1:
            sizes = np.bincount(components.ravel())[1:]
            out[box][mask & (components != int(np.argmax(sizes)) + 1)] = 0
    return out


def fill_holes(labels_zyx: np.ndarray, values: Iterable[int]) -> np.ndarray:
    """Copy of ``labels_zyx`` with enclosed background holes of each class in ``values`` filled.

    A hole is a region outside the class that does not reach the array's edge. Everything outside the
    class's box is outside the class and reaches the array's edge, so a region that reaches the box's
    edge is no hole either: filling inside the box finds the same holes as on the whole array."""
    out = labels_zyx.copy()
    for value, box in class_boxes(labels_zyx, values).items():
        filled = ndimage.binary_fill_holes(labels_zyx[box] == value)
        region = out[box]
        region[filled & (region == 0)] = value
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
    Ids are assigned class by class, then by descending size. Each class is labelled inside its box;
    a centroid is the sum of its voxels' array indices over their count, the same float64 values as
    ``ndimage.center_of_mass`` over the whole array.
    """
    voxel_mm3 = float(np.prod(spacing_zyx_mm))
    ids = np.zeros(labels_zyx.shape, dtype=np.int32)
    instances: list[Instance] = []
    boxes = class_boxes(labels_zyx, thing_values)
    for value in dict.fromkeys(int(v) for v in thing_values):
        if value not in boxes:
            continue
        box = boxes[value]
        components, count = ndimage.label(labels_zyx[box] == value, structure=_FULL_3D)
        flat = components.ravel()
        sizes = np.bincount(flat, minlength=count + 1)
        # whole-number index sums are exact in float64, so adding the box's offset per voxel is too
        index_sums = [
            np.bincount(flat, weights=np.broadcast_to(_axis_indices(box, axis, components.shape), components.shape).ravel())
            for axis in range(components.ndim)
        ]
        lookup = np.zeros(count + 1, dtype=np.int32)
        for component in np.argsort(-sizes[1:], kind="stable") + 1:
            size = int(sizes[component])
            if size * voxel_mm3 < min_size_mm3:
                continue
            lookup[component] = len(instances) + 1
            centroid = tuple(float(total[component] / size) for total in index_sums)
            instances.append(Instance(len(instances) + 1, value, size, size * voxel_mm3, centroid))  # type: ignore[arg-type]
        inside = components > 0
        target = ids[box]
        target[inside] = np.maximum(target[inside], lookup[components[inside]])
    return ids, instances


def _axis_indices(box: tuple[slice, ...], axis: int, shape: tuple[int, ...]) -> np.ndarray:
    """The whole array's index along ``axis`` of each voxel of ``box``, shaped to broadcast over it (float64)."""
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return np.arange(box[axis].start, box[axis].start + shape[axis], dtype=np.float64).reshape(view)


def panoptic(labels_zyx: np.ndarray, instance_ids: np.ndarray, thing_values: Sequence[int]) -> np.ndarray:
    """``label * 1000 + instance`` for thing voxels with an instance, ``label * 1000`` elsewhere (int32)."""
    out = labels_zyx.astype(np.int32) * PANOPTIC_DIVISOR
    things = np.isin(labels_zyx, list(thing_values)) & (instance_ids > 0)
    out[things] += instance_ids[things]
    return out
