"""Image and segmentation files: the ONE place that converts axis order and LPS/RAS.

Conventions used everywhere in DeepSeg:

* arrays are indexed ``[z, y, x]`` (``array_zyx``), i.e. numpy order of a SimpleITK image;
* geometry follows ITK/DICOM: ``spacing_xyz_mm`` and ``origin_lps`` in millimetres, ``direction_lps``
  a 3x3 matrix whose *columns* are the physical (LPS) directions of the i, j, k (x, y, z) axes;
* Slicer's RAS is LPS with the first two physical axes negated; :meth:`Volume.ijk_to_ras` gives it.

Every reading function validates what it read and raises :class:`~deepseg_core.errors.ImageError`
naming the file and the problem. Every writing function writes to a temporary name and renames.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import DeepSegError, ImageError
from .fileutil import atomic_path

#: File name endings DeepSeg reads and writes as single images.
IMAGE_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
#: File name endings of label map files DeepSeg writes (segmentation results) and scores.
LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
_ORTHOGONALITY_TOLERANCE = 1e-4
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3D image on a physical grid.

    Attributes:
        array_zyx: voxel values, shape ``(Z, Y, X)``.
        spacing_xyz_mm: voxel size along i, j, k (x, y, z) in mm.
        origin_lps: physical position (LPS, mm) of voxel ``[0, 0, 0]``.
        direction_lps: 3x3 matrix, column ``c`` is the LPS unit vector of array axis ``x, y, z``[c].
    """

    array_zyx: np.ndarray
    spacing_xyz_mm: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin_lps: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction_lps: np.ndarray = field(default_factory=lambda: np.eye(3))

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing_xyz_mm", tuple(float(s) for s in self.spacing_xyz_mm))
        object.__setattr__(self, "origin_lps", tuple(float(o) for o in self.origin_lps))
        object.__setattr__(self, "direction_lps", np.asarray(self.direction_lps, dtype=float).reshape(3, 3))

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        """Array shape ``(Z, Y, X)``."""
        return tuple(int(s) for s in self.array_zyx.shape[-3:])  # type: ignore[return-value]

    @property
    def spacing_zyx_mm(self) -> tuple[float, float, float]:
        """Voxel size per array axis ``(z, y, x)`` in mm, the order metrics and filters want."""
        x, y, z = self.spacing_xyz_mm
        return (z, y, x)

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (1 ml = 1000 mm^3)."""
        return float(np.prod(self.spacing_xyz_mm)) / 1000.0

    def with_array(self, array_zyx: np.ndarray) -> Volume:
        """Same grid, other voxels (shape must match)."""
        if tuple(array_zyx.shape[-3:]) != self.shape_zyx:
            raise ValueError(f"array shape {array_zyx.shape} does not match grid {self.shape_zyx}")
        return dataclasses.replace(self, array_zyx=array_zyx)

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix mapping voxel index ``(i, j, k) = (x, y, z)`` to LPS mm."""
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction_lps @ np.diag(self.spacing_xyz_mm)
        matrix[:3, 3] = self.origin_lps
        return matrix

    def ijk_to_ras(self) -> np.ndarray:
        """4x4 matrix mapping voxel index ``(i, j, k)`` to RAS mm (Slicer's world)."""
        return _LPS_TO_RAS @ self.ijk_to_lps()

    def same_grid(self, other: Volume, tolerance_mm: float = 1e-4) -> bool:
        """True when both volumes have the same shape and geometry (within ``tolerance_mm``)."""
        return self.shape_zyx == other.shape_zyx and np.allclose(self.ijk_to_lps(), other.ijk_to_lps(), atol=tolerance_mm)

    def to_sitk(self) -> sitk.Image:
        """SimpleITK image with this geometry (voxels copied)."""
        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array_zyx), isVector=False)
        image.SetSpacing(self.spacing_xyz_mm)
        image.SetOrigin(self.origin_lps)
        image.SetDirection(tuple(self.direction_lps.reshape(-1)))
        return image

    @classmethod
    def from_sitk(cls, image: sitk.Image) -> Volume:
        """Volume from a 3D scalar SimpleITK image (voxels copied)."""
        return cls(
            array_zyx=sitk.GetArrayFromImage(image),
            spacing_xyz_mm=image.GetSpacing(),
            origin_lps=image.GetOrigin(),
            direction_lps=np.asarray(image.GetDirection()).reshape(3, 3),
        )

    @classmethod
    def from_ijk_to_lps(cls, array_zyx: np.ndarray, ijk_to_lps: np.ndarray) -> Volume:
        """Volume from a 4x4 voxel-to-LPS matrix (as stored by NRRD and slicerio)."""
        axes = np.asarray(ijk_to_lps, dtype=float)[:3, :3]
        spacing = np.linalg.norm(axes, axis=0)
        return cls(
            array_zyx=array_zyx,
            spacing_xyz_mm=tuple(spacing),
            origin_lps=tuple(np.asarray(ijk_to_lps, dtype=float)[:3, 3]),
            direction_lps=axes / spacing,
        )


# --------------------------------------------------------------------------------------------
# validation


def validate_volume(volume: Volume, subject: str | Path = "volume") -> None:
    """Raise :class:`ImageError` unless ``volume`` is a usable 3D scalar volume.

    Checks: 3 array axes, no zero-sized axis, positive finite spacing, orthonormal direction,
    and (for float data) no NaN or Inf voxel.
    """
    array = volume.array_zyx
    if array.ndim != 3:
        raise ImageError(
            "is not a 3D volume",
            subject=subject,
            expected="3 axes (z, y, x)",
            found=f"{array.ndim} axes with shape {tuple(array.shape)}",
            hint="Split a 4D / multi-channel image into one 3D file per channel.",
        )
    if 0 in array.shape:
        raise ImageError(
            "has a zero-sized axis",
            subject=subject,
            expected="at least one voxel along every axis",
            found=f"shape (z, y, x) = {tuple(array.shape)}",
        )
    spacing = np.asarray(volume.spacing_xyz_mm)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ImageError(
            "has an invalid voxel spacing",
            subject=subject,
            expected="positive spacing in mm",
            found=f"{tuple(spacing)}",
        )
    direction = volume.direction_lps
    deviation = float(np.abs(direction.T @ direction - np.eye(3)).max())
    if not np.all(np.isfinite(direction)) or deviation > _ORTHOGONALITY_TOLERANCE:
        raise ImageError(
            "has a non-orthogonal (sheared) direction matrix",
            subject=subject,
            expected=f"orthonormal axes (|D^T D - I| <= {_ORTHOGONALITY_TOLERANCE})",
            found=f"deviation {deviation:.3g}, direction {np.round(direction, 4).tolist()}",
            hint="Resample the image onto an orthogonal grid (e.g. Slicer's Resample Scalar Volume).",
        )
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            bad = int(array.size - np.count_nonzero(finite))
            raise ImageError(
                "contains NaN or Inf voxels",
                subject=subject,
                expected="finite intensities",
                found=f"{bad} non-finite voxel(s) of {array.size}",
                hint="Fix or mask those voxels (e.g. replace them with the background value).",
            )


# --------------------------------------------------------------------------------------------
# images


def _same_axes(a: Volume, b: Volume, tolerance_mm: float) -> bool:
    """Same spacing and direction: the voxel-step columns of the two affines agree within ``tolerance_mm``."""
    return bool(np.allclose(a.ijk_to_lps()[:3, :3], b.ijk_to_lps()[:3, :3], rtol=0.0, atol=tolerance_mm))


def lattice_offset_zyx(box: Volume, grid: Volume, tolerance_mm: float = 1e-4) -> list[int] | None:
    """Where ``box``'s first voxel lies on ``grid``'s voxel lattice, ``[z, y, x]`` (may be negative or
    past the grid), or None when the two do not share a lattice (another spacing or direction, or an
    origin between voxels by more than ``10 * tolerance_mm``)."""
    if not _same_axes(box, grid, tolerance_mm):
        return None
    offset_ijk = np.linalg.solve(grid.ijk_to_lps()[:3, :3], np.subtract(box.origin_lps, grid.origin_lps))
    whole = np.round(offset_ijk)
    if not np.all(np.abs(offset_ijk - whole) * np.asarray(grid.spacing_xyz_mm) <= tolerance_mm * 10):
        return None
    return [int(v) for v in whole[::-1]]


def union_grid(first: Volume, second: Volume, tolerance_mm: float = 1e-4) -> Volume | None:
    """The smallest grid on the lattice both volumes share that covers both (its array: zeros, a
    read-only view without memory), or None when they do not share a lattice."""
    start = lattice_offset_zyx(second, first, tolerance_mm)
    if start is None:
        return None
    low = [min(0, s) for s in start]
    high = [max(n1, s + n2) for s, n1, n2 in zip(start, first.shape_zyx, second.shape_zyx, strict=True)]
    origin = first.ijk_to_lps() @ np.array([*low[::-1], 1.0])
    shape = tuple(h - lo for lo, h in zip(low, high, strict=True))
    return Volume(np.broadcast_to(np.uint8(0), shape), first.spacing_xyz_mm, tuple(origin[:3]), first.direction_lps)


def place_on_grid(labels: Volume, grid: Volume, subject: str | Path = "labels", tolerance_mm: float = 1e-4) -> Volume:
    """``labels`` (``(Z, Y, X)`` or layers ``(L, Z, Y, X)``) on ``grid``'s voxels, when both lie on one voxel lattice.

    Slicer saves a segmentation cropped to its segments' extent when asked ("Crop to minimum
    extent" in its Save dialog), and a label file may cover a sub-box of its image: same spacing and
    direction, the origin a whole number of voxels away. Such labels are placed without
    interpolation: grid voxels they do not cover are 0. Labels already on ``grid`` come back as
    they are.

    Raises:
        ImageError: another spacing or direction, an origin between voxels, or a non-zero label
            outside ``grid`` (it would be lost).
    """
    if labels.same_grid(grid, tolerance_mm):
        return labels
    start_zyx = lattice_offset_zyx(labels, grid, tolerance_mm)
    if start_zyx is None:
        same_axes = _same_axes(labels, grid, tolerance_mm)
        raise ImageError(
            "is not on the image's voxel grid",
            subject=subject,
            expected=f"the image's grid (shape {grid.shape_zyx}, spacing {grid.spacing_xyz_mm}, origin {grid.origin_lps}), "
            "or a box of it (same spacing and direction, origin a whole number of voxels away)",
            found=f"shape {labels.shape_zyx}, spacing {labels.spacing_xyz_mm}, origin {labels.origin_lps}"
            + ("" if same_axes else ", another spacing or direction"),
            hint="Export the labels on the image's grid (in Slicer: Export to a labelmap with the image as reference).",
        )
    source = np.asarray(labels.array_zyx)
    lead = source.ndim - 3
    placed = np.zeros((*source.shape[:lead], *grid.shape_zyx), dtype=source.dtype)
    inside_src, inside_dst = [slice(None)] * lead, [slice(None)] * lead
    for start, n_src, n_dst in zip(start_zyx, labels.shape_zyx, grid.shape_zyx, strict=True):
        low, high = min(max(start, 0), n_dst), min(max(start + n_src, 0), n_dst)
        inside_src.append(slice(low - start, high - start) if high > low else slice(0, 0))
        inside_dst.append(slice(low, high) if high > low else slice(0, 0))
    if any(part.stop <= part.start for part in inside_dst[lead:]):
        raise ImageError(
            "does not overlap the image",
            subject=subject,
            expected=f"labels on the image's grid (shape {grid.shape_zyx}) or a box of it",
            found=f"a box of shape {labels.shape_zyx} starting at voxel {start_zyx} of the image (z, y, x)",
            hint="Check that the labels belong to this image.",
        )
    kept = source[tuple(inside_src)]
    if np.count_nonzero(kept) != np.count_nonzero(source):
        raise ImageError(
            "has labelled voxels outside the image",
            subject=subject,
            expected=f"labels inside the image's grid (shape {grid.shape_zyx})",
            found=f"{np.count_nonzero(source) - np.count_nonzero(kept)} labelled voxel(s) outside it "
            f"(the labels start at voxel {start_zyx} of the image, z, y, x)",
            hint="Check that the labels belong to this image.",
        )
    placed[tuple(inside_dst)] = kept
    return Volume(placed, grid.spacing_xyz_mm, grid.origin_lps, grid.direction_lps)


def _has_image_suffix(path: Path) -> bool:
    return path.name.lower().endswith(IMAGE_SUFFIXES)


def read_image(path: str | Path, *, series_uid: str | None = None) -> Volume:
    """Read a 3D scalar image from NRRD, NIfTI, MHA/MHD, or a DICOM series folder.

    Args:
        path: an image file, or a folder holding one DICOM series.
        series_uid: which series to read when a DICOM folder holds several.

    Returns:
        The validated :class:`Volume` (voxel type as stored in the file).

    Raises:
        ImageError: missing, unreadable, not 3D, multi-component, zero-sized, sheared or non-finite.
    """
    path = Path(path)
    if path.is_dir():
        return read_dicom_series(path, series_uid=series_uid)
    if not path.exists():
        raise ImageError(
            "file not found",
            subject=path,
            hint="Check the path; DeepSeg never downloads inputs.",
        )
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        dimension = reader.GetDimension()
        size = reader.GetSize()
        components = reader.GetNumberOfComponents()
        # first: a colour cine loop or a single-frame SEG would otherwise get advice about channels or slices
        _refuse_non_volume_dicom(reader, path, frames=int(size[2]) if dimension >= 3 else 1)
        if dimension != 3:
            raise ImageError(
                f"is a {dimension}D image",
                subject=path,
                expected="a 3D volume",
                found=f"{dimension}D with size {size}",
                hint="Split a 4D / multi-channel image into one 3D file per channel."
                if dimension > 3
                else "Provide a 3D volume (a single slice cannot be segmented in 3D).",
            )
        if 0 in size:
            raise ImageError(
                "has a zero-sized axis",
                subject=path,
                expected="at least one voxel along every axis",
                found=f"size (x, y, z) = {size}",
            )
        if components != 1:
            raise ImageError(
                "has vector voxels",
                subject=path,
                expected="one scalar per voxel",
                found=f"{components} components per voxel",
                hint="Save each channel as its own 3D file.",
            )
        if path.name.lower().endswith((".nii", ".nii.gz")):
            _check_nifti_complete(path)
        image = reader.Execute()
    except ImageError:
        raise
    except RuntimeError as exc:
        raise ImageError(
            "cannot be read as an image (corrupt, truncated or unsupported format)",
            subject=path,
            found=_first_line(exc),
            hint=f"Supported: {', '.join(IMAGE_SUFFIXES)} files and DICOM series folders.",
        ) from exc
    volume = Volume.from_sitk(image)
    validate_volume(volume, subject=path)
    return volume


def _refuse_non_volume_dicom(reader: sitk.ImageFileReader, path: Path, frames: int) -> None:
    """A DICOM SEG's frames are per segment and per position, in any order and possibly sparse, and GDCM
    stacks them as contiguous slices (spacing and origin wrong, 0/255 values); an RT Dose file is a dose grid
    and a cine loop's frames are times: none is a volume to segment."""
    from .dicom_series import refuse_non_volume

    if reader.HasMetaDataKey("0008|0016"):
        refuse_non_volume(reader.GetMetaData("0008|0016"), subject=path, file_name=path.name, frames=frames)


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Header + voxel bytes a NIfTI-1/2 file must hold, or None when the header is not NIfTI."""
    import struct

    for endian in "<>":
        size = struct.unpack(endian + "i", header[:4])[0]
        if size == 348 and len(header) >= 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
        elif size == 540 and len(header) >= 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dims = struct.unpack(endian + "8q", header[16:80])
            offset = struct.unpack(endian + "q", header[168:176])[0]
        else:
            continue
        count = int(np.prod([max(int(d), 1) for d in dims[1 : 1 + max(0, min(int(dims[0]), 7))]]))
        return max(offset, size) + count * bitpix // 8
    return None


def _check_nifti_complete(path: Path) -> None:
    """ITK zero-fills a truncated NIfTI without complaint; count the bytes ourselves."""
    import gzip

    compressed = path.name.lower().endswith(".gz")
    opener = gzip.open if compressed else open
    total = 0
    try:
        with opener(path, "rb") as stream:  # type: ignore[operator]
            header = stream.read(540)
            total = len(header)
            expected = _nifti_expected_bytes(header)
            if expected is None:
                return
            while chunk := stream.read(1 << 22):
                total += len(chunk)
                if total >= expected:
                    return
    except (OSError, EOFError) as exc:
        raise ImageError(
            "cannot be read as an image (corrupt or truncated compressed data)",
            subject=path,
            found=_first_line(exc),
        ) from exc
    if total < expected:
        raise ImageError(
            "is truncated",
            subject=path,
            expected=f"{expected} bytes of header and voxels",
            found=f"{total} bytes" + (" after decompression" if compressed else ""),
            hint="The file was cut short (interrupted copy or download); copy it again.",
        )


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    detail = [ln for ln in lines if "Exception" not in ln and not ln.startswith("ITK")]
    return (detail or lines or [type(exc).__name__])[-1][:300]


def read_dicom_series(folder: str | Path, series_uid: str | None = None) -> Volume:
    """Read one DICOM series from ``folder`` as a 3D volume (slices sorted by position), after checking that
    its slices stack into one regular volume (:func:`.dicom_series.plan_series`); slices that scale their
    values differently are read as float32, one multi-frame file as that file.

    Raises:
        ImageError: no series, several series and no ``series_uid``, a series that does not stack into one
            regular volume (several orientations, images sharing a position, uneven spacing, gantry tilt), a
            single slice, a non-image object, or an unreadable series.
    """
    from .dicom_series import plan_series

    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError("DICOM folder not found", subject=folder)
    series_ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if not series_ids:
        raise ImageError(
            "holds no DICOM series",
            subject=folder,
            expected="a folder of DICOM slices",
            found=f"{sum(1 for _ in folder.iterdir())} entries, none a readable DICOM image",
        )
    if series_uid is None:
        if len(series_ids) > 1:
            raise ImageError(
                "holds several DICOM series",
                subject=folder,
                expected="exactly one series, or a series UID",
                found=", ".join(series_ids),
                hint="Pass the series UID to read (deepseg segment / info: --series-uid UID).",
            )
        series_uid = series_ids[0]
    elif series_uid not in series_ids:
        raise ImageError(
            "does not hold the requested DICOM series",
            subject=folder,
            expected=series_uid,
            found=", ".join(series_ids),
        )
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
    try:
        plan = plan_series(folder, files)
    except RuntimeError as exc:  # a header SimpleITK cannot read
        raise ImageError("DICOM series cannot be read", subject=folder, found=_first_line(exc)) from exc
    if plan.single_file:
        return read_image(plan.files[0])
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(plan.files)
    if plan.float_voxels:  # else the first slice's voxel type would truncate the others' rescaled values
        reader.SetOutputPixelType(sitk.sitkFloat32)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise ImageError("DICOM series cannot be read", subject=folder, found=_first_line(exc)) from exc
    volume = Volume.from_sitk(image)
    validate_volume(volume, subject=folder)
    return volume


def write_image(volume: Volume, path: str | Path, *, compress: bool = True) -> Path:
    """Write ``volume`` to ``path`` (format from the suffix), atomically.

    Raises:
        ImageError: unsupported suffix.
        DeepSegError: the folder is missing or not writable.
    """
    path = Path(path)
    if not _has_image_suffix(path):
        raise ImageError(
            "unsupported output file type",
            subject=path,
            expected=" or ".join(IMAGE_SUFFIXES),
            found=path.suffix or "no suffix",
        )
    validate_volume(volume, subject=path)
    image = volume.to_sitk()
    with atomic_path(path) as tmp:
        try:
            sitk.WriteImage(image, str(tmp), useCompression=compress)
        except RuntimeError as exc:
            raise DeepSegError("cannot write image", subject=path, found=_first_line(exc)) from exc
    return path


# --------------------------------------------------------------------------------------------
# segmentations


@dataclass(frozen=True)
class SegmentInfo:
    """One segment of a segmentation: what Slicer shows in its segment list.

    Attributes:
        name: display name.
        label_value: voxel value of the segment in its layer (> 0).
        color_rgb: colour, three floats in [0, 1].
        terminology: Slicer terminology entry dict (slicerio format), or None.
        layer: index of the labelmap layer holding the segment (segments in one layer don't overlap).
        segment_id: stable ID in the file; the name is used when None.
    """

    name: str
    label_value: int
    color_rgb: tuple[float, float, float] = (0.5, 0.5, 0.5)
    terminology: dict[str, Any] | None = None
    layer: int = 0
    segment_id: str | None = None


def is_segmentation_file(path: str | Path) -> bool:
    """Whether ``path`` names a Slicer ``.seg.nrrd`` (segments by name), whatever the case of its suffix
    (``CASE.SEG.NRRD`` from a Windows share is one too, not a label map image)."""
    return Path(path).name.lower().endswith(".seg.nrrd")


def class_boxes(labels_zyx: np.ndarray, values: Iterable[int]) -> dict[int, tuple[slice, ...]]:
    """The bounding box of each class of ``values`` present in ``labels_zyx`` (one pass over the array;
    absent classes are left out).

    Per-class work (clean-up, summaries, scores, a segment's extent) then runs inside the class's box: a
    512 x 512 x 300 CT is 79 M voxels, and a pass over the whole array per class cost seconds per class
    however small the class. ``values`` <= 0 are left out (background)."""
    wanted = sorted({int(v) for v in values if int(v) > 0})
    if not wanted or labels_zyx.size == 0:
        return {}
    labels = np.asarray(labels_zyx)
    if labels.dtype.kind not in "iu":  # find_objects takes integer labels only
        labels = labels.astype(np.int64)
    # a box per value up to the largest asked for; values above it are ignored
    found = ndimage.find_objects(labels, max_label=wanted[-1])
    return {value: found[value - 1] for value in wanted if found[value - 1] is not None}


@dataclass(frozen=True, eq=False)
class Segmentation:
    """Labelmap layers on a grid plus the segments they hold.

    Attributes:
        layers: :class:`Volume` whose ``array_zyx`` has shape ``(L, Z, Y, X)`` (L >= 1 layers).
        segments: the segments, each naming its layer and label value.
    """

    layers: Volume
    segments: tuple[SegmentInfo, ...]

    @property
    def grid(self) -> Volume:
        """The geometry (first layer as a 3D volume)."""
        return self.layers.with_array(self.layers.array_zyx[0])

    def segment(self, name: str) -> SegmentInfo:
        """The segment called ``name``; KeyError lists the names present."""
        for seg in self.segments:
            if seg.name == name:
                return seg
        raise KeyError(f"no segment {name!r}; segments are {[s.name for s in self.segments]}")

    def mask(self, name: str) -> np.ndarray:
        """Boolean mask ``(Z, Y, X)`` of the named segment."""
        seg = self.segment(name)
        return self.layers.array_zyx[seg.layer] == seg.label_value

    def to_labelmap(self) -> Volume:
        """One labelmap with each segment's label value; refused when segments overlap."""
        if self.layers.array_zyx.shape[0] == 1:
            return self.grid
        out = np.zeros(self.layers.shape_zyx, dtype=np.uint16)
        for seg in self.segments:
            mask = self.mask(seg.name)
            if np.any(out[mask]):
                raise ImageError(
                    f"segment {seg.name!r} overlaps another segment",
                    expected="non-overlapping segments for a single labelmap",
                    found=f"{int(np.count_nonzero(out[mask]))} shared voxels",
                )
            out[mask] = seg.label_value
        return self.grid.with_array(out)


def read_segmentation(path: str | Path) -> Segmentation:
    """Read a Slicer ``.seg.nrrd`` (any number of layers) with names, colours, terminology."""
    import slicerio

    path = Path(path)
    if not path.exists():
        raise ImageError("file not found", subject=path)
    try:
        raw = slicerio.read_segmentation(str(path))
    except Exception as exc:  # slicerio/pynrrd raise many types for a bad file
        raise ImageError(
            "cannot be read as a Slicer segmentation (.seg.nrrd)",
            subject=path,
            found=_first_line(exc),
        ) from exc
    voxels = np.asarray(raw["voxels"])
    if voxels.ndim == 3:
        voxels = voxels[np.newaxis]
    if voxels.ndim != 4:
        raise ImageError("is not a 3D segmentation", subject=path, found=f"voxel array {voxels.shape}")
    layers_lzyx = np.ascontiguousarray(np.transpose(voxels, (0, 3, 2, 1)))
    layers = Volume.from_ijk_to_lps(layers_lzyx, raw["ijkToLPS"])
    validate_volume(layers.with_array(layers_lzyx[0]), subject=path)
    segments = tuple(
        SegmentInfo(
            name=s.get("name", s.get("id", f"Segment_{i + 1}")),
            label_value=int(s.get("labelValue", i + 1)),
            color_rgb=tuple(float(c) for c in s.get("color", (0.5, 0.5, 0.5))),  # type: ignore[arg-type]
            terminology=s.get("terminology"),
            layer=int(s.get("layer", 0)),
            segment_id=s.get("id"),
        )
        for i, s in enumerate(raw.get("segments", []))
    )
    return Segmentation(layers=layers, segments=segments)


def write_segmentation(
    path: str | Path,
    labelmap: Volume,
    segments: Sequence[SegmentInfo],
) -> Path:
    """Write a Slicer ``.seg.nrrd`` atomically.

    Args:
        path: output path ending in ``.seg.nrrd``.
        labelmap: grid and voxels; ``array_zyx`` of shape ``(Z, Y, X)`` (one layer) or
            ``(L, Z, Y, X)`` (layers, for overlapping segments). Integer voxel type.
        segments: one entry per segment, naming its layer and label value.

    Raises:
        ImageError: bad suffix, non-integer voxels, a segment whose layer does not exist,
            duplicate names, or label values that do not fit.
    """
    import slicerio

    path = Path(path)
    if not is_segmentation_file(path):
        raise ImageError("unsupported segmentation file type", subject=path, expected=".seg.nrrd", found=path.name)
    voxels = np.asarray(labelmap.array_zyx)
    if voxels.ndim == 3:
        voxels = voxels[np.newaxis]
    if voxels.ndim != 4 or not np.issubdtype(voxels.dtype, np.integer):
        raise ImageError(
            "cannot store this labelmap",
            subject=path,
            expected="integer voxels shaped (Z, Y, X) or (layers, Z, Y, X)",
            found=f"{voxels.dtype} {voxels.shape}",
        )
    validate_volume(labelmap.with_array(voxels[0]), subject=path)
    names = [s.name for s in segments]
    if len(set(names)) != len(names):
        raise ImageError("duplicate segment names", subject=path, found=str(names))
    for seg in segments:
        if not 0 <= seg.layer < voxels.shape[0] or seg.label_value <= 0:
            raise ImageError(
                f"segment {seg.name!r} has an invalid layer or label value",
                subject=path,
                expected=f"layer in [0, {voxels.shape[0] - 1}] and label value > 0",
                found=f"layer {seg.layer}, label value {seg.label_value}",
            )
    # every segment's extent from one find_objects pass per layer (a comparison and np.nonzero per
    # segment passed over the whole image once per segment)
    boxes = {
        (layer, value): box
        for layer in range(voxels.shape[0])
        for value, box in class_boxes(voxels[layer], [s.label_value for s in segments if s.layer == layer]).items()
    }
    stored_dtype = np.uint8 if int(voxels.max(initial=0)) < 256 else np.uint16
    voxels_ijk = np.transpose(voxels.astype(stored_dtype), (0, 3, 2, 1))
    raw = {
        "voxels": voxels_ijk[0] if voxels_ijk.shape[0] == 1 else voxels_ijk,
        "ijkToLPS": labelmap.ijk_to_lps(),
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": [_segment_to_slicerio(seg, boxes.get((seg.layer, seg.label_value))) for seg in segments],
    }
    with atomic_path(path) as tmp:
        slicerio.write_segmentation(str(tmp), raw)
    return path


def _segment_to_slicerio(seg: SegmentInfo, box_zyx: tuple[slice, ...] | None) -> dict[str, Any]:
    """``box_zyx``: the bounding box of the segment's voxels, None when it has none."""
    if box_zyx is not None:
        z, y, x = box_zyx
        extent = [x.start, x.stop - 1, y.start, y.stop - 1, z.start, z.stop - 1]
    else:
        extent = [0, -1, 0, -1, 0, -1]
    entry: dict[str, Any] = {
        "id": seg.segment_id or seg.name,
        "name": seg.name,
        "color": [float(c) for c in seg.color_rgb],
        "labelValue": int(seg.label_value),
        "layer": int(seg.layer),
        "extent": extent,
    }
    if seg.terminology:
        entry["terminology"] = seg.terminology
    return entry
