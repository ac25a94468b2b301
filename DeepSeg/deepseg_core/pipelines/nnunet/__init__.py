"""nnU-Net v2's inference pipeline, reimplemented by DeepSeg (card pipeline ``nnunetv2``).

An imported nnU-Net model (:mod:`deepseg_core.importers.nnunet`) segments exactly as
``nnUNetPredictor`` does, with DeepSeg's own code (``nnunetv2`` is never imported here):
preprocessing as nnU-Net's ``DefaultPreprocessor`` (transpose, crop, normalise, resample), nnU-Net's
sliding window (step rule, Gaussian, logits blended and averaged over folds), and its export
(logits resampled back, argmax or, for region-based models, sigmoid regions written in
``regions_class_order``; crop reverted, transposed back), streamed slab by slab.

Where DeepSeg differs from ``nnUNetPredictor`` (none of these changes the segmentation beyond
near-ties; the parity tests and ``Testing/Benchmarks/bench_nnunet_parity.py`` measure it): tiles
are blended in float32 slabs where nnU-Net accumulates float16 (:mod:`.pipeline`), and the export
interpolates axis by axis in float32 (:mod:`.export`). One module each:

- :mod:`.orientation`: TotalSegmentator's reorientation to the closest RAS orientation (setting
  ``reorient: "ras"``; the default ``none`` keeps nnU-Net's own behaviour);
- :mod:`.resampling`: ``default_resampling`` of images, label maps and the export's positions;
- :mod:`.crop`: the crop to the non-zero voxels;
- :mod:`.normalization`: the per-channel normalisation schemes;
- :mod:`.tiling`: nnU-Net's tile placement and Gaussian, registered for the sliding window when
  this package is imported (placement and importance ``nnunet``);
- :mod:`.export`: :class:`NnUNetExportCollector`, the way back, slab by slab;
- :mod:`.pipeline`: :class:`NnUNetPipeline`, which ties them together.
"""

from __future__ import annotations

from .crop import nonzero_bbox
from .export import (
    CANDIDATE_MIN_CLASSES,
    EXPORT_CHUNK_BYTES,
    GENERIC_BILINEAR_MIN_CHANNELS,
    NnUNetExportCollector,
    candidate_channels,
)
from .normalization import NORMALIZATION_SCHEMES, normalise_channels
from .orientation import REORIENTATIONS
from .pipeline import NnUNetPipeline
from .resampling import (
    ANISOTROPY_THRESHOLD,
    linear_positions,
    nearest_positions,
    nnunet_target_shape,
    resample_image,
    resample_labels,
    resize_array,
    resize_labels,
    separate_axis,
)
from .tiling import GAUSSIAN_PEAK, nnunet_gaussian, nnunet_tile_starts

__all__ = [
    "ANISOTROPY_THRESHOLD",
    "CANDIDATE_MIN_CLASSES",
    "EXPORT_CHUNK_BYTES",
    "GAUSSIAN_PEAK",
    "GENERIC_BILINEAR_MIN_CHANNELS",
    "NORMALIZATION_SCHEMES",
    "REORIENTATIONS",
    "NnUNetExportCollector",
    "NnUNetPipeline",
    "candidate_channels",
    "linear_positions",
    "nearest_positions",
    "nnunet_gaussian",
    "nnunet_target_shape",
    "nnunet_tile_starts",
    "nonzero_bbox",
    "normalise_channels",
    "resample_image",
    "resample_labels",
    "resize_array",
    "resize_labels",
    "separate_axis",
]
