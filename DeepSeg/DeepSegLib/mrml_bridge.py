"""MRML <-> deepseg_core: volume nodes to :class:`io.Volume`, results into segmentation nodes.

Needs ``slicer`` (Slicer itself, or the Qt-free ``slicer-core`` wheel the tests use) but no Qt.
Geometry: MRML stores IJK-to-RAS; ``deepseg_core`` works in LPS, so the first two rows flip.
Segments DeepSeg writes carry the tag ``DeepSeg.Source`` (the model reference); a re-run replaces
exactly those, so segments the user added by hand survive.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from deepseg_core import io

from .terminology import TerminologyIndex, slicer_terminology_logic

SOURCE_TAG = "DeepSeg.Source"
LABEL_TAG = "DeepSeg.LabelValue"
TERMINOLOGY_TAG = "TerminologyEntry"
#: node attributes (``DeepSeg.Model``, ``DeepSeg.PredictionPath``) and references DeepSeg sets on an output node
ATTRIBUTE_PREFIX = "DeepSeg."
INPUT_VOLUME_REFERENCE = "DeepSeg.InputVolume"
#: a segment whose labelled box on the image's lattice holds more than this many times the image's voxels is
#: refused without being resampled (the box alone could exhaust memory)
MAX_BOX_TO_IMAGE_VOXELS = 8
#: the second input channel's volume (a two-channel model), beside :data:`INPUT_VOLUME_REFERENCE`
ADDITIONAL_VOLUME_REFERENCE = "DeepSeg.AdditionalVolume"
VOLUME_REFERENCES = (INPUT_VOLUME_REFERENCE, ADDITIONAL_VOLUME_REFERENCE)
_RAS_FROM_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class SegmentSpec:
    """What one output segment should look like.

    Attributes:
        name: segment name.
        color: RGB in [0, 1].
        terminology: Slicer terminology entry string (``TerminologyEntry`` tag) or "".
        label_value: the model label it came from.
    """

    name: str
    color: tuple[float, float, float]
    terminology: str = ""
    label_value: int = 0


def _matrix_to_numpy(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _numpy_to_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r, c]))
    return matrix


def _image_data(array_zyx: np.ndarray) -> vtk.vtkImageData:
    array_zyx = np.ascontiguousarray(array_zyx)
    image = vtk.vtkImageData()
    image.SetDimensions(array_zyx.shape[2], array_zyx.shape[1], array_zyx.shape[0])
    scalars = numpy_support.numpy_to_vtk(array_zyx.ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    return image


def volume_from_node(volume_node: slicer.vtkMRMLScalarVolumeNode) -> io.Volume:
    """The node's voxels ``(Z, Y, X)`` and LPS geometry. Parent transforms must be hardened first."""
    if volume_node is None or volume_node.GetImageData() is None:
        raise io.ImageError("no volume selected or the volume has no voxels", expected="a loaded scalar volume")
    if volume_node.GetParentTransformNode() is not None:
        raise io.ImageError(
            "the volume is under a transform",
            subject=volume_node.GetName(),
            hint="Harden the transform (Data module, right-click > Harden transform) before segmenting.",
        )
    image = volume_node.GetImageData()
    dims = image.GetDimensions()
    array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    if image.GetNumberOfScalarComponents() != 1:
        raise io.ImageError("multi-component volumes are not supported", subject=volume_node.GetName())
    array_zyx = array.reshape(dims[2], dims[1], dims[0]).copy()
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    return io.Volume.from_ijk_to_lps(array_zyx, _RAS_FROM_LPS @ _matrix_to_numpy(ijk_to_ras))


def node_from_volume(
    scene: slicer.vtkMRMLScene, volume: io.Volume, name: str, labelmap: bool = False
) -> slicer.vtkMRMLScalarVolumeNode:
    """A new volume node holding ``volume`` (geometry converted to RAS)."""
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode", name)
    node.SetAndObserveImageData(_image_data(volume.array_zyx))
    node.SetIJKToRASMatrix(_numpy_to_matrix(volume.ijk_to_ras()))
    return node


def oriented_mask(mask_zyx: np.ndarray, grid: io.Volume) -> slicer.vtkOrientedImageData:
    """A binary ``vtkOrientedImageData`` (uint8 0/1) of ``mask_zyx`` on ``grid``."""
    image = slicer.vtkOrientedImageData()
    image.ShallowCopy(_image_data(mask_zyx.astype(np.uint8)))
    image.SetImageToWorldMatrix(_numpy_to_matrix(grid.ijk_to_ras()))
    return image


def reference_geometry(grid: io.Volume) -> slicer.vtkOrientedImageData:
    """An oriented image with ``grid``'s extent and IJK-to-RAS matrix but no voxels (geometry only)."""
    image = slicer.vtkOrientedImageData()
    z, y, x = grid.shape_zyx
    image.SetExtent(0, x - 1, 0, y - 1, 0, z - 1)
    image.SetImageToWorldMatrix(_numpy_to_matrix(grid.ijk_to_ras()))
    return image


def deepseg_segment_ids(segmentation_node: slicer.vtkMRMLSegmentationNode) -> list[str]:
    """IDs of the segments an earlier DeepSeg run wrote (tagged), in order."""
    segmentation = segmentation_node.GetSegmentation()
    ids = []
    for index in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(index)
        value = vtk.mutable("")
        if segment.GetTag(SOURCE_TAG, value):
            ids.append(segmentation.GetNthSegmentID(index))
    return ids


def specs_from_segmentation(segmentation: io.Segmentation) -> list[tuple[SegmentSpec, np.ndarray]]:
    """``(spec, mask_zyx)`` for every segment of a file DeepSeg wrote (names, colours, terminology)."""
    from slicerio.segmentation import terminology_entry_to_string

    out = []
    for info in segmentation.segments:
        terminology = terminology_entry_to_string(info.terminology) if info.terminology else ""
        spec = SegmentSpec(info.name, tuple(info.color_rgb), terminology, info.label_value)
        out.append((spec, segmentation.mask(info.name)))
    return out


def write_result_segments(
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    segments: Sequence[tuple[SegmentSpec, np.ndarray]],
    grid: io.Volume,
    source: str,
    terminology: TerminologyIndex | None = None,
) -> list[str]:
    """Replace the segments of an earlier DeepSeg run by this result; keep every other segment.

    Args:
        segmentation_node: output node; its reference geometry becomes ``grid``'s.
        segments: ``(segment, boolean mask (Z, Y, X) on grid)`` in display order; empty masks make
            empty segments, so the list of segments always matches the model card.
        grid: the input volume's geometry.
        source: model reference recorded in each segment's ``DeepSeg.Source`` tag.
        terminology: for segments without a terminology entry (imported models' labels), matched by
            name (:mod:`.terminology`); default: the running Slicer's loaded terminologies, if any.

    Returns:
        The new segment IDs, in order.
    """
    if terminology is None and any(not spec.terminology for spec, _ in segments):
        logic = slicer_terminology_logic()
        terminology = TerminologyIndex.build(logic) if logic is not None else None
    if terminology is not None:
        segments = [
            (dataclasses.replace(spec, terminology=spec.terminology or terminology.entry_or_default(spec.name)), mask)
            for spec, mask in segments
        ]
    segmentation = segmentation_node.GetSegmentation()
    was_modifying = segmentation_node.StartModify()
    try:
        for segment_id in deepseg_segment_ids(segmentation_node):
            segmentation.RemoveSegment(segment_id)
        geometry = slicer.vtkSegmentationConverter.SerializeImageGeometry(reference_geometry(grid))
        segmentation.SetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName(), geometry)
        new_ids = [add_segment(segmentation_node, spec, mask_zyx, grid, source) for spec, mask_zyx in segments]
    finally:
        segmentation_node.EndModify(was_modifying)
    return new_ids


def add_segment(
    segmentation_node: slicer.vtkMRMLSegmentationNode,
    spec: SegmentSpec,
    mask_zyx: np.ndarray,
    grid: io.Volume,
    source: str | None = None,
) -> str:
    """Add one segment with a boolean mask ``(Z, Y, X)`` on ``grid``; tagged as DeepSeg's when ``source``."""
    segmentation = segmentation_node.GetSegmentation()
    segment_id = segmentation.GenerateUniqueSegmentID(spec.name)
    segment = slicer.vtkSegment()
    segment.SetName(spec.name)
    segment.SetColor(*spec.color)
    # the model's names and colours, not generated ones: confirming the segment's terminology in Slicer would
    # otherwise rename it after the terminology ("Liver"), which the dataset's label schema does not know
    segment.SetNameAutoGenerated(False)
    segment.SetColorAutoGenerated(False)
    if source is not None:
        segment.SetTag(SOURCE_TAG, source)
        segment.SetTag(LABEL_TAG, str(spec.label_value))
    if spec.terminology:
        segment.SetTag(TERMINOLOGY_TAG, spec.terminology)
    representation = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    segment.AddRepresentation(representation, oriented_mask(np.asarray(mask_zyx, bool), grid))
    segmentation.AddSegment(segment, segment_id)
    return segment_id


def _labelled_box_on_grid(labelmap: slicer.vtkOrientedImageData, grid: io.Volume) -> tuple[int, ...] | None:
    """The extent ``(x0, x1, y0, y1, z0, z1)``, in ``grid``'s voxel indices (outside the image too), of every grid
    voxel whose centre can fall in a non-zero voxel of ``labelmap``; None when it has none."""
    effective = [0, -1, 0, -1, 0, -1]
    if not slicer.vtkOrientedImageDataResample.CalculateEffectiveExtent(labelmap, effective):
        return None
    labelmap_to_ras = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(labelmap_to_ras)
    labelmap_to_grid = np.linalg.inv(grid.ijk_to_ras()) @ _matrix_to_numpy(labelmap_to_ras)
    # the corners of the labelled voxels' cells (half a voxel beyond their centres), in grid indices
    x0, x1, y0, y1, z0, z1 = effective
    corners = np.array([[i, j, k, 1.0] for i in (x0 - 0.5, x1 + 0.5) for j in (y0 - 0.5, y1 + 0.5) for k in (z0 - 0.5, z1 + 0.5)])
    on_grid = (labelmap_to_grid @ corners.T)[:3]
    low, high = np.floor(on_grid.min(axis=1)), np.ceil(on_grid.max(axis=1))
    return tuple(int(v) for pair in zip(low, high, strict=True) for v in pair)


def segment_mask(segmentation_node: slicer.vtkMRMLSegmentationNode, segment_id: str, grid: io.Volume) -> np.ndarray:
    """Boolean mask ``(Z, Y, X)`` of one segment resampled (nearest) onto ``grid``, in world coordinates: a
    transform above the segmentation node is applied, as Slicer's own export to a labelmap applies it.

    The segment's labelmap may lie on another geometry (the Segment Editor's "Specify geometry", another
    source volume, oversampling) and reach beyond the image.

    Raises:
        ImageError: labelled voxels outside ``grid`` (they would be lost), or no labelmap can be made.
    """
    segmentation = segmentation_node.GetSegmentation()
    labelmap_name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    # a segmentation whose source is another representation (closed surface) is converted one segment at a
    # time, onto a copy that burns the segment as 1 whatever label value the segment keeps from a shared layer
    converted = not segmentation.ContainsRepresentation(labelmap_name)
    labelmap = slicer.vtkOrientedImageData()
    if not slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
        segmentation_node, segment_id, labelmap, True
    ):
        raise io.ImageError(f"segment {segment_id!r} has no labelmap", subject=segmentation_node.GetName())
    labelled_box = _labelled_box_on_grid(labelmap, grid)
    if labelled_box is None:
        return np.zeros(grid.shape_zyx, bool)
    box_voxels = math.prod(high - low + 1 for low, high in zip(labelled_box[0::2], labelled_box[1::2], strict=True))
    if box_voxels > MAX_BOX_TO_IMAGE_VOXELS * math.prod(grid.shape_zyx):
        # a scaling transform, or a labelmap far coarser than the image: the box alone would not fit in memory
        name = segmentation.GetSegment(segment_id).GetName()
        raise io.ImageError(
            f"segment {name!r} spans far more than the image",
            subject=segmentation_node.GetName(),
            expected=f"labels within the image's grid ({' x '.join(str(n) for n in reversed(grid.shape_zyx))} voxels)",
            found=f"a labelled box of {box_voxels:.3g} image voxels (a transform scaling the segmentation, or moving it"
            " far away)",
            hint="Check the transform above the segmentation (Transforms module); or, in the Segment Editor, click"
            " 'Specify geometry', choose the image as the source geometry and apply.",
        )
    lattice = reference_geometry(grid)
    lattice.SetExtent(*labelled_box)
    resampled = slicer.vtkOrientedImageData()
    # onto the image's lattice over the labelled box, wherever it lies, so that voxels beyond the image are seen, not
    # cut off; the box rather than the union of image and labelmap, which a far-away segment (a transform in metres)
    # made too large to allocate
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, lattice, resampled, False, False)
    if resampled.GetPointData().GetScalars() is None:
        return np.zeros(grid.shape_zyx, bool)
    x0, x1, y0, y1, z0, z1 = resampled.GetExtent()
    array = numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(z1 - z0 + 1, y1 - y0 + 1, x1 - x0 + 1)
    # A shared labelmap layer holds several segments: a segment is its own label value in the layer.
    mask = array != 0 if converted else array == segmentation.GetSegment(segment_id).GetLabelValue()
    # the array starts at image voxel (z0, y0, x0): mask index i is image index i + start along each axis
    starts = (z0, y0, x0)
    on_image = tuple(
        slice(max(-start, 0), max(min(size - start, extent), 0))
        for start, size, extent in zip(starts, grid.shape_zyx, mask.shape, strict=True)
    )
    inside = np.zeros(grid.shape_zyx, bool)
    if all(part.stop > part.start for part in on_image):
        inside[tuple(slice(part.start + start, part.stop + start) for part, start in zip(on_image, starts, strict=True))] = mask[
            on_image
        ]
    outside = int(np.count_nonzero(mask)) - int(np.count_nonzero(inside))
    if outside:
        name = segmentation.GetSegment(segment_id).GetName()
        raise io.ImageError(
            f"segment {name!r} has {outside} labelled voxels outside the image",
            subject=segmentation_node.GetName(),
            expected=f"labels within the image's grid ({' x '.join(str(n) for n in reversed(grid.shape_zyx))} voxels)",
            found=f"{outside} voxels beyond it (a segmentation geometry larger than the image, or a transform moving it)",
            hint="In the Segment Editor, click 'Specify geometry', choose the image as the source geometry and apply: "
            "the segments are resampled onto the image and what lies outside it is removed.",
        )
    return inside


def segments_by_name(segmentation_node: slicer.vtkMRMLSegmentationNode) -> dict[str, str]:
    """Segment name -> segment ID."""
    segmentation = segmentation_node.GetSegmentation()
    return {
        segmentation.GetNthSegment(i).GetName(): segmentation.GetNthSegmentID(i)
        for i in range(segmentation.GetNumberOfSegments())
    }


class SegmentationSnapshot:
    """A copy of a segmentation's segments and of the node's DeepSeg attributes and references (which model
    predicted it, the cached prediction, the input volumes), to restore after a cancelled or undone run: an
    export after Undo must not credit the undone run's model or measure the correction against its output."""

    def __init__(self, segmentation_node: slicer.vtkMRMLSegmentationNode) -> None:
        self.node = segmentation_node
        self.copy = slicer.vtkSegmentation()
        self.copy.DeepCopy(segmentation_node.GetSegmentation())
        self.attributes = {name: segmentation_node.GetAttribute(name) for name in _deepseg_attribute_names(segmentation_node)}
        self.references = {role: segmentation_node.GetNodeReferenceID(role) for role in _restored_references(segmentation_node)}

    def restore(self) -> None:
        """Put the segments, attributes and references back exactly as they were."""
        self.node.GetSegmentation().DeepCopy(self.copy)
        for name in _deepseg_attribute_names(self.node):
            if name not in self.attributes:
                self.node.RemoveAttribute(name)
        for name, value in self.attributes.items():
            self.node.SetAttribute(name, value)
        for role in _restored_references(self.node):
            self.node.SetNodeReferenceID(role, self.references.get(role))
        self.node.Modified()


def _restored_references(node: slicer.vtkMRMLSegmentationNode) -> tuple[str, ...]:
    """The node references a run sets and Undo puts back: DeepSeg's volumes and Slicer's reference geometry (which
    an export also reads as the volume the segmentation was made on)."""
    return (*VOLUME_REFERENCES, node.GetReferenceImageGeometryReferenceRole())


def _deepseg_attribute_names(node: slicer.vtkMRMLNode) -> list[str]:
    return [name for name in node.GetAttributeNames() if name.startswith(ATTRIBUTE_PREFIX)]
