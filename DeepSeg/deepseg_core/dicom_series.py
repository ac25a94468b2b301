"""Checks of a DICOM series' slices before they are stacked into one volume.

GDCM sorts a series' files by position and ITK stacks them on a regular grid whose slice spacing is the
distance from the first to the last slice over their count, along the first slice's orientation. That is
right for a regular series only. Several kinds of series stack into a wrong volume with at most a
warning on stderr: slices of several orientations (a localizer, a radial MR), several images at one
position (echoes, phases, acquisitions sharing a series UID), a missing slice or uneven spacing, gantry
tilt (each slice shifted within its plane), slices of another matrix or pixel spacing (ITK takes them from
the first slice), or per-slice rescaling (the first slice's voxel type truncates the others). Slicer's DICOM
module splits a series by orientation, AcquisitionNumber and ImageType, and corrects uneven spacing and tilt
with a regularisation transform (``DICOMScalarVolumePlugin``); a segmentation on a wrongly stacked volume is
a clinical error, so DeepSeg refuses such series with what it found and where Slicer helps, and reads
per-slice rescaling as float32.

Every file's header is read (no pixels) with SimpleITK; positions are compared along the slice normal
(``ImageOrientationPatient``'s row x column), in LPS millimetres.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import ImageError

log = logging.getLogger(__name__)

#: DICOM Segmentation, Label Map Segmentation and Heightmap Segmentation storage: GDCM reads their frames
#: as if they were slices
SEGMENTATION_SOP_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7", "1.2.840.10008.5.1.4.1.1.66.8")
#: SOP classes whose files hold no image to segment, each with what it is; GDCM stacks their frames as slices
NON_IMAGE_SOP_CLASSES = {
    SEGMENTATION_SOP_CLASSES[0]: "a DICOM Segmentation object",
    SEGMENTATION_SOP_CLASSES[1]: "a DICOM Label Map Segmentation object",
    SEGMENTATION_SOP_CLASSES[2]: "a DICOM Heightmap Segmentation object",
    "1.2.840.10008.5.1.4.1.1.481.2": "an RT Dose object (a dose grid)",
}
#: SOP classes whose frames are a time series of projections or video, not slices of a volume
CINE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.3.1": "an ultrasound cine loop",
    "1.2.840.10008.5.1.4.1.1.12.1": "an X-ray angiography run",
    "1.2.840.10008.5.1.4.1.1.12.2": "an X-ray fluoroscopy run",
    "1.2.840.10008.5.1.4.1.1.12.1.1": "an enhanced X-ray angiography run",
    "1.2.840.10008.5.1.4.1.1.12.2.1": "an enhanced X-ray fluoroscopy run",
    "1.2.840.10008.5.1.4.1.1.77.1.1.1": "a video endoscopy recording",
}


#: tags whose values tell apart several volumes that share one series UID, named when slices share a position
SUBSERIES_TAGS = {
    "0018|0086": "EchoNumbers",
    "0020|0100": "TemporalPositionIdentifier",
    "0020|0012": "AcquisitionNumber",
    "0008|0008": "ImageType",
    "0018|1060": "TriggerTime",
    "0018|9087": "DiffusionBValue",
}
#: largest difference between two slices' ImageOrientationPatient components that counts as one orientation
ORIENTATION_TOLERANCE = 1e-4
#: two slices nearer than this along the normal (mm) are at one position
SAME_POSITION_MM = 1e-3
#: a slice may lie this far from where the regular grid puts it along the normal: this fraction of the slice
#: spacing (positions written to 0.1 mm put 0.625 mm slices 0.03 mm off; a missing slice puts one half a spacing
#: or more off), and at least POSITION_FLOOR_MM
SPACING_TOLERANCE = 0.25
#: a slice may lie this far from the first one's normal line within its plane: this fraction of the pixel spacing,
#: and at least POSITION_FLOOR_MM (a gantry tilt's shift grows with every slice; rounding does not)
IN_PLANE_TOLERANCE = 0.2
POSITION_FLOOR_MM = 0.05
#: what the hints tell users to set in Slicer before saving a regularised volume
SLICER_REGULARISATION = (
    "In Slicer, set Application Settings > DICOM > Acquisition geometry regularization to 'harden regularization"
    " transform' (then restart), load the series in the DICOM module and save the volume as NRRD"
)


@dataclass(frozen=True)
class SliceHeader:
    """What one file of a series says about where it lies and how its values scale (LPS, mm)."""

    path: str
    sop_class: str | None
    sop_instance: str | None
    frames: int
    size: tuple[int, ...]
    pixel_type: str
    position_lps: tuple[float, ...] | None
    orientation: tuple[float, ...] | None
    pixel_spacing_mm: tuple[float, ...] | None
    rescale: tuple[float, float]
    subseries: dict[str, str]


@dataclass(frozen=True)
class SeriesPlan:
    """How to read a checked series: ``single_file`` (one multi-frame file, read as one image) or the slice
    files as GDCM sorted them; ``float_voxels`` when slices scale their values differently."""

    files: tuple[str, ...]
    single_file: bool
    float_voxels: bool


def read_header(path: str) -> SliceHeader:
    """The header of one DICOM file (no pixel data read)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()

    def value(tag: str) -> str | None:
        return reader.GetMetaData(tag).strip().rstrip("\x00").strip() if reader.HasMetaDataKey(tag) else None

    def numbers(tag: str) -> tuple[float, ...] | None:
        text = value(tag)
        try:
            return tuple(float(part) for part in text.split("\\")) if text else None
        except ValueError:
            return None

    slope, intercept = numbers("0028|1053"), numbers("0028|1052")
    frames = numbers("0028|0008")
    return SliceHeader(
        path=path,
        sop_class=value("0008|0016"),
        sop_instance=value("0008|0018"),
        frames=int(frames[0]) if frames else 1,
        size=tuple(reader.GetSize()[:2]),
        # as stored (bits, signedness), not the rescaled type SimpleITK reports, which follows each slice's slope
        pixel_type=f"{value('0028|0100') or '?'} bits, " + ("signed" if value("0028|0103") == "1" else "unsigned"),
        position_lps=numbers("0020|0032"),
        orientation=numbers("0020|0037"),
        pixel_spacing_mm=numbers("0028|0030"),
        rescale=(slope[0] if slope else 1.0, intercept[0] if intercept else 0.0),
        subseries={tag: text for tag in SUBSERIES_TAGS if (text := value(tag))},
    )


def refuse_non_volume(sop_class: str | None, *, subject: Path, file_name: str, frames: int) -> None:
    """Refuse a DICOM object that holds no volume to segment: a segmentation, an RT Dose grid or a cine loop.

    One refusal for a folder (``subject`` the folder, ``file_name`` its offending file) and for a file given
    directly (``subject`` the file), so both paths refuse the same SOP classes with the same words.

    Args:
        sop_class: the file's SOPClassUID (0008,0016), or None when it has none.
        subject: what the user gave: a folder or a file.
        file_name: the offending file's name, named in the error.
        frames: the file's number of frames.

    Raises:
        ImageError: the SOP class is in :data:`NON_IMAGE_SOP_CLASSES` or :data:`CINE_SOP_CLASSES`.
    """
    sop_class = (sop_class or "").strip().rstrip("\x00")
    where = "" if subject.name == file_name else f"{file_name}: "
    expected = "a folder of CT or MR image slices, or one CT/MR/PET image file (DICOM, NRRD, NIfTI or MHA)"
    kind = NON_IMAGE_SOP_CLASSES.get(sop_class)
    if kind is not None:
        raise ImageError(
            f"holds {kind}, not an image",
            subject=subject,
            expected=expected,
            found=f"{where}SOP class {sop_class}",
            hint="Give the image series it segments; to use the segmentation as labels, load it in Slicer"
            " (QuantitativeReporting) and save it as .seg.nrrd."
            if sop_class in SEGMENTATION_SOP_CLASSES
            else "Give the image series it belongs to.",
        )
    cine = CINE_SOP_CLASSES.get(sop_class)
    if cine is not None:
        raise ImageError(
            f"holds {cine}, not a volume",
            subject=subject,
            expected=expected,
            found=f"{where}SOP class {sop_class}, {frames} frame{'s' if frames != 1 else ''}",
            hint="Its frames are a time series, not slices; DeepSeg segments CT, MR and PET volumes.",
        )


def plan_series(folder: Path, files: Sequence[str]) -> SeriesPlan:
    """Check the files of one series (as GDCM sorted them) and say how to read them.

    Raises:
        ImageError: a non-image object or a cine loop, a single slice, multi-frame files among others, copies of
            a slice, slices of another matrix, pixel spacing or stored voxel type, missing or degenerate geometry,
            several orientations, several images at one position, uneven spacing or gantry tilt; naming what was
            found and what to do.
    """
    headers = [read_header(path) for path in files]
    for header in headers:
        refuse_non_volume(header.sop_class, subject=folder, file_name=Path(header.path).name, frames=header.frames)
    multi_frame = [header for header in headers if header.frames > 1]
    if len(headers) == 1:
        if not multi_frame:
            raise ImageError(
                "holds a single slice",
                subject=folder,
                expected="a 3D series (several slices, or one multi-frame file)",
                found=f"one file, {Path(headers[0].path).name}, of one frame",
                hint="Segmenting needs a 3D volume: give the folder of the whole series.",
            )
        return SeriesPlan((headers[0].path,), single_file=True, float_voxels=False)
    if multi_frame:
        raise ImageError(
            "mixes multi-frame files with other files in one series",
            subject=folder,
            expected="one multi-frame file, or single-frame slices",
            found=f"{len(multi_frame)} multi-frame file(s) among {len(headers)} files",
            hint="Put each multi-frame file in its own folder, or give the file itself.",
        )
    _check_copies(folder, headers)
    _check_same_matrix(folder, headers)
    _check_geometry(folder, headers)
    scales = {header.rescale for header in headers}
    if len(scales) > 1:
        log.info("%s: slices scale their values differently (%d slope/intercept pairs): read as float32", folder, len(scales))
    return SeriesPlan(tuple(files), single_file=False, float_voxels=len(scales) > 1)


def _check_copies(folder: Path, headers: list[SliceHeader]) -> None:
    seen: dict[str, str] = {}
    for header in headers:
        if header.sop_instance and header.sop_instance in seen:
            raise ImageError(
                "holds two copies of one slice",
                subject=folder,
                expected="each slice (SOPInstanceUID) once",
                found=f"{Path(seen[header.sop_instance]).name} and {Path(header.path).name} are both {header.sop_instance}",
                hint="Remove the copies from the folder.",
            )
        if header.sop_instance:
            seen[header.sop_instance] = header.path


def _check_same_matrix(folder: Path, headers: list[SliceHeader]) -> None:
    """Every slice of one matrix, pixel spacing and voxel type: ITK takes them from the first slice."""
    first = headers[0]
    for header in headers[1:]:
        for what, mine, theirs in (
            ("matrix (columns, rows)", header.size, first.size),
            ("PixelSpacing (mm)", header.pixel_spacing_mm, first.pixel_spacing_mm),
            ("voxel type", header.pixel_type, first.pixel_type),
        ):
            if mine != theirs:
                raise ImageError(
                    f"mixes slices of different {what.split(' (')[0]}",
                    subject=folder,
                    expected=f"the {what} of {Path(first.path).name}, {theirs}, in every slice",
                    found=f"{mine} in {Path(header.path).name}",
                    hint="A series stacks into one volume only when its slices share one grid: give the folder of one"
                    " series, or separate the slices into one folder per grid.",
                )


def _check_geometry(folder: Path, headers: list[SliceHeader]) -> None:
    def degenerate(header: SliceHeader) -> bool:
        if header.position_lps is None or len(header.position_lps) != 3:
            return True
        if header.orientation is None or len(header.orientation) != 6:
            return True
        row, column = np.asarray(header.orientation[:3]), np.asarray(header.orientation[3:])
        return bool(np.linalg.norm(np.cross(row, column)) < 0.9)  # zero, or not two perpendicular unit vectors

    missing = [h for h in headers if degenerate(h)]
    if missing:
        raise ImageError(
            "has slices without a usable position or orientation",
            subject=folder,
            expected="ImagePositionPatient (0020,0032: 3 numbers) and ImageOrientationPatient (0020,0037: two"
            " perpendicular unit vectors) in every slice",
            found=f"{len(missing)} of {len(headers)} slices without them, e.g. {Path(missing[0].path).name}",
            hint="Such a series cannot be stacked safely: export it again from the scanner or PACS as a CT/MR series.",
        )
    orientations: list[np.ndarray] = []
    for header in headers:
        vector = np.asarray(header.orientation)
        if not any(np.allclose(vector, seen, rtol=0.0, atol=ORIENTATION_TOLERANCE) for seen in orientations):
            orientations.append(vector)
    if len(orientations) > 1:
        raise ImageError(
            f"mixes slices of {len(orientations)} orientations in one series",
            subject=folder,
            expected="one ImageOrientationPatient for all slices",
            found=f"{len(orientations)} orientations among {len(headers)} slices (a localizer, or a radial acquisition)",
            hint="Move the other slices (a localizer) out of the folder; or load the series in Slicer's DICOM module,"
            " which splits it by orientation, and save the volume to segment as NRRD.",
        )
    row, column = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row, column)
    normal /= np.linalg.norm(normal)
    positions = np.array([header.position_lps for header in headers], dtype=float)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    sorted_headers = [headers[i] for i in order]
    same = np.flatnonzero(np.diff(along) < SAME_POSITION_MM)
    if same.size:
        differing = [
            name for tag, name in SUBSERIES_TAGS.items() if len({header.subseries.get(tag) for header in sorted_headers}) > 1
        ]
        distinct = len(headers) - same.size
        raise ImageError(
            "holds several images at one slice position: several volumes share this series",
            subject=folder,
            expected="one slice per position",
            found=f"{len(headers)} slices at {distinct} positions"
            + (f", differing in {', '.join(differing)}" if differing else ", with no tag that tells them apart"),
            hint="Put each volume's files in its own folder"
            + (f" (by {', '.join(differing)})" if differing else "")
            + ". In Slicer, the DICOM module splits a series by AcquisitionNumber and ImageType, and the"
            " MultiVolumeImporter extension by echo, phase or b-value.",
        )
    spacing = (along[-1] - along[0]) / (len(along) - 1)
    tolerance = max(POSITION_FLOOR_MM, SPACING_TOLERANCE * spacing)
    off_grid = np.abs(along - (along[0] + spacing * np.arange(len(along))))
    if off_grid.max() > tolerance:
        gaps = np.diff(along)
        raise ImageError(
            "has unequally spaced slices (a missing slice, or a variable spacing)",
            subject=folder,
            expected=f"a slice every {spacing:.4g} mm (first to last, over {len(along)} slices)",
            found=f"gaps from {gaps.min():.4g} to {gaps.max():.4g} mm; a slice {off_grid.max():.3g} mm from its place",
            hint="Stacked on a regular grid, the slices past the gap would be misplaced. Export the full series"
            f" again, or: {SLICER_REGULARISATION}.",
        )
    in_plane = (positions - positions[0]) - np.outer(along - along[0], normal)
    pixel = min(sorted_headers[0].pixel_spacing_mm or (1.0,))
    shift = float(np.linalg.norm(in_plane, axis=1).max())
    if shift > max(POSITION_FLOOR_MM, IN_PLANE_TOLERANCE * pixel):
        tilt_degrees = math.degrees(math.atan2(float(np.linalg.norm(in_plane[-1])), float(along[-1] - along[0])))
        raise ImageError(
            "has slices shifted within their plane from one to the next (gantry tilt)",
            subject=folder,
            expected="each slice straight behind the previous one, along the slice normal",
            found=f"shifts up to {shift:.3g} mm in plane, a tilt of {tilt_degrees:.2f} degrees",
            hint=f"Stacked straight, the volume would be sheared. Reconstruct it without tilt, or: {SLICER_REGULARISATION}.",
        )
