"""DICOM Segmentation objects (SEG) read into DeepSeg's :class:`~deepseg_core.io.Segmentation`.

A DICOM SEG stores one 2D frame per (segment, slice): each frame names its segment
(``SegmentIdentificationSequence``) and its position (``PlanePositionSequence`` >
``ImagePositionPatient``); the plane orientation and pixel spacing are shared or per frame. This
module places every frame on one 3D grid in LPS (DICOM's patient coordinates, so no axis flip):

* array axes ``x, y, z`` run along the row direction, the column direction and their cross product
  (the slice normal) of ``ImageOrientationPatient``;
* spacing: ``PixelSpacing`` (column spacing for x, row spacing for y) and, along z,
  ``SpacingBetweenSlices`` when given, else the smallest distance between two frame planes;
* origin: the position of the frame plane lowest along the normal; every frame must lie on the
  grid (its plane at a whole number of slices from the origin, no in-plane offset) within
  :data:`POSITION_TOLERANCE` of a voxel, or the file is refused.

Segments keep their number, label, colour (``RecommendedDisplayCIELabValue`` converted to sRGB) and
terminology codes; the segment number is the label value. Overlapping segments go to separate
labelmap layers. ``FRACTIONAL`` frames are binarised at half of ``MaximumFractionalValue``.

pydicom is imported only when a file is read (it is a test dependency, not a runtime one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .dicom_series import SEGMENTATION_SOP_CLASSES
from .errors import DeepSegError, ImageError
from .io import Segmentation, SegmentInfo, Volume, validate_volume

SEGMENTATION_STORAGE_UID = SEGMENTATION_SOP_CLASSES[0]
#: Slicer's terminology context for codes taken from a DICOM SEG.
DICOM_TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
#: Largest distance of a frame from the computed grid, as a fraction of the voxel size along that axis.
POSITION_TOLERANCE = 0.01
_D65_WHITE_XYZ = np.array([0.95047, 1.0, 1.08883])
_XYZ_TO_LINEAR_SRGB = np.array(
    [
        [3.2404542, -1.5371385, -0.4985314],
        [-0.9692660, 1.8760108, 0.0415560],
        [0.0556434, -0.2040259, 1.0572252],
    ]
)


@dataclass(frozen=True)
class DicomSegFrame:
    """Where one frame of the file went.

    Attributes:
        index: 0-based frame number in the file.
        segment_number: the DICOM segment the frame belongs to.
        position_lps: ``ImagePositionPatient`` of the frame (mm, LPS), as stored.
        slice_index: the z index of the frame on the grid.
        source_sop_instance_uid: the image the frame was derived from, when the file says.
    """

    index: int
    segment_number: int
    position_lps: tuple[float, float, float]
    slice_index: int
    source_sop_instance_uid: str | None = None


@dataclass(frozen=True, eq=False)
class DicomSeg:
    """A DICOM SEG on a 3D grid.

    Attributes:
        segmentation: labelmap layers ``(L, Z, Y, X)`` in LPS and one :class:`SegmentInfo` per DICOM
            segment (label value = segment number).
        frames: one entry per frame, in file order.
        segmentation_type: ``BINARY`` or ``FRACTIONAL``.
        series_instance_uid: the SEG's own series.
        referenced_series_uid: the image series it was drawn on (``ReferencedSeriesSequence``), or None.
        frame_of_reference_uid: the SEG's frame of reference, or None.
    """

    segmentation: Segmentation
    frames: tuple[DicomSegFrame, ...]
    segmentation_type: str
    series_instance_uid: str
    referenced_series_uid: str | None
    frame_of_reference_uid: str | None

    @property
    def segments(self) -> tuple[SegmentInfo, ...]:
        """The segments, in the file's order."""
        return self.segmentation.segments

    @property
    def grid(self) -> Volume:
        """The geometry (shape ``(Z, Y, X)``, spacing, origin, direction in LPS)."""
        return self.segmentation.grid

    def labelmap(self) -> Volume:
        """One labelmap ``(Z, Y, X)`` with each segment's number; refused when segments overlap."""
        return self.segmentation.to_labelmap()


def cielab_to_rgb(dicom_lab: Sequence[int]) -> tuple[float, float, float]:
    """sRGB colour in [0, 1] of a DICOM ``RecommendedDisplayCIELabValue`` (three 16-bit integers, D65).

    DICOM scales L* 0..100 and a*, b* -128..127 onto 0..65535 (PS3.3 C.10.7.1.1).
    """
    scaled = np.asarray(dicom_lab, dtype=float) / 65535.0
    lightness, a, b = scaled[0] * 100.0, scaled[1] * 255.0 - 128.0, scaled[2] * 255.0 - 128.0
    fy = (lightness + 16.0) / 116.0
    f = np.array([fy + a / 500.0, fy, fy - b / 200.0])
    epsilon = 6.0 / 29.0
    xyz = np.where(f > epsilon, f**3, 3 * epsilon**2 * (f - 4.0 / 29.0)) * _D65_WHITE_XYZ
    linear = np.clip(_XYZ_TO_LINEAR_SRGB @ xyz, 0.0, 1.0)
    rgb = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1 / 2.4) - 0.055)
    return tuple(float(c) for c in np.clip(rgb, 0.0, 1.0))  # type: ignore[return-value]


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError as exc:
        raise DeepSegError(
            "reading a DICOM SEG needs pydicom",
            expected="pydicom installed in this Python",
            found="no module named pydicom",
            hint="pip install pydicom (DeepSeg's test extra installs it).",
        ) from exc
    return pydicom


def _code(item: Any, keyword: str) -> list[str] | None:
    sequence = item.get(keyword)
    if not sequence:
        return None
    code = sequence[0]
    return [str(code.get("CodingSchemeDesignator", "")), str(code.get("CodeValue", "")), str(code.get("CodeMeaning", ""))]


def _segment_info(item: Any, layer: int) -> SegmentInfo:
    number = int(item.SegmentNumber)
    terminology: dict[str, Any] = {"contextName": DICOM_TERMINOLOGY_CONTEXT}
    for key, keyword in (
        ("category", "SegmentedPropertyCategoryCodeSequence"),
        ("type", "SegmentedPropertyTypeCodeSequence"),
        ("anatomicRegion", "AnatomicRegionSequence"),
    ):
        code = _code(item, keyword)
        if code is not None:
            terminology[key] = code
    lab = item.get("RecommendedDisplayCIELabValue")
    return SegmentInfo(
        name=str(item.get("SegmentLabel", f"Segment {number}")),
        label_value=number,
        color_rgb=cielab_to_rgb(lab) if lab else (0.5, 0.5, 0.5),
        terminology=terminology if len(terminology) > 1 else None,
        layer=layer,
        segment_id=f"Segment_{number}",
    )


def _functional(ds: Any, frame: Any, sequence: str, path: Path) -> Any:
    """The item of a functional group macro for one frame (per-frame first, then shared)."""
    for groups in (frame, (ds.get("SharedFunctionalGroupsSequence") or [None])[0]):
        if groups is not None and groups.get(sequence):
            return groups.get(sequence)[0]
    raise ImageError(f"frame without {sequence}", subject=path, expected=f"{sequence} per frame or shared")


@dataclass(frozen=True)
class _Frames:
    """What the functional groups say: plane axes, pixel spacing, stated slice spacing, and each frame."""

    row_dir: np.ndarray
    col_dir: np.ndarray
    row_spacing: float
    col_spacing: float
    stated_slice_spacing: float
    entries: list[tuple[int, np.ndarray, str | None]]


def _frame_geometry(ds: Any, path: Path) -> _Frames:
    """Plane orientation, pixel spacing and ``(segment number, position, source image)`` of every frame."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != int(ds.get("NumberOfFrames", 1)):
        raise ImageError(
            "has a per-frame functional group count that differs from its frame count",
            subject=path,
            expected=str(ds.get("NumberOfFrames", 1)),
            found=str(len(per_frame)),
        )
    orientations, spacings, entries = [], [], []
    stated = 0.0
    for frame in per_frame:
        orientations.append(np.asarray(_functional(ds, frame, "PlaneOrientationSequence", path).ImageOrientationPatient, float))
        measures = _functional(ds, frame, "PixelMeasuresSequence", path)
        spacings.append(tuple(float(s) for s in measures.PixelSpacing))
        stated = stated or float(measures.get("SpacingBetweenSlices", 0) or 0)
        position = np.asarray(_functional(ds, frame, "PlanePositionSequence", path).ImagePositionPatient, float)
        segment = int(_functional(ds, frame, "SegmentIdentificationSequence", path).ReferencedSegmentNumber)
        source = None
        derivation = frame.get("DerivationImageSequence")
        if derivation and derivation[0].get("SourceImageSequence"):
            source = str(derivation[0].SourceImageSequence[0].get("ReferencedSOPInstanceUID", "")) or None
        entries.append((segment, position, source))
    if not entries:
        raise ImageError("holds no frames", subject=path)
    if any(not np.allclose(o, orientations[0], atol=1e-4) for o in orientations) or len(set(spacings)) > 1:
        raise ImageError(
            "has frames of different orientation or pixel spacing",
            subject=path,
            expected="one plane orientation and pixel spacing for all frames",
        )
    return _Frames(orientations[0][:3], orientations[0][3:], spacings[0][0], spacings[0][1], stated, entries)


def _slice_grid(distances: np.ndarray, stated_spacing: float, thickness: float, path: Path) -> tuple[float, np.ndarray]:
    """Slice spacing (mm) and the z index of every frame, from the frames' distances (mm) along the slice normal.

    The spacing is ``stated_spacing`` when positive, else the smallest gap between two frame planes,
    else (one plane) ``thickness`` or 1 mm.
    """
    gaps = np.diff(np.unique(np.round(distances, 4)))
    if stated_spacing > 0:
        spacing = stated_spacing
    elif gaps.size:
        spacing = float(gaps.min())
    else:
        spacing = thickness if thickness > 0 else 1.0
    steps = (distances - distances.min()) / spacing
    indices = np.round(steps).astype(int)
    worst = float(np.abs(steps - indices).max())
    if worst > POSITION_TOLERANCE:
        raise ImageError(
            "has frames that do not lie on one regular slice grid",
            subject=path,
            expected=f"frame planes a whole number of {spacing:g} mm slices apart (within {POSITION_TOLERANCE:.0%} of a slice)",
            found=f"a frame {worst:.3f} slices off the grid",
        )
    return spacing, indices


def _assign_layers(masks: dict[int, np.ndarray]) -> dict[int, int]:
    """Layer of each segment: the first layer none of whose segments it overlaps."""
    layers: list[np.ndarray] = []
    assignment = {}
    for number, mask in masks.items():
        for index, occupied in enumerate(layers):
            if not np.any(occupied & mask):
                occupied |= mask
                assignment[number] = index
                break
        else:
            layers.append(mask.copy())
            assignment[number] = len(layers) - 1
    return assignment


def _layers(
    ds: Any, seg_type: str, frame_segments: list[int], slice_indices: np.ndarray, items: dict[int, Any], path: Path
) -> tuple[np.ndarray, dict[int, int]]:
    """Labelmap layers ``(L, Z, Rows, Columns)`` (voxel = segment number) and the layer of each segment."""
    unknown = sorted(set(frame_segments) - set(items))
    if unknown:
        raise ImageError("has frames of segments it does not describe", subject=path, found=f"segment numbers {unknown}")
    pixels = np.asarray(ds.pixel_array)
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    if seg_type == "FRACTIONAL":
        pixels = pixels > float(ds.get("MaximumFractionalValue", 255)) / 2.0
    else:
        pixels = pixels > 0
    shape = (int(slice_indices.max()) + 1, int(ds.Rows), int(ds.Columns))
    masks = {number: np.zeros(shape, dtype=bool) for number in items}
    for segment, k, frame_pixels in zip(frame_segments, slice_indices, pixels, strict=True):
        masks[segment][k] |= frame_pixels
    layer_of = _assign_layers(masks)
    dtype = np.uint8 if max(items, default=0) < 256 else np.uint16
    layers = np.zeros((max(layer_of.values(), default=0) + 1, *shape), dtype=dtype)
    for number, mask in masks.items():
        layers[layer_of[number]][mask] = number
    return layers, layer_of


def read_dicom_seg(path: str | Path) -> DicomSeg:
    """Read a DICOM Segmentation object (one file) onto a 3D grid in LPS.

    Args:
        path: the SEG file (``SOPClassUID`` 1.2.840.10008.5.1.4.1.1.66.4).

    Returns:
        A :class:`DicomSeg`: layers ``(L, Z, Y, X)`` uint8 (uint16 above 255 segments) on a grid whose
        shape is ``(slices, Rows, Columns)``, spacing and origin in mm, one segment per DICOM segment.

    Raises:
        ImageError: not a DICOM SEG, frames without position, orientation or segment, frames off a
            regular grid, or an invalid geometry.
        DeepSegError: pydicom is not installed.
    """
    pydicom = _pydicom()
    path = Path(path)
    if not path.is_file():
        raise ImageError("file not found", subject=path)
    try:
        ds = pydicom.dcmread(str(path))
    except Exception as exc:  # pydicom raises several types for a non-DICOM or damaged file
        raise ImageError("cannot be read as DICOM", subject=path, found=str(exc).splitlines()[0][:300]) from exc
    if str(ds.get("SOPClassUID", "")) != SEGMENTATION_STORAGE_UID:
        raise ImageError(
            "is not a DICOM Segmentation object",
            subject=path,
            expected=f"SOP class {SEGMENTATION_STORAGE_UID} (SEG)",
            found=f"SOP class {ds.get('SOPClassUID', 'none')}, modality {ds.get('Modality', 'none')}",
        )
    seg_type = str(ds.get("SegmentationType", "BINARY"))
    geometry = _frame_geometry(ds, path)
    row_dir, col_dir, frames = geometry.row_dir, geometry.col_dir, geometry.entries
    row_spacing, col_spacing = geometry.row_spacing, geometry.col_spacing
    normal = np.cross(row_dir, col_dir)
    positions = np.array([p for _, p, _ in frames])
    distances = positions @ normal
    thickness = float(ds.get("SliceThickness", 0) or 0)
    slice_spacing, slice_indices = _slice_grid(distances, geometry.stated_slice_spacing, thickness, path)
    origin = positions[int(np.argmin(distances))]
    in_plane = (positions - origin) @ np.stack([row_dir, col_dir], axis=1)
    if np.abs(in_plane).max(initial=0.0) > POSITION_TOLERANCE * min(row_spacing, col_spacing):
        raise ImageError(
            "has frames shifted within their plane",
            subject=path,
            expected="every frame starting at the same row and column position",
            found=f"in-plane offsets up to {np.abs(in_plane).max():.3f} mm",
        )
    items = {int(item.SegmentNumber): item for item in ds.get("SegmentSequence", [])}
    layers, layer_of = _layers(ds, seg_type, [segment for segment, _, _ in frames], slice_indices, items, path)
    grid = Volume(
        array_zyx=layers,
        spacing_xyz_mm=(col_spacing, row_spacing, slice_spacing),
        origin_lps=tuple(origin),
        direction_lps=np.stack([row_dir, col_dir, normal], axis=1),
    )
    validate_volume(grid.with_array(layers[0]), subject=path)
    referenced = ds.get("ReferencedSeriesSequence")
    return DicomSeg(
        segmentation=Segmentation(layers=grid, segments=tuple(_segment_info(items[n], layer_of[n]) for n in items)),
        frames=tuple(
            DicomSegFrame(i, segment, tuple(float(c) for c in position), int(k), source)  # type: ignore[arg-type]
            for i, ((segment, position, source), k) in enumerate(zip(frames, slice_indices, strict=True))
        ),
        segmentation_type=seg_type,
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        referenced_series_uid=str(referenced[0].SeriesInstanceUID) if referenced else None,
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")) or None,
    )
