"""The ``monai_bundle`` pipeline class: preparation, sliding-window settings and way back of a bundle.

:meth:`MonaiBundlePipeline.prepare` runs the bundle's ``steps`` in its order (:mod:`.geometry`,
:mod:`.resampling`, :mod:`.intensity`, :mod:`.crop`); :meth:`~MonaiBundlePipeline.window_config`
tiles as MONAI does (:mod:`.tiling`); :meth:`~MonaiBundlePipeline.collector` brings the logits back
onto the input grid (:mod:`.collector`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...errors import ConfigError, ImageError
from ...inference.pipelines import Geometry, NetworkGrid, Pipeline, PreparedInput, torch_view
from ...inference.sliding_window import SlidingWindowConfig
from ...io import Volume
from .collector import BundleGridCollector
from .crop import CropBox, crop_pad, foreground_box
from .geometry import AxisReorder, grid_of, spacing_grid
from .intensity import INTENSITY_FUNCTIONS
from .resampling import resample_linear_border, resample_nearest
from .settings import parse_config
from .tiling import PAD_FOR_MONAI

# the package's name, not this module's: log lines keep the name they had before the package was split
log = logging.getLogger(__package__)


@dataclass
class _Prepared:
    data: torch.Tensor
    label: np.ndarray | None
    reorder: AxisReorder
    oriented: Geometry
    model: Geometry
    crop: CropBox | None


class MonaiBundlePipeline(Pipeline):
    """Preparation, sliding-window settings and way back of a MONAI bundle (the package docstring)."""

    name = "monai_bundle"

    def __init__(self, card: Any, spatial_dims: int, context_slices: int) -> None:
        super().__init__(card, spatial_dims, context_slices)
        if spatial_dims != 3:
            raise ConfigError("MONAI bundle models are 3D", found=f"spatial_dims {spatial_dims}")
        self.settings = parse_config(self.config)

    # -------------------------------------------------------------- preprocessing
    def _run_steps(self, channels: Sequence[Volume], label: Volume | None = None) -> _Prepared:
        grid = grid_of(channels[0])
        data = torch.from_numpy(np.stack([np.asarray(v.array_zyx, dtype=np.float32) for v in channels]))
        label_array = None if label is None else np.asarray(label.array_zyx)
        reorder, oriented, crop = AxisReorder(), grid, None
        for step in self.settings.steps:
            op = step["op"]
            if op == "orientation":
                reorder = AxisReorder.towards(np.asarray(grid.direction_lps).reshape(3, 3), step["axcodes"])
                if not reorder.identity:
                    data = torch_view(reorder.apply(data.numpy()))
                    label_array = None if label_array is None else np.ascontiguousarray(reorder.apply(label_array))
                    grid = reorder.geometry(grid)
                oriented = grid
            elif op == "spacing":
                target = spacing_grid(grid, step["pixdim_xyz_mm"])
                if target is not None:
                    if step["mode"] == "nearest":
                        data = torch.from_numpy(resample_nearest(data.numpy(), grid, target))
                    else:
                        data = torch.from_numpy(np.stack([resample_linear_border(c, grid, target) for c in data.numpy()]))
                    label_array = None if label_array is None else resample_nearest(label_array, grid, target)
                    grid = target
            elif op == "crop_foreground":
                crop = foreground_box(data, step["margin_xyz"], step["allow_smaller"])
                data = crop_pad(data, crop)
                label_array = None if label_array is None else crop_pad(label_array, crop)
            else:
                data = INTENSITY_FUNCTIONS[op](data, step).to(torch.float32)
        return _Prepared(data, label_array, reorder, oriented, grid, crop)

    def network_grid(self, channels: Sequence[Volume]) -> NetworkGrid:
        """The grid the bundle's orientation and spacing steps put the channels on (no voxels moved),
        before a ``CropForegroundd``, whose box depends on the intensity steps before it (not taken
        into account: a crop makes the grid smaller, unless its margin reaches past the image)."""
        grid, names = grid_of(channels[0]), ("z", "y", "x")
        for step in self.settings.steps:
            if step["op"] == "orientation":
                reorder = AxisReorder.towards(np.asarray(grid.direction_lps).reshape(3, 3), step["axcodes"])
                if not reorder.identity:
                    grid = reorder.geometry(grid)
                    names = tuple(names["zyx".index(a)] for a in reorder.input_axis_names())
            elif step["op"] == "spacing":
                grid = spacing_grid(grid, step["pixdim_xyz_mm"]) or grid
        spacing = grid.spacing_xyz_mm
        shape = tuple(int(n) for n in grid.shape_zyx)
        return NetworkGrid(shape, (float(spacing[2]), float(spacing[1]), float(spacing[0])), names)  # type: ignore[arg-type]

    def prepare(self, channels: Sequence[Volume]) -> PreparedInput:
        """The network input ``(C, Z, Y, X)`` float32 on the (cropped) model grid, as the bundle prepares it.

        ``context`` holds the reorder, the oriented input grid, the model grid and the crop box.
        """
        run = self._run_steps(channels)
        image = np.ascontiguousarray(run.data.numpy(), dtype=np.float32)
        log.debug("MONAI bundle input %s -> network input %s", channels[0].shape_zyx, image.shape)
        context = {"reorder": run.reorder, "oriented_grid": run.oriented, "model_grid": run.model, "crop": run.crop}
        return PreparedInput(image, None, context)

    def prepare_training_case(self, images: Sequence[Volume], label: Volume | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A training case as the bundle's preprocessing makes it (for fine-tuning).

        Args:
            images: one volume per input channel, on one grid.
            label: label values on the same grid (a Volume, or its ``(Z, Y, X)`` array).

        Returns:
            ``(image_czyx, label_zyx)``: float32 ``(C, Z, Y, X)`` network input (exactly what
            :meth:`prepare` makes) and the labels on the same (cropped) model grid, reoriented and
            resampled with nearest neighbours (ties to even), 0 where the crop extends beyond the
            image; the label dtype is kept.
        """
        array = label.array_zyx if isinstance(label, Volume) else np.asarray(label)
        if tuple(array.shape) != tuple(images[0].shape_zyx) or (isinstance(label, Volume) and not label.same_grid(images[0])):
            raise ImageError(
                "the label map is not on the image's grid",
                expected=f"shape {images[0].shape_zyx} and the image's geometry",
                found=f"shape {tuple(array.shape)}",
            )
        run = self._run_steps(images, images[0].with_array(array))
        assert run.label is not None
        return np.ascontiguousarray(run.data.numpy(), dtype=np.float32), np.ascontiguousarray(run.label)

    # -------------------------------------------------------------- sliding window
    def window_config(self, options: Any) -> SlidingWindowConfig:
        """MONAI's tiling (placement ``monai``, constant or ``monai_gaussian`` weights, logits blended)."""
        inferer = self.settings.inferer
        mirror = (0, 1, 2) if options.tta or options.uncertainty == "tta" else ()
        return SlidingWindowConfig(
            patch_size_zyx=tuple(inferer.roi_size_xyz[::-1]),  # type: ignore[arg-type]
            overlap=inferer.overlap if options.overlap is None else options.overlap,
            batch_size=options.batch_size or inferer.sw_batch_size,
            sigma_scale=inferer.sigma_scale,
            mirror_axes=mirror,
            intensity_perturbations=options.uncertainty_perturbations if options.uncertainty == "tta" else (),
            repeats=options.uncertainty_passes if options.uncertainty == "mc_dropout" else 1,
            placement="monai",
            importance="monai_gaussian" if inferer.mode == "gaussian" else "constant",
            blend="logits",
            pad=PAD_FOR_MONAI[inferer.padding_mode],
        )

    def collector(self, prepared: PreparedInput, reference: Volume, options: Any) -> BundleGridCollector:
        """Logit slabs -> labels on ``reference`` as the bundle's postprocessing makes them."""
        context = prepared.context
        if "model_grid" not in context:
            raise ConfigError("internal: the MONAI bundle pipeline needs the context of its own prepare()")
        return BundleGridCollector(
            model_grid=context["model_grid"],
            oriented_grid=context["oriented_grid"],
            reorder=context["reorder"],
            crop=context["crop"],
            channels=self.card.num_classes,
            postprocessing=self.settings.postprocessing,
            keep_probabilities=options.keep_probabilities,
            uncertainty=options.uncertainty is not None,
        )
