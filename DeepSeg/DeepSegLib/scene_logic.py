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
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import slicer
import vtk

from deepseg_core import io
from deepseg_core.datasets import CaseProvenance, CaseRecord, Dataset, DatasetError, correction_effort

from .mrml_bridge import (
    ADDITIONAL_VOLUME_REFERENCE,
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


#: a cached prediction no segmentation of the open scene refers to is removed once this old, or sooner (oldest
#: first) while the cache holds more than PREDICTION_CACHE_MAX_BYTES: every Segment keeps one, and without a
#: bound the folder grew by a result file per click for ever
PREDICTION_CACHE_MAX_AGE_DAYS = 30
PREDICTION_CACHE_MAX_BYTES = 2 * 1024**3


def prediction_cache_folder() -> Path:
    """Where predictions are kept so an export can measure what the user changed."""
    folder = Path.home() / ".deepseg" / "predictions"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def predictions_referenced(scene: slicer.vtkMRMLScene) -> set[Path]:
    """The cached predictions that the scene's segmentation nodes refer to (``DeepSeg.PredictionPath``)."""
    referenced = set()
    nodes = scene.GetNodesByClass("vtkMRMLSegmentationNode")
    for index in range(nodes.GetNumberOfItems()):
        path = nodes.GetItemAsObject(index).GetAttribute(PREDICTION_ATTRIBUTE)
        if path:
            referenced.add(Path(path).resolve())
    return referenced


def prune_prediction_cache(keep: set[Path], now_s: float | None = None) -> list[Path]:
    """Remove cached predictions not in ``keep`` that are older than PREDICTION_CACHE_MAX_AGE_DAYS, then the
    oldest of the rest while the folder holds more than PREDICTION_CACHE_MAX_BYTES.

    A removed prediction only costs the correction effort of a later export from a segmentation that still
    refers to it (a scene saved and reopened, another Slicer session): the export goes on without it and logs
    that. Returns the removed files.
    """
    folder = prediction_cache_folder()
    now_s = time.time() if now_s is None else now_s
    candidates = []
    total_bytes = 0
    for path in folder.glob("*.seg.nrrd"):
        try:
            stat = path.stat()
        except FileNotFoundError:  # another session pruned it first
            continue
        total_bytes += stat.st_size
        if path.resolve() not in keep:
            candidates.append((stat.st_mtime, stat.st_size, path))
    removed = []
    for mtime, size, path in sorted(candidates):
        too_old = now_s - mtime > PREDICTION_CACHE_MAX_AGE_DAYS * 86400
        if not too_old and total_bytes <= PREDICTION_CACHE_MAX_BYTES:
            break
        path.unlink(missing_ok=True)
        total_bytes -= size
        removed.append(path)
    if removed:
        log.info(
            "removed %d cached prediction(s) from %s (older than %d days, or the cache was over %.1f GB)",
            len(removed),
            folder,
            PREDICTION_CACHE_MAX_AGE_DAYS,
            PREDICTION_CACHE_MAX_BYTES / 1e9,
        )
    return removed


def forget_prediction(scene: slicer.vtkMRMLScene, path: str | None) -> bool:
    """Remove the cached prediction ``path`` (one of DeepSeg's, after an Undo) once no node of the scene refers
    to it. Returns whether it was removed."""
    if not path:
        return False
    cached = Path(path).resolve()
    if cached.parent != prediction_cache_folder().resolve() or cached in predictions_referenced(scene):
        return False
    cached.unlink(missing_ok=True)
    return True


def apply_segmentation_file(
    seg_path: str | Path,
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    volume_node: slicer.vtkMRMLScalarVolumeNode,
    model_ref: str,
    keep_prediction: bool = True,
    additional_volume_node: slicer.vtkMRMLScalarVolumeNode | None = None,
) -> tuple[list[str], SegmentationSnapshot]:
    """Put a result file's segments into ``segmentation_node`` on ``volume_node``'s grid.

    The node then refers to the volumes the run read (``volume_node``, and ``additional_volume_node`` for a
    two-channel model), so that an export can check it pairs the labels with those volumes
    (:func:`check_export_volumes`).

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
    segmentation_node.SetNodeReferenceID(
        ADDITIONAL_VOLUME_REFERENCE, additional_volume_node.GetID() if additional_volume_node is not None else None
    )
    segmentation_node.SetAttribute(MODEL_ATTRIBUTE, model_ref)
    if keep_prediction:
        kept = prediction_cache_folder() / f"{uuid.uuid4().hex}.seg.nrrd"
        shutil.copyfile(seg_path, kept)
        segmentation_node.SetAttribute(PREDICTION_ATTRIBUTE, str(kept))
        # the one the node had before stays for Undo
        before = snapshot.attributes.get(PREDICTION_ATTRIBUTE)
        keep = predictions_referenced(segmentation_node.GetScene()) | ({Path(before).resolve()} if before else set())
        prune_prediction_cache(keep)
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


def _node_label(node: slicer.vtkMRMLNode) -> str:
    return f"'{node.GetName()}' ({node.GetID()})"


def check_export_volumes(
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    volume_node: slicer.vtkMRMLScalarVolumeNode,
    additional_volume_nodes: Sequence[slicer.vtkMRMLScalarVolumeNode] = (),
) -> None:
    """Refuse to pair ``segmentation_node``'s labels with volumes they were not drawn on.

    Two volumes of one patient often share a grid (series of one study, a copy, a filtered version), so the
    grid check of the export cannot tell them apart: a segmentation made on one and exported with another would
    enter the dataset as a case whose labels do not fit its image, and train every later model on it.
    The segmentation's own volume is the one DeepSeg segmented (``DeepSeg.InputVolume``) or the one its geometry
    comes from (``referenceImageGeometryRef``: the Segment Editor's first source volume, a DICOM SEG's referenced
    series); ``volume_node`` must be one of them, so that setting the geometry to another volume (the Segment
    Editor's *Specify geometry*) is how a user says the labels belong to that one. A geometry taken from a node
    that is not a volume (a segmentation, model or ROI) names no volume. The second channel must be the one the
    run read, where the node records it (``DeepSeg.AdditionalVolume``). A node that refers to no volume still in
    the scene (a segmentation loaded from a ``.seg.nrrd`` file: Slicer sets no reference then) is not checked.

    Raises:
        io.ImageError: naming both volumes and what to do.
    """
    made_on: list[slicer.vtkMRMLNode] = []
    for role in (INPUT_VOLUME_REFERENCE, segmentation_node.GetReferenceImageGeometryReferenceRole()):
        node = segmentation_node.GetNodeReference(role)
        # Specify geometry may also take a segmentation, model or ROI: those say nothing about which volume
        if node is not None and node.IsA("vtkMRMLVolumeNode") and all(node.GetID() != other.GetID() for other in made_on):
            made_on.append(node)
    if made_on and not any(node.GetID() == volume_node.GetID() for node in made_on):
        raise io.ImageError(
            "the segmentation was not made on the input volume: the case would pair that volume's voxels with"
            " labels drawn on another",
            subject=segmentation_node.GetName(),
            expected=f"input volume {' or '.join(_node_label(node) for node in made_on)}",
            found=_node_label(volume_node),
            hint=(
                f"Choose '{made_on[0].GetName()}' as Input volume and export again. If the labels do belong to"
                f" '{volume_node.GetName()}', make it the segmentation's geometry first: in the Segment Editor, click"
                " 'Specify geometry' beside the source volume, choose it as the source geometry and apply."
            ),
        )
    second = segmentation_node.GetNodeReference(ADDITIONAL_VOLUME_REFERENCE)
    if second is not None and additional_volume_nodes and additional_volume_nodes[0].GetID() != second.GetID():
        raise io.ImageError(
            "the second input volume is not the one the segmentation was made from",
            subject=segmentation_node.GetName(),
            expected=f"second volume {_node_label(second)}",
            found=_node_label(additional_volume_nodes[0]),
            hint=f"Choose '{second.GetName()}' as the second input volume and export again.",
        )


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
    correction. Refuses volumes the segmentation was not made on (:func:`check_export_volumes`), unknown
    segment names (with how to add them), an existing case without ``overwrite``, and images whose channel
    count does not match the dataset.
    """
    check_export_volumes(segmentation_node, volume_node, additional_volume_nodes)
    dataset = Dataset.open(dataset_folder)
    grid = volume_from_node(volume_node)
    labels = labelmap_from_segments(segmentation_node, grid, dataset)
    storage = volume_node.GetStorageNode()
    source = volume_node.GetName() + (f" ({storage.GetFileName()})" if storage is not None and storage.GetFileName() else "")
    provenance = CaseProvenance(source=source, predicted_by=segmentation_node.GetAttribute(MODEL_ATTRIBUTE))
    prediction_path = segmentation_node.GetAttribute(PREDICTION_ATTRIBUTE)
    if prediction_path:
        predicted = _prediction_labelmap(Path(prediction_path), grid, dataset, segmentation_node)
        if predicted is None:
            log.info("the cached prediction %s is gone or on another grid: no correction effort is recorded", prediction_path)
        else:
            effort = correction_effort(predicted, labels, [label.value for label in dataset.labels], grid.voxel_volume_ml)
            provenance = CaseProvenance(**{**provenance.__dict__, **effort})
    images = [grid, *(volume_from_node(node) for node in additional_volume_nodes)]
    return dataset.add_case(case_id, images, labels, provenance, split=split, overwrite=overwrite)
