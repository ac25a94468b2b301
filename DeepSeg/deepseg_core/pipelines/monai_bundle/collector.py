"""The way back: stitched logits on the model grid -> labels on the input grid, as the bundle's postprocessing.

Softmax (or sigmoid, or none) of the stitched logits, then ``Invertd``: the model grid is un-cropped
with zeros, resampled back onto the oriented input grid (linear with edge values, or nearest when
``nearest_interp``; one direction, so each axis is resampled on its own,
:func:`~.geometry.index_mapping`) and un-oriented; the label is the argmax over channels (lowest
channel on ties), taken after the inversion, or before it when the bundle discretises first (only
with nearest inversion). The one known difference: where an input voxel lies exactly half-way
between two model voxels, MONAI's nearest choice is decided by rounding in ``grid_sample``'s
coordinates (1e-9 terms of its affine), DeepSeg's by rounding half to even; labels can differ on
those planes only. :class:`BundleGridCollector` does this slab by slab as the sliding window
finishes model slices, keeping only the model slices the next input slices interpolate between
(plus one slab), so memory does not grow with classes x slices.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ...inference.pipelines import CollectedOutput, Geometry, torch_view
from ...uncertainty import normalised_entropy
from .crop import CropBox
from .geometry import AxisReorder, index_mapping
from .resampling import interpolate_axis, nearest_indices, scaled_positions
from .settings import PostprocessingSettings

#: bytes of float64 work arrays per interpolation chunk when resampling back (bounds the peak for many classes).
_CHUNK_BYTES = 64 << 20


class BundleGridCollector:
    """Stitched logit slabs on the model grid -> labels on the input grid (Invertd + argmax), streamed.

    Slabs arrive in model-z order on the cropped grid. Each is turned into probabilities (the
    bundle's activation), placed on the full model grid (zeros outside the crop box, as Invertd
    pads), and every oriented input slice whose two model slices (one, for nearest) are known is
    resampled at once: along z from the buffered model slices, then along y and x, in float64,
    rounded to float32 as MONAI's resampling output is, then the argmax. Only the model slices
    still needed are kept. At the end the labels (and probabilities, entropy) are un-oriented onto
    the input's voxel order.

    Args:
        model_grid: the grid the network input was resampled onto (before the crop).
        oriented_grid: the input grid after orientation (same origin and direction as ``model_grid``).
        reorder: the orientation step (undone at the end).
        crop: the foreground box on ``model_grid``, or None.
        channels: network output channels ``K``.
        postprocessing: activation, argmax position and interpolation.
        keep_probabilities: also return float16 ``(K, Z, Y, X)`` probabilities on the input grid.
        uncertainty: also return the normalised entropy of the probabilities on the input grid.
    """

    def __init__(
        self,
        *,
        model_grid: Geometry,
        oriented_grid: Geometry,
        reorder: AxisReorder,
        crop: CropBox | None,
        channels: int,
        postprocessing: PostprocessingSettings,
        keep_probabilities: bool,
        uncertainty: bool,
    ) -> None:
        self.model_grid, self.oriented_grid, self.reorder, self.crop = model_grid, oriented_grid, reorder, crop
        self.channels = channels
        self.post = postprocessing
        # With nearest inversion each input voxel copies one model voxel, so the argmax taken before
        # the inversion (argmax_before_invert) equals the argmax taken after it: one path serves both.
        self.mode = postprocessing.invert_interpolation
        shape = oriented_grid.shape_zyx
        self.labels = np.zeros(shape, dtype=np.uint8 if channels <= 256 else np.uint16)
        self.probabilities = np.zeros((channels, *shape), dtype=np.float16) if keep_probabilities else None
        self.entropy = np.zeros(shape, dtype=np.float32) if uncertainty else None
        # oriented voxel r lies at model position r * ratio + shift along each axis
        self.ratio_zyx, self.shift_zyx = index_mapping(model_grid, oriented_grid)
        self.model_depth = model_grid.shape_zyx[0]
        self._buffer: list[tuple[int, np.ndarray]] = []  # (full model z0, (K [+ 1], dz, Y, X) float32)
        self._known = self._initially_known()  # full model slices [0, known) are final
        self._emitted = 0  # oriented slices done
        self.max_buffered_slices = 0

    # -------------------------------------------------------------- bookkeeping
    def _crop_offsets(self) -> tuple[int, int, int]:
        return self.crop.start_zyx if self.crop is not None else (0, 0, 0)

    def _initially_known(self) -> int:
        # slices before the crop box are zeros from the start
        return min(max(self._crop_offsets()[0], 0), self.model_depth)

    def _position(self, r: int) -> float:
        return float(scaled_positions(1, self.ratio_zyx[0], r, self.shift_zyx[0])[0])

    def _needed_through(self, r: int) -> int:
        """The last model slice oriented slice ``r`` reads."""
        position = min(max(self._position(r), 0.0), self.model_depth - 1)
        if self.mode == "nearest":
            return int(nearest_indices(np.array([position]), self.model_depth)[0])
        return min(int(math.floor(position)) + 1, self.model_depth - 1)

    def _first_needed(self, r: int) -> int:
        """The first model slice oriented slice ``r`` reads."""
        position = min(max(self._position(r), 0.0), self.model_depth - 1)
        if self.mode == "nearest":
            return int(nearest_indices(np.array([position]), self.model_depth)[0])
        return int(math.floor(position))

    # -------------------------------------------------------------- slabs in
    def add(self, z_start: int, z_stop: int, blended: np.ndarray) -> None:
        """One finished slab ``(K, z_stop - z_start, Y, X)`` of logits on the (cropped) model grid."""
        probs = self._activation(blended)
        if self.entropy is not None:
            probs = np.concatenate([probs, normalised_entropy(self._softmax_for_entropy(probs, blended))[None]], axis=0)
        oz, oy, ox = self._crop_offsets()
        depth, height, width = self.model_grid.shape_zyx
        full_z0 = z_start + oz
        keep = slice(max(0, -full_z0), max(0, min(probs.shape[1], depth - full_z0)))
        probs = probs[:, keep]
        full_z0 = max(full_z0, 0)
        if probs.shape[1] > 0:
            if self.crop is not None:
                placed = np.zeros((probs.shape[0], probs.shape[1], height, width), dtype=np.float32)
                ys = slice(max(oy, 0), min(oy + probs.shape[2], height))
                xs = slice(max(ox, 0), min(ox + probs.shape[3], width))
                placed[:, :, ys, xs] = probs[:, :, ys.start - oy : ys.stop - oy, xs.start - ox : xs.stop - ox]
                probs = placed
            self._buffer.append((full_z0, probs))
        crop_end = self.crop.stop_zyx[0] if self.crop is not None else self.model_depth
        received = min(z_stop + oz, self.model_depth)
        self._known = self.model_depth if received >= min(crop_end, self.model_depth) else max(self._known, received)
        self.max_buffered_slices = max(self.max_buffered_slices, sum(p.shape[1] for _, p in self._buffer))
        self._emit()

    def _activation(self, logits: np.ndarray) -> np.ndarray:
        tensor = torch_view(logits, np.float32)
        if self.post.activation in ("softmax", "sigmoid"):  # sigmoid: the network returns [0, logit]
            return torch.softmax(tensor, dim=0).numpy()
        return tensor.numpy()

    def _softmax_for_entropy(self, probs: np.ndarray, logits: np.ndarray) -> np.ndarray:
        if self.post.activation == "none":
            return torch.softmax(torch_view(logits, np.float32), dim=0).numpy()
        return probs

    # -------------------------------------------------------------- slices out
    def _ready_until(self) -> int:
        depth = self.oriented_grid.shape_zyx[0]
        if self._known >= self.model_depth:
            return depth
        r = self._emitted
        while r < depth and self._needed_through(r) < self._known:
            r += 1
        return r

    def _emit(self) -> None:
        r1 = self._ready_until()
        step = max(1, self._rows_per_block())
        r0 = self._emitted
        while r0 < r1:
            stop = min(r0 + step, r1)
            self._emit_block(r0, stop)
            r0 = stop
        self._emitted = r1
        if r1 < self.oriented_grid.shape_zyx[0]:
            keep_from = self._first_needed(r1)
            # copies, so that the few slices kept do not hold on to the whole slab they came from
            self._buffer = [
                (max(z0, keep_from), p[:, keep_from - z0 :].copy() if keep_from > z0 else p)
                for z0, p in self._buffer
                if z0 + p.shape[1] > keep_from
            ]
        else:
            self._buffer = []

    def _rows_per_block(self) -> int:
        _, height, width = self.oriented_grid.shape_zyx
        _, mh, mw = self.model_grid.shape_zyx
        per_row = 8 * max(height, mh) * max(width, mw) * 2
        return int(_CHUNK_BYTES // per_row)

    def _model_slices(self, m0: int, m1: int) -> np.ndarray:
        first = self._buffer[0][1] if self._buffer else None
        planes = first.shape[0] if first is not None else self.channels + (1 if self.entropy is not None else 0)
        out = np.zeros((planes, m1 - m0, *self.model_grid.shape_zyx[1:]), dtype=np.float32)
        for z0, p in self._buffer:
            lo, hi = max(z0, m0), min(z0 + p.shape[1], m1)
            if lo < hi:
                out[:, lo - m0 : hi - m0] = p[:, lo - z0 : hi - z0]
        return out

    def _emit_block(self, r0: int, r1: int) -> None:
        positions_z = scaled_positions(r1 - r0, self.ratio_zyx[0], r0, self.shift_zyx[0])
        m0 = self._first_needed(r0)
        m1 = self._needed_through(r1 - 1) + 1
        source = self._model_slices(m0, m1)
        planes = source.shape[0]
        _, height, width = self.oriented_grid.shape_zyx
        _, mh, mw = self.model_grid.shape_zyx
        positions_y = scaled_positions(height, self.ratio_zyx[1], shift=self.shift_zyx[1])
        positions_x = scaled_positions(width, self.ratio_zyx[2], shift=self.shift_zyx[2])
        per_plane = 8 * (r1 - r0) * max(height, mh) * max(width, mw) * 2
        chunk = max(1, int(_CHUNK_BYTES // per_plane))
        best = np.full((r1 - r0, height, width), -np.inf, dtype=np.float32)
        labels = np.zeros((r1 - r0, height, width), dtype=self.labels.dtype)
        for c0 in range(0, planes, chunk):
            part = source[c0 : c0 + chunk]
            part = interpolate_axis(part, 1, positions_z, self.model_depth, self.mode, offset=m0)
            part = interpolate_axis(part, 2, positions_y, mh, self.mode)
            part = interpolate_axis(part, 3, positions_x, mw, self.mode).astype(np.float32)
            for i in range(part.shape[0]):
                channel = c0 + i
                if channel >= self.channels:  # the entropy plane
                    if self.entropy is not None:
                        self.entropy[r0:r1] = np.clip(part[i], 0.0, 1.0)
                    continue
                better = part[i] > best  # strict: ties keep the lower channel, as argmax does
                best[better] = part[i][better]
                labels[better] = channel
                if self.probabilities is not None:
                    self.probabilities[channel, r0:r1] = part[i]
        self.labels[r0:r1] = labels

    def finish(self) -> CollectedOutput:
        """Labels (and probabilities, entropy) on the input grid, once every slab was added."""
        if self._emitted < self.oriented_grid.shape_zyx[0]:
            self._known = self.model_depth
            self._emit()
        labels = np.ascontiguousarray(self.reorder.undo(self.labels))
        probabilities = None if self.probabilities is None else np.ascontiguousarray(self.reorder.undo(self.probabilities))
        entropy = None if self.entropy is None else np.ascontiguousarray(self.reorder.undo(self.entropy))
        return CollectedOutput(labels, probabilities, entropy)
