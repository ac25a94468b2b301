"""What the DeepSeg panel and the Segment Editor effect do to the scene (no Qt).

- :func:`apply_segmentation_file`: a finished job's ``.seg.nrrd`` into the output segmentation node
  (DeepSeg's earlier segments replaced, hand-added ones kept, prediction remembered for export).
- :func:`export_corrected_case`: the corrected segmentation and its image into a dataset, checked
  against the dataset's label schema, with provenance and correction effort.
"""

from __future__ import annotations

import functools
import logging
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import slicer
import vtk

from deepseg_core import io
from deepseg_core.datasets import CaseProvenance, CaseRecord, Dataset, DatasetError, correction_effort

from .mrml_bridge import (
    INPUT_VOLUME_REFERENCE,
    LABEL_TAG,
    SegmentationSnapshot,
    deepseg_segment_ids,
    segment_mask,
    specs_from_segmentation,
    volume_from_node,
    write_result_segments,
)

log = logging.getLogger(__name__)

MODEL_ATTRIBUTE = "DeepSeg.Model"
PREDICTION_ATTRIBUTE = "DeepSeg.PredictionPath"


def prediction_cache_folder() -> Path:
    """Where predictions are kept so an export can measure what the user changed."""
    folder = Path.home() / ".deepseg" / "predictions"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def apply_segmentation_file(
    seg_path: str | Path,
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    volume_node: slicer.vtkMRMLScalarVolumeNode,
    model_ref: str,
    keep_prediction: bool = True,
) -> tuple[list[str], SegmentationSnapshot]:
    """Put a result file's segments into ``segmentation_node`` on ``volume_node``'s grid.

    Returns:
        ``(new segment ids, snapshot of the node before)``; ``snapshot.restore()`` undoes the run.
    """
    grid = volume_from_node(volume_node)
    if segmentation_node.GetParentTransformNode() is not None:
        # segments are written on the volume's grid, in the node's own frame: under a transform they would be
        # shown (and exported, which applies it) moved away from the image
        raise io.ImageError(
            "the output segmentation is under a transform",
            subject=segmentation_node.GetName(),
            hint="Choose another output segmentation, or harden or remove its transform (Data module) first.",
        )
    result = io.read_segmentation(seg_path)
    if not result.grid.same_grid(grid, tolerance_mm=1e-3):
        raise io.ImageError(
            "the result is not on the input volume's grid",
            subject=seg_path,
            expected=f"{grid.shape_zyx} at {grid.origin_lps}",
            found=f"{result.grid.shape_zyx} at {result.grid.origin_lps}",
        )
    snapshot = SegmentationSnapshot(segmentation_node)
    ids = write_result_segments(segmentation_node, specs_from_segmentation(result), grid, model_ref)
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(volume_node)
    segmentation_node.SetNodeReferenceID(INPUT_VOLUME_REFERENCE, volume_node.GetID())
    segmentation_node.SetAttribute(MODEL_ATTRIBUTE, model_ref)
    if keep_prediction:
        kept = prediction_cache_folder() / f"{uuid.uuid4().hex}.seg.nrrd"
        shutil.copyfile(seg_path, kept)
        segmentation_node.SetAttribute(PREDICTION_ATTRIBUTE, str(kept))
    return ids, snapshot


def labelmap_from_segments(segmentation_node: slicer.vtkMRMLSegmentationNode, grid: io.Volume, dataset: Dataset) -> np.ndarray:
    """The node's segments as one labelmap ``(Z, Y, X)`` of the dataset's values.

    Every segment name must be in the schema (instances map to their thing label). Where segments
    overlap, the higher schema value wins (a lesion drawn over the organ stays a lesion).
    """
    segmentation = segmentation_node.GetSegmentation()
    segments = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(index)
        mask_of = functools.partial(segment_mask, segmentation_node, segment_id, grid)
        segments.append((segmentation.GetSegment(segment_id).GetName(), mask_of))
    return dataset.labelmap_from_segments(grid.shape_zyx, segments)


def _prediction_labelmap(
    path: Path, grid: io.Volume, dataset: Dataset, segmentation_node: slicer.vtkMRMLSegmentationNode
) -> np.ndarray | None:
    """The cached prediction as the dataset's labelmap, or None where it cannot be compared (gone, another grid).

    A predicted segment is taken under the model's name where the dataset's schema has it, so that renaming it
    to another label counts as a correction. Where the schema does not have it (a dataset that names its labels
    otherwise), under the name the user gave that segment (the node's DeepSeg segments carry the model's label
    value); where neither is in the schema (a model label the dataset lacks), it is background, as the
    training's label matching counts it.
    """
    if not path.exists():
        return None
    prediction = io.read_segmentation(path)
    if not prediction.grid.same_grid(grid, tolerance_mm=1e-3):
        return None
    renamed = _names_of_predicted_segments(segmentation_node)
    segments = []
    for info in prediction.segments:
        name = next((n for n in (info.name, renamed.get(info.label_value)) if n is not None and _in_schema(dataset, n)), None)
        if name is None:
            log.info("predicted segment %r is not in the dataset's label schema: background for the correction effort", info.name)
            continue
        segments.append((name, functools.partial(prediction.mask, info.name)))
    return dataset.labelmap_from_segments(grid.shape_zyx, segments)


def _in_schema(dataset: Dataset, name: str) -> bool:
    try:
        dataset.value_for_segment(name)
    except DatasetError:
        return False
    return True


def _names_of_predicted_segments(segmentation_node: slicer.vtkMRMLSegmentationNode) -> dict[int, str]:
    """Model label value -> the name now of the segment DeepSeg wrote for it (tagged ``DeepSeg.LabelValue``)."""
    segmentation = segmentation_node.GetSegmentation()
    names = {}
    for segment_id in deepseg_segment_ids(segmentation_node):
        segment = segmentation.GetSegment(segment_id)
        value = vtk.mutable("")
        if segment.GetTag(LABEL_TAG, value) and str(value).isdigit():
            names[int(str(value))] = segment.GetName()
    return names


def export_corrected_case(
    dataset_folder: str | Path,
    case_id: str,
    volume_node: slicer.vtkMRMLScalarVolumeNode,
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    overwrite: bool = False,
    split: str | None = None,
    additional_volume_nodes: Sequence[slicer.vtkMRMLScalarVolumeNode] = (),
) -> CaseRecord:
    """Write the corrected segmentation and its image as a dataset case.

    Provenance: the volume's name and file, the model version that predicted it (node attribute),
    and, when the prediction is still cached, the voxels changed and the Dice between prediction and
    correction. Refuses unknown segment names (with how to add them), an existing case without
    ``overwrite``, and images whose channel count does not match the dataset.
    """
    dataset = Dataset.open(dataset_folder)
    grid = volume_from_node(volume_node)
    labels = labelmap_from_segments(segmentation_node, grid, dataset)
    storage = volume_node.GetStorageNode()
    source = volume_node.GetName() + (f" ({storage.GetFileName()})" if storage is not None and storage.GetFileName() else "")
    provenance = CaseProvenance(source=source, predicted_by=segmentation_node.GetAttribute(MODEL_ATTRIBUTE))
    prediction_path = segmentation_node.GetAttribute(PREDICTION_ATTRIBUTE)
    if prediction_path:
        predicted = _prediction_labelmap(Path(prediction_path), grid, dataset, segmentation_node)
        if predicted is not None:
            effort = correction_effort(predicted, labels, [label.value for label in dataset.labels], grid.voxel_volume_ml)
            provenance = CaseProvenance(**{**provenance.__dict__, **effort})
    images = [grid, *(volume_from_node(node) for node in additional_volume_nodes)]
    return dataset.add_case(case_id, images, labels, provenance, split=split, overwrite=overwrite)
