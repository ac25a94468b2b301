"""A NIfTI-1 reader written from the format's specification, independent of ITK, for the geometry tests.

It decodes the 348-byte header (dims, datatype, pixdim, qform from the quaternion, sform rows,
scaling) and the voxel bytes, and turns the RAS voxel-to-world matrix into the LPS geometry DeepSeg
uses (flip the first two world axes). Nothing here comes from SimpleITK or DeepSeg, so agreement
with ``deepseg_core.io.read_image`` checks the RAS/LPS conversion instead of assuming it.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

#: NIfTI-1 datatype code -> numpy type (little-endian; the byte order is fixed up below).
DATATYPES = {2: np.uint8, 4: np.int16, 8: np.int32, 16: np.float32, 64: np.float64, 256: np.int8, 512: np.uint16, 768: np.uint32}


@dataclass(frozen=True)
class NiftiHeader:
    """The fields the geometry depends on, as stored (RAS world, mm)."""

    dim: tuple[int, ...]
    datatype: int
    pixdim: tuple[float, ...]
    vox_offset: int
    scl_slope: float
    scl_inter: float
    qform_code: int
    sform_code: int
    quatern_bcd: tuple[float, float, float]
    qoffset: tuple[float, float, float]
    srow: np.ndarray
    endian: str

    def qform_ras(self) -> np.ndarray:
        """4x4 voxel-to-RAS matrix of the qform (method 2 of the NIfTI-1 standard)."""
        b, c, d = self.quatern_bcd
        a = np.sqrt(max(0.0, 1.0 - (b * b + c * c + d * d)))
        rotation = np.array(
            [
                [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
            ]
        )
        qfac = -1.0 if self.pixdim[0] < 0 else 1.0
        matrix = np.eye(4)
        matrix[:3, :3] = rotation @ np.diag([self.pixdim[1], self.pixdim[2], qfac * self.pixdim[3]])
        matrix[:3, 3] = self.qoffset
        return matrix

    def sform_ras(self) -> np.ndarray:
        """4x4 voxel-to-RAS matrix of the sform (method 3: the three stored rows)."""
        return np.vstack([self.srow, [0.0, 0.0, 0.0, 1.0]])

    def voxel_to_ras(self) -> np.ndarray:
        """The matrix a NIfTI reader uses: sform when its code is set, else qform, else pixdim alone."""
        if self.sform_code > 0:
            return self.sform_ras()
        if self.qform_code > 0:
            return self.qform_ras()
        return np.diag([*self.pixdim[1:4], 1.0])


def read_header_and_voxels(path: Path) -> tuple[NiftiHeader, np.ndarray]:
    """Header and voxels ``(Z, Y, X)`` (x fastest on disk, as NIfTI stores them, scaling applied when set)."""
    raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
    endian = "<" if struct.unpack("<i", raw[:4])[0] == 348 else ">"
    assert struct.unpack(endian + "i", raw[:4])[0] == 348, f"{path} is not NIfTI-1"
    assert raw[344:347] in (b"n+1", b"ni1"), f"{path}: bad magic {raw[344:348]!r}"
    dim = struct.unpack(endian + "8h", raw[40:56])
    header = NiftiHeader(
        dim=dim,
        datatype=struct.unpack(endian + "h", raw[70:72])[0],
        pixdim=struct.unpack(endian + "8f", raw[76:108]),
        vox_offset=int(struct.unpack(endian + "f", raw[108:112])[0]),
        scl_slope=struct.unpack(endian + "f", raw[112:116])[0],
        scl_inter=struct.unpack(endian + "f", raw[116:120])[0],
        qform_code=struct.unpack(endian + "h", raw[252:254])[0],
        sform_code=struct.unpack(endian + "h", raw[254:256])[0],
        quatern_bcd=struct.unpack(endian + "3f", raw[256:268]),
        qoffset=struct.unpack(endian + "3f", raw[268:280]),
        srow=np.array(struct.unpack(endian + "12f", raw[280:328]), dtype=float).reshape(3, 4),
        endian=endian,
    )
    nx, ny, nz = dim[1], dim[2], dim[3]
    dtype = np.dtype(DATATYPES[header.datatype]).newbyteorder(endian)
    count = nx * ny * nz
    voxels = np.frombuffer(raw, dtype=dtype, count=count, offset=header.vox_offset).reshape(nz, ny, nx)
    if header.scl_slope not in (0.0, 1.0) or header.scl_inter != 0.0:
        voxels = voxels * header.scl_slope + header.scl_inter
    return header, voxels


def lps_geometry(voxel_to_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(spacing_xyz, origin_lps, direction_lps)`` of a voxel-to-RAS matrix (RAS -> LPS negates x and y)."""
    voxel_to_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ voxel_to_ras
    axes = voxel_to_lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    return spacing, voxel_to_lps[:3, 3], axes / spacing
