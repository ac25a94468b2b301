"""Writing segmentation results: Slicer ``.seg.nrrd`` or labelmaps, instances, probabilities."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import io
from .errors import ImageError
from .fileutil import atomic_path
from .inference import SegmentationResult
from .io import LABELMAP_SUFFIXES, SegmentInfo
from .measurements import measure_segments, write_measurements_csv


def instance_segments(result: SegmentationResult) -> tuple[np.ndarray, list[SegmentInfo]]:
    """One labelmap where stuff classes keep their value and each thing instance is its own segment.

    Instance segments are named ``"<label name> <n>"`` (n = 1.. per class, largest first) and get
    label values above the card's; their colour is the class colour at varying brightness.
    """
    labels = result.labels.array_zyx
    card = result.card
    out = labels.astype(np.uint16)
    segments = [label.segment_info() for label in card.labels if not label.thing]
    things = {label.value: label for label in card.labels if label.thing}
    out[np.isin(labels, list(things))] = 0
    next_value = card.num_classes
    per_class: dict[int, int] = {}
    for inst in result.instances:
        spec = things[inst.label]
        per_class[inst.label] = per_class.get(inst.label, 0) + 1
        h, lightness, s = colorsys.rgb_to_hls(*spec.color)
        shade = min(0.9, max(0.25, lightness * (1.0 - 0.12 * ((per_class[inst.label] - 1) % 5 - 2))))
        info = spec.segment_info()
        out[result.instance_ids == inst.instance_id] = next_value
        segments.append(
            SegmentInfo(
                name=f"{spec.name} {per_class[inst.label]}",
                label_value=next_value,
                color_rgb=colorsys.hls_to_rgb(h, shade, s),
                terminology=info.terminology,
            )
        )
        next_value += 1
    return out, segments


def instances_path(path: str | Path) -> Path | None:
    """The second file a labelmap output gets with instances (``<name>_instances<suffix>``); None for ``.seg.nrrd``."""
    path = Path(path)
    suffix = next((s for s in LABELMAP_SUFFIXES if path.name.lower().endswith(s)), None)
    if suffix is None or io.is_segmentation_file(path):
        return None
    return path.with_name(path.name[: -len(suffix)] + "_instances" + suffix)


def write_segmentation_result(path: str | Path, result: SegmentationResult) -> Path:
    """Write labels (and instances, when computed) to ``.seg.nrrd`` or a labelmap file.

    A labelmap file gets the semantic labels; with instances a second file ``<name>_instances``
    holds the instance ids.
    """
    path = Path(path)
    name = path.name.lower()
    if io.is_segmentation_file(path):
        if result.instance_ids is not None:
            array, segments = instance_segments(result)
        else:
            array, segments = result.labels.array_zyx, [label.segment_info() for label in result.card.labels]
        return io.write_segmentation(path, result.labels.with_array(array), segments)
    if name.endswith(LABELMAP_SUFFIXES):
        io.write_image(result.labels, path)
        instances = instances_path(path)
        if result.instance_ids is not None and instances is not None:
            io.write_image(result.labels.with_array(result.instance_ids), instances)
        return path
    raise ImageError(
        "unsupported output file type", subject=path, expected=".seg.nrrd or " + ", ".join(LABELMAP_SUFFIXES), found=path.name
    )


def write_measurements(path: str | Path, result: SegmentationResult, intensity: io.Volume | Sequence[io.Volume]) -> Path:
    """Measure every label of the card (and each instance of its thing labels, when computed, and each
    multi-value region of a region-based nnU-Net model) against ``intensity`` (the segmented image, or its
    channels in the card's order: each channel's intensities then get columns of their own, named by the card)
    and write the table as CSV (see :mod:`.measurements`)."""
    card = result.card
    images = [intensity] if isinstance(intensity, io.Volume) else list(intensity)
    if len(images) > 1 and len(images) != len(card.inputs.channels):
        raise ImageError(
            "one image per input channel of the model is needed to measure each channel",
            expected=f"{len(card.inputs.channels)} ({', '.join(card.inputs.channels)})",
            found=str(len(images)),
        )
    several = len(images) > 1
    rows = measure_segments(
        result.labels,
        [label.segment_info() for label in card.labels],
        intensity=None if several else images[0],
        intensity_channels=list(zip(card.inputs.channels, images, strict=True)) if several else (),
        instance_ids_zyx=result.instance_ids,
        thing_values=[label.value for label in card.labels if label.thing],
        regions=[(region.row_name, region.values) for region in card.regions if len(region.values) > 1],
    )
    return write_measurements_csv(path, rows)


def write_probabilities(path: str | Path, result: SegmentationResult) -> Path:
    """Class probabilities as a 4D image ``(X, Y, Z, K)`` float32 on the input grid (K includes background;
    a region-based nnU-Net model's K is its regions' sigmoids, without a background channel)."""
    path = Path(path)
    if result.probabilities is None:
        raise ImageError("no probabilities were computed", hint="Pass keep_probabilities=True (CLI: --probabilities).")
    if not path.name.lower().endswith((".nii.gz", ".nii", ".nrrd", ".mha")):
        raise ImageError(
            "unsupported probability file type", subject=path, expected=".nii.gz, .nii, .nrrd or .mha", found=path.name
        )
    grid = result.labels
    channels = []
    for k in range(result.probabilities.shape[0]):
        image = sitk.GetImageFromArray(result.probabilities[k].astype(np.float32))
        image.SetSpacing(grid.spacing_xyz_mm)
        image.SetOrigin(grid.origin_lps)
        image.SetDirection(tuple(grid.direction_lps.reshape(-1)))
        channels.append(image)
    stacked = sitk.JoinSeries(channels)
    with atomic_path(path) as tmp:
        sitk.WriteImage(stacked, str(tmp), useCompression=True)
    return path
