"""The ``monai_bundle`` pipeline: a MONAI bundle's own inference, reproduced step by step.

A bundle's ``inference.json`` chains MONAI transforms, an inferer and postprocessing. The importer
(:mod:`deepseg_core.importers.monai_bundle`) maps the ones DeepSeg reproduces exactly into this
pipeline's config (``card.pipeline["config"]``, see :func:`parse_config`); everything else is
refused at import. The semantics are MONAI 1.6's; they were checked voxel by voxel against
MONAI's own bundle runner (``Testing/foreign/test_monai_import.py``). One module each:

- :mod:`.settings`: the pipeline config, parsed and checked;
- :mod:`.geometry`: ``Orientationd`` (axes permuted and flipped) and ``Spacingd``'s output grid;
- :mod:`.resampling`: linear (edge values outside) and nearest (ties to even) resampling;
- :mod:`.intensity`: the intensity transforms in float32 with MONAI's order of operations;
- :mod:`.crop`: ``CropForegroundd``;
- :mod:`.tiling`: MONAI's tile placement and Gaussian weights, registered for the sliding window
  when this package is imported (placement ``monai``, importance ``monai_gaussian``);
- :mod:`.collector`: the way back (activation, ``Invertd``, argmax) streamed slab by slab;
- :mod:`.pipeline`: :class:`MonaiBundlePipeline`, which ties them together.
"""

from __future__ import annotations

from .collector import BundleGridCollector
from .crop import CropBox, crop_pad, foreground_box
from .geometry import AFFINE_TOL, AxisReorder, grid_of, ijk_to_ras, index_mapping, spacing_grid, voxel_axis_codes
from .intensity import (
    INTENSITY_FUNCTIONS,
    normalize_intensity,
    scale_intensity,
    scale_intensity_range,
    scale_intensity_range_percentiles,
)
from .pipeline import MonaiBundlePipeline
from .resampling import interpolate_axis, nearest_indices, resample_linear_border, resample_nearest, scaled_positions
from .settings import (
    ACTIVATIONS,
    INTENSITY_OPS,
    INVERT_INTERPOLATIONS,
    STEP_FIELDS,
    BundleSettings,
    InfererSettings,
    PostprocessingSettings,
    parse_config,
)
from .tiling import PAD_FOR_MONAI, monai_gaussian_importance, monai_tile_starts

__all__ = [
    "ACTIVATIONS",
    "AFFINE_TOL",
    "INTENSITY_FUNCTIONS",
    "INTENSITY_OPS",
    "INVERT_INTERPOLATIONS",
    "PAD_FOR_MONAI",
    "STEP_FIELDS",
    "AxisReorder",
    "BundleGridCollector",
    "BundleSettings",
    "CropBox",
    "InfererSettings",
    "MonaiBundlePipeline",
    "PostprocessingSettings",
    "crop_pad",
    "foreground_box",
    "grid_of",
    "ijk_to_ras",
    "index_mapping",
    "interpolate_axis",
    "monai_gaussian_importance",
    "monai_tile_starts",
    "nearest_indices",
    "normalize_intensity",
    "parse_config",
    "resample_linear_border",
    "resample_nearest",
    "scale_intensity",
    "scale_intensity_range",
    "scale_intensity_range_percentiles",
    "scaled_positions",
    "spacing_grid",
    "voxel_axis_codes",
]
