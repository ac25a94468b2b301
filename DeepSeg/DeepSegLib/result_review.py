"""After a Segment run: how far to trust it and what it measures, in the scene (no Qt).

- :func:`show_uncertainty`: the uncertainty volume as a foreground overlay in the slice views (a
  heat colour map from 0 = certain to 1 = maximally uncertain, voxels below 0.1 transparent).
- :class:`UncertaintyNavigator`: **Next uncertain region** - centres the slice views on the next
  most uncertain connected region (:func:`deepseg_core.uncertainty.uncertain_regions`), cycling.
- :func:`measurements_table`: per-segment / per-instance measurements into a table node, with the
  column titles and units of Slicer's Segment Statistics.
- :func:`remove_review`: takes them out again (Undo last Segment).
- :func:`domain_check_text`: the domain-check event as the panel's verdict line.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import slicer
import vtk

from deepseg_core import io
from deepseg_core.measurements import (
    COLUMN_TITLES,
    INTENSITY_KEYS,
    SegmentMeasurement,
    column_title,
    measurement_record,
    read_measurements_csv,
)
from deepseg_core.uncertainty import DEFAULT_THRESHOLD, UncertainRegion, uncertain_regions

from .mrml_bridge import node_from_volume, volume_from_node
from .segment_job import STATS_FILE, UNCERTAINTY_FILE

#: preferred colour maps, first found wins (Inferno ships with Slicer; Iron is always there).
UNCERTAINTY_COLOR_NODE_IDS = ("vtkMRMLColorTableNodeFileInferno.txt", "vtkMRMLColorTableNodeIron")
UNCERTAINTY_DISPLAY_FLOOR = 0.1
UNCERTAINTY_OPACITY = 0.5
UNCERTAINTY_ATTRIBUTE = "DeepSeg.Uncertainty"
_UNITS = {
    "voxel_count": "voxels",
    "volume_mm3": "mm3",
    "volume_ml": "cm3",
    "surface_area_mm2": "mm2",
    "feret_diameter_mm": "mm",
    **{k: "mm" for k in COLUMN_TITLES if k.startswith("centroid_")},
}


def show_uncertainty(
    scene: slicer.vtkMRMLScene, uncertainty: io.Volume, name: str, replace: slicer.vtkMRMLScalarVolumeNode | None = None
) -> slicer.vtkMRMLScalarVolumeNode:
    """Add (or refill ``replace``) a volume node with the uncertainty map and overlay it in every slice view."""
    if replace is not None and scene.GetNodeByID(replace.GetID()) is not None:
        scene.RemoveNode(replace)
    node = node_from_volume(scene, uncertainty.with_array(uncertainty.array_zyx.astype("float32")), name)
    node.SetAttribute(UNCERTAINTY_ATTRIBUTE, "1")
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    for color_id in UNCERTAINTY_COLOR_NODE_IDS:
        if scene.GetNodeByID(color_id) is not None:
            display.SetAndObserveColorNodeID(color_id)
            break
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.AutoThresholdOff()
    display.SetLowerThreshold(UNCERTAINTY_DISPLAY_FLOOR)
    display.SetUpperThreshold(1.0)
    display.ApplyThresholdOn()
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    for i in range(composites.GetNumberOfItems()):
        composite = composites.GetItemAsObject(i)
        composite.SetForegroundVolumeID(node.GetID())
        composite.SetForegroundOpacity(UNCERTAINTY_OPACITY)
    return node


class UncertaintyNavigator:
    """Steps the slice views through the uncertain regions of one uncertainty map, most uncertain first."""

    def __init__(self, uncertainty: io.Volume, threshold: float = DEFAULT_THRESHOLD, min_volume_mm3: float = 1.0) -> None:
        self.regions: list[UncertainRegion] = uncertain_regions(uncertainty, threshold, min_volume_mm3)
        self._next = 0

    def __len__(self) -> int:
        return len(self.regions)

    def next_region(self, scene: slicer.vtkMRMLScene) -> UncertainRegion | None:
        """Centre every slice view on the next region (wrapping around); None when there is none."""
        if not self.regions:
            return None
        region = self.regions[self._next % len(self.regions)]
        self._next += 1
        r, a, s = region.centre_ras_mm
        slicer.vtkMRMLSliceNode.JumpAllSlices(scene, r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
        return region

    def status(self, region: UncertainRegion | None) -> str:
        """Panel text for the region just shown."""
        if region is None:
            return "No uncertain region (every voxel below the threshold)."
        return (
            f"Uncertain region {region.rank} of {len(self.regions)}: {region.volume_ml * 1000:.0f} mm3, "
            f"mean uncertainty {region.mean_entropy:.2f}."
        )


def measurements_table(
    scene: slicer.vtkMRMLScene,
    rows: Sequence[SegmentMeasurement] | Sequence[Mapping[str, Any]],
    name: str,
    replace: slicer.vtkMRMLTableNode | None = None,
) -> slicer.vtkMRMLTableNode:
    """A table node with one row per segment / instance; numeric columns are doubles with a unit property.

    ``rows``: :class:`SegmentMeasurement` objects, or dicts keyed as :func:`measurement_record` keys them (a read
    CSV). A multi-channel image's intensity columns are per channel (``Mean (FLAIR)``).
    """
    if replace is not None and scene.GetNodeByID(replace.GetID()) is not None:
        scene.RemoveNode(replace)
    records = [measurement_record(r) if isinstance(r, SegmentMeasurement) else dict(r) for r in rows]
    table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = table_node.GetTable()
    # every column of the table DeepSeg writes, also for rows that lack some; a multi-channel image's per-channel
    # intensity columns (keys such as "intensity_mean (FLAIR)") stand in for the plain ones
    by_channel = [key for key in records[0] if key not in COLUMN_TITLES] if records else []
    for key in [key for key in COLUMN_TITLES if not (by_channel and key in INTENSITY_KEYS)] + by_channel:
        array = vtk.vtkStringArray() if key == "segment" else vtk.vtkDoubleArray()
        array.SetName(column_title(key))
        for record in records:
            value = record.get(key, "")
            if key == "segment":
                array.InsertNextValue(str(value))
            else:
                array.InsertNextValue(float(value) if value not in ("", None) else math.nan)
        table.AddColumn(array)
    for key, unit in _UNITS.items():
        table_node.SetColumnUnitLabel(COLUMN_TITLES[key], unit)
    table_node.Modified()
    return table_node


@dataclass
class ReviewOutputs:
    """What :func:`load_review` put into the scene for one finished run."""

    uncertainty_node: slicer.vtkMRMLScalarVolumeNode | None = None
    navigator: UncertaintyNavigator | None = None
    table_node: slicer.vtkMRMLTableNode | None = None


def load_review(
    scene: slicer.vtkMRMLScene,
    job_folder: str | Path,
    volume_node: slicer.vtkMRMLScalarVolumeNode,
    previous: ReviewOutputs | None = None,
) -> ReviewOutputs:
    """Uncertainty overlay, navigator and measurement table from a finished job's folder.

    Files missing from the folder (the run did not ask for them) are skipped. Nodes of ``previous``
    are replaced, so repeated runs do not pile up volumes and tables.
    """
    folder = Path(job_folder)
    previous = previous or ReviewOutputs()
    out = ReviewOutputs()
    base = volume_node.GetName()
    uncertainty_file = folder / UNCERTAINTY_FILE
    if uncertainty_file.is_file():
        uncertainty = io.read_image(uncertainty_file)
        grid = volume_from_node(volume_node)
        if not uncertainty.same_grid(grid, tolerance_mm=1e-3):
            raise io.ImageError("the uncertainty map is not on the input volume's grid", subject=uncertainty_file)
        out.uncertainty_node = show_uncertainty(scene, uncertainty, f"{base} uncertainty", replace=previous.uncertainty_node)
        out.navigator = UncertaintyNavigator(uncertainty)
    stats_file = folder / STATS_FILE
    if stats_file.is_file():
        out.table_node = measurements_table(
            scene, read_measurements_csv(stats_file), f"{base} measurements", replace=previous.table_node
        )
    return out


def remove_review(scene: slicer.vtkMRMLScene, review: ReviewOutputs | None) -> None:
    """Take a run's overlay and table out of the scene (with **Undo last Segment**); slice views drop the overlay."""
    if review is None:
        return
    for node in (review.uncertainty_node, review.table_node):
        if node is not None and scene.GetNodeByID(node.GetID()) is not None:
            scene.RemoveNode(node)
    review.uncertainty_node = review.table_node = None
    review.navigator = None


def domain_check_text(event: Mapping[str, Any]) -> tuple[str, str]:
    """``(verdict, text)`` for the panel from a ``domain_check`` event (see ``deepseg segment --json``)."""
    verdict = str(event.get("verdict", "ok"))
    reasons = list(event.get("reasons") or [])
    if verdict == "ok":
        return verdict, "Input looks like the model's training data."
    title = "Out of distribution" if verdict == "out_of_distribution" else "Caution"
    return verdict, f"{title}: " + " ".join(reasons) + " Check the result carefully."
