"""Random training patches with foreground oversampling and light augmentation.

Rare foreground (small lesions) is the normal case: a uniformly drawn patch almost never holds a
lesion. A fraction ``foreground_fraction`` of patches is therefore centred on a voxel of a randomly
chosen foreground class present in the case (each class equally likely), the rest anywhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..io import class_boxes
from .augment import AugmentConfig, augment_patch


@dataclass
class TrainingCase:
    """One case ready for training: normalised image ``(C, Z, Y, X)`` float32, labels ``(Z, Y, X)``.

    ``ignore_value``: the label of voxels nobody reviewed, which no loss counts; it is not a foreground class,
    so patches are not centred on it (as nnU-Net leaves its ignore label out of its foreground classes).
    """

    image_czyx: np.ndarray
    labels_zyx: np.ndarray
    name: str = ""
    ignore_value: int | None = None

    def __post_init__(self) -> None:
        # each class's voxels in scan order (at most about 4096 of them, evenly thinned), found inside
        # the class's box: the same list as np.argwhere over the whole case, without a pass over a CT
        # per class
        self._class_voxels: dict[int, np.ndarray] = {}
        labels = self.labels_zyx
        highest = int(labels.max(initial=0))
        classes = [value for value in range(1, highest + 1) if value != self.ignore_value]
        for value, box in class_boxes(labels, classes).items():
            inside = labels[box] == value
            flat = np.flatnonzero(inside)  # thinned before the (N, 3) indices are made: a liver has 10 M voxels
            if len(flat) > 4096:
                flat = flat[:: len(flat) // 4096 + 1]
            self._class_voxels[value] = np.stack(np.unravel_index(flat, inside.shape), axis=1) + np.array([b.start for b in box])

    @property
    def foreground_classes(self) -> list[int]:
        return sorted(self._class_voxels)

    def class_voxels(self, value: int) -> np.ndarray:
        return self._class_voxels[value]


class PatchSampler:
    """Draws ``(image_patch, label_patch)`` pairs; deterministic under the generator it is given."""

    def __init__(
        self,
        cases: Sequence[TrainingCase],
        patch_size_zyx: Sequence[int],
        foreground_fraction: float = 0.5,
        flip_axes: Sequence[int] = (1, 2),
        intensity_jitter: float = 0.1,
        augment: AugmentConfig | None = None,
    ) -> None:
        """``augment`` replaces the light default (flips + ``intensity_jitter``) by :mod:`.augment`."""
        if not cases:
            raise ValueError("no training cases")
        self.cases = list(cases)
        self.patch = tuple(int(p) for p in patch_size_zyx)
        self.foreground_fraction = foreground_fraction
        self.flip_axes = tuple(flip_axes)
        self.intensity_jitter = intensity_jitter
        self.augment = augment

    def _start(self, rng: np.random.Generator, case: TrainingCase, shape: tuple[int, ...]) -> list[int]:
        classes = case.foreground_classes
        if classes and rng.random() < self.foreground_fraction:
            coords = case.class_voxels(classes[rng.integers(len(classes))])
            centre = coords[rng.integers(len(coords))]
            jitter = [int(rng.integers(-p // 4, p // 4 + 1)) for p in self.patch]
            return [int(c) - p // 2 + j for c, p, j in zip(centre, self.patch, jitter, strict=True)]
        return [int(rng.integers(0, max(s - p, 0) + 1)) for s, p in zip(shape, self.patch, strict=True)]

    def sample(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One augmented patch: image ``(C, *patch)`` float32, labels ``patch`` int64."""
        case = self.cases[rng.integers(len(self.cases))]
        shape = case.labels_zyx.shape
        start = self._start(rng, case, shape)
        image = _crop_pad(case.image_czyx, start, self.patch, channel_axis=True)
        labels = _crop_pad(case.labels_zyx, start, self.patch, channel_axis=False)
        if self.augment is not None:
            image, labels = augment_patch(rng, image, labels, self.augment)
            return image, np.ascontiguousarray(labels, dtype=np.int64)
        for axis in self.flip_axes:
            if rng.random() < 0.5:
                image = np.flip(image, axis + 1)
                labels = np.flip(labels, axis)
        if self.intensity_jitter > 0:
            scale = 1.0 + rng.uniform(-self.intensity_jitter, self.intensity_jitter)
            shift = rng.uniform(-self.intensity_jitter, self.intensity_jitter)
            image = image * np.float32(scale) + np.float32(shift)
        return np.ascontiguousarray(image, dtype=np.float32), np.ascontiguousarray(labels, dtype=np.int64)

    def batch(self, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
        """``size`` patches stacked: ``(B, C, *patch)`` and ``(B, *patch)``."""
        pairs = [self.sample(rng) for _ in range(size)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _crop_pad(array: np.ndarray, start: Sequence[int], patch: Sequence[int], channel_axis: bool) -> np.ndarray:
    """Crop ``patch`` at ``start`` (may reach outside: zero padding)."""
    spatial = array.shape[1:] if channel_axis else array.shape
    src, dst = [], []
    for s, p, n in zip(start, patch, spatial, strict=True):
        lo, hi = max(s, 0), min(s + p, n)
        src.append(slice(lo, max(hi, lo)))
        dst.append(slice(lo - s, lo - s + max(hi - lo, 0)))
    out_shape = ((array.shape[0],) if channel_axis else ()) + tuple(patch)
    out = np.zeros(out_shape, dtype=array.dtype)
    lead = (slice(None),) if channel_axis else ()
    out[lead + tuple(dst)] = array[lead + tuple(src)]
    return out
