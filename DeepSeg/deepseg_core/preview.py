"""PNG previews of a volume with a label overlay (axial, coronal, sagittal), without extra packages."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from .fileutil import atomic_write_bytes
from .io import Volume


def encode_png(rgb: np.ndarray) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 image as PNG bytes."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3) uint8, got {rgb.dtype} {rgb.shape}")
    height, width = rgb.shape[:2]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = np.concatenate([np.zeros((height, 1), np.uint8), rgb.reshape(height, width * 3)], axis=1)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows.tobytes(), 6)) + chunk(b"IEND", b"")


def _window(values: np.ndarray, low: float, high: float) -> np.ndarray:
    scaled = (values.astype(np.float32) - low) / max(high - low, 1e-6)
    return (np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def _physical_aspect(view: np.ndarray, row_mm: float, col_mm: float) -> np.ndarray:
    """Stretch rows so that one displayed pixel is square in mm (nearest neighbour)."""
    factor = row_mm / col_mm
    if abs(factor - 1.0) < 1e-3:
        return view
    zoom = (factor, 1.0) + (1.0,) * (view.ndim - 2)
    return ndimage.zoom(view, zoom, order=0)


def render_overlay(
    image: Volume,
    labels_zyx: np.ndarray,
    colors: Mapping[int, Sequence[float]],
    window: tuple[float, float] | None = None,
    opacity: float = 0.45,
    scale: int = 2,
) -> np.ndarray:
    """Axial, coronal and sagittal slices through the labelled region, side by side.

    Args:
        image: the intensity volume.
        labels_zyx: integer labels on the image grid, shape ``(Z, Y, X)``.
        colors: label value -> RGB in [0, 1].
        window: display window (low, high); default the 1st-99th intensity percentiles.
        opacity: label fill opacity.
        scale: integer magnification of the picture (small volumes are hard to see at 1).

    Returns:
        ``(H, W, 3)`` uint8 picture; views are stretched to square millimetres.
    """
    array = image.array_zyx
    low, high = window or tuple(np.percentile(array, [1, 99]))
    foreground = labels_zyx > 0
    if foreground.any():
        z = int(np.argmax(foreground.sum(axis=(1, 2))))
        _, y, x = (int(round(c)) for c in ndimage.center_of_mass(foreground))
    else:
        z, y, x = (s // 2 for s in array.shape)
    sz, sy, sx = image.spacing_zyx_mm
    views = [
        (array[z], labels_zyx[z], sy, sx),
        (array[::-1, y, :], labels_zyx[::-1, y, :], sz, sx),
        (array[::-1, :, x], labels_zyx[::-1, :, x], sz, sy),
    ]
    panels = []
    for grey, lab, row_mm, col_mm in views:
        rgb = np.repeat(_window(grey, low, high)[..., None], 3, axis=2).astype(np.float32)
        for value, color in colors.items():
            mask = lab == value
            rgb[mask] = (1 - opacity) * rgb[mask] + opacity * 255 * np.asarray(color, dtype=np.float32)
            edge = mask & ~ndimage.binary_erosion(mask)
            rgb[edge] = 255 * np.asarray(color, dtype=np.float32)
        panels.append(_physical_aspect(rgb.astype(np.uint8), row_mm, col_mm))
    height = max(p.shape[0] for p in panels)
    padded = [np.pad(p, ((0, height - p.shape[0]), (0, 4), (0, 0))) for p in panels]
    picture = np.concatenate(padded, axis=1)
    return np.repeat(np.repeat(picture, scale, axis=0), scale, axis=1)


def write_preview(
    path: str | Path,
    image: Volume,
    labels_zyx: np.ndarray,
    colors: Mapping[int, Sequence[float]],
    window: tuple[float, float] | None = None,
) -> Path:
    """Render :func:`render_overlay` and write it as a PNG (atomically)."""
    path = Path(path)
    atomic_write_bytes(path, encode_png(render_overlay(image, labels_zyx, colors, window)))
    return path
