"""nnU-Net's export (``convert_predicted_logits_to_segmentation_with_correct_shape``), streamed slab by slab.

Logits resampled to the cropped input shape (order 1 in-plane, nearest along a separate
low-resolution axis, the same anisotropy rule as the preprocessing), rounded to float16 as
nnU-Net's are, argmax (first maximum wins), crop reverted (background outside),
``transpose_backward``, the reorientation undone (``reorient``). It runs slab by slab as the sliding window finishes them: every
interpolation here is separable, so an output slice along the first (transposed) axis depends only
on the one or two network slices its coordinate falls between (nearest: one; linear: two), and
those are all it waits for. Memory holds one slab of float16 logits plus that margin, never the
whole ``(K, Z, Y, X)`` logits.

With labels only and many classes (TotalSegmentator's 118), each output slice interpolates only the
classes that can win its argmax there (:func:`candidate_channels`): a few dozen where classes are
local, as organs are, for the same labels bit for bit.

Where it differs from nnU-Net (only at near-ties; the parity tests measure it): the separable
interpolation is computed axis by axis in float32, where nnU-Net lets ``scipy.ndimage.zoom`` sum
the tensor-product weights in float64 (both are rounded to float16 afterwards, so they differ only
where a value sits on a float16 rounding boundary); and order-1 interpolation never leaves the input
range (a convex combination), so skimage's clip to the input's min/max is dropped.

Region-based models (nnU-Net's ``LabelManager`` with regions): the same resampled float16 logits go
through a float32 sigmoid instead of the argmax; the labels start at 0 and each region in turn
writes its value (``regions_class_order``) where its probability is above 0.5, so later regions
overwrite earlier ones; probabilities are 0 outside the crop in every channel (there is no
background channel); the uncertainty is the largest binary entropy of any region.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ...errors import ConfigError
from ...inference.pipelines import CollectedOutput, first_argmax, torch_view
from ...uncertainty import normalised_entropy, region_entropy
from .orientation import AxisReorder, input_shape
from .resampling import ANISOTROPY_THRESHOLD, linear_positions, nearest_positions, separate_axis

#: the export's working memory per chunk of output slices (the chunk shrinks for many classes).
EXPORT_CHUNK_BYTES = 256 << 20
#: labels only, with at least this many classes: each output slice interpolates only the classes that can
#: win its argmax (:func:`candidate_channels`); with fewer, finding them would cost more than it saves
CANDIDATE_MIN_CLASSES = 8
#: ... and only where they are at most this fraction of the classes (else all of them are interpolated)
CANDIDATE_MAX_FRACTION = 0.75
#: torch computes each channel's bilinear values independently of the other channels and of the batch in
#: its generic kernel. ATen (``upsample_bilinear2d_kernel_impl_float`` in ``UpSampleKernel.cpp``) takes it for
#: a tensor that is not channels-last contiguous (an NCHW tensor is, for a plane of one voxel) and whose
#: output height plus width exceeds 128, except with one thread and exactly 3 channels; otherwise it takes
#: the vectorised channels-last kernel, whose rounding changes with the channel count. So the export gives
#: it at least 4 channels, on planes of more than one voxel.
GENERIC_BILINEAR_MIN_CHANNELS = 4
GENERIC_BILINEAR_MIN_OUTPUT_HEIGHT_PLUS_WIDTH = 129


@dataclass(frozen=True)
class _AxisMap:
    """How one axis of the network grid maps onto the cropped input grid: ``identity``, ``nearest`` or ``linear``."""

    mode: str
    i0: np.ndarray
    i1: np.ndarray
    t: np.ndarray

    @classmethod
    def build(cls, n_in: int, n_out: int, order: int) -> _AxisMap:
        if n_in == n_out:
            index = np.arange(n_out)
            return cls("identity", index, index, np.zeros(n_out))
        if order == 0:
            index = nearest_positions(n_in, n_out)
            return cls("nearest", index, index, np.zeros(n_out))
        if order == 1:
            return cls("linear", *linear_positions(n_in, n_out))
        raise ConfigError(
            "the nnunetv2 export interpolates logits with order 0 or 1 only", found=f"order {order}", hint="Re-import the model."
        )

    def apply(self, block: torch.Tensor, axis: int, offset: int = 0) -> torch.Tensor:
        """``block`` mapped along ``axis``, as float32; ``offset``: index of the block's first slice along it.

        Linear: ``(1 - t) * v[i0] + t * v[i1]`` in float32, one rounding per operation (torch's
        elementwise kernels, in threads, neither fuse nor reorder them)."""
        first = block.index_select(axis, torch.from_numpy(self.i0 - offset)).float()
        if self.mode != "linear":
            return first
        shape = [1] * block.ndim
        shape[axis] = len(self.t)
        t = torch.from_numpy(self.t.astype(np.float32).reshape(shape))
        second = block.index_select(axis, torch.from_numpy(self.i1 - offset)).float()
        first.mul_(1.0 - t)
        return first.add_(second.mul_(t))


def candidate_channels(window: torch.Tensor) -> torch.Tensor | None:
    """The channels that can win the export's argmax at some output voxel interpolated from ``window``.

    ``window``: float16 logits ``(K, w, Y, X)`` of the ``w`` (1 or 2) network slices an output slice is
    interpolated from, in-plane nearest-neighbour axes already selected. Returns the channel indices,
    ascending (int64), or None where a value is not finite (the full argmax decides NaN and infinities).

    Every interpolated value of channel ``c`` is a convex combination (linear across the slices, bilinear
    in plane: weights at least 0, summing to 1) of ``c``'s values at the corners of one cell: the two
    slices times two neighbouring rows times two neighbouring columns (one where an axis has one sample).
    So it lies between ``c``'s minimum and maximum over that cell, and the winner's value there is at
    least the largest of the channels' minima. The float32 interpolation errs by a few units in the 24th
    bit of the largest magnitude ``M`` and the rounding to float16 by half a unit in the 11th, so a
    channel whose maximum over every cell is below that floor by more than ``(M + 1) / 128`` can neither
    win nor tie anywhere. The labels are the same as with every channel interpolated; only less is
    computed where few classes meet (an axial slice through 117 organs holds a few dozen of them).
    """
    if window.shape[1] == 2:  # (K, Y, X) over the slices; two elementwise passes beat a reduction over axis 1
        low, high = torch.minimum(window[:, 0], window[:, 1]), torch.maximum(window[:, 0], window[:, 1])
    else:
        low, high = window.amin(1), window.amax(1)
    for axis in (1, 2):
        cells = low.shape[axis] - 1
        if cells > 0:
            low = torch.minimum(low.narrow(axis, 0, cells), low.narrow(axis, 1, cells))
            high = torch.maximum(high.narrow(axis, 0, cells), high.narrow(axis, 1, cells))
    magnitude = max(float(high.amax()), -float(low.amin()))
    if not math.isfinite(magnitude):
        return None
    # rounding the threshold to float16 raises it by at most M / 2048, well inside the margin; the
    # difference of two float16 values never rounds to 0, so its sign is the comparison's
    threshold = low.amax(0).float().sub_((magnitude + 1.0) / 128).half()
    return (high.sub_(threshold).flatten(1).amax(1) >= 0).nonzero().flatten()


def _store(target: np.ndarray, values: np.ndarray) -> None:
    """``target[...] = values``, in torch's threads where ``target`` has no negative strides (torch
    cannot view those). The outputs are written through transposed views, and numpy copies into a
    strided view on one thread: 45 ms against 16 ms for 25 x 512 x 512 uint8 labels on 2 cores. The
    casts are numpy's (integers wrap, float32 to float16 rounds to nearest even)."""
    if any(stride < 0 for stride in target.strides):
        target[...] = values
        return
    torch.from_numpy(target).copy_(torch_view(values))


class NnUNetExportCollector:
    """Blended logit slabs ``(K, dz, Y', X')`` -> nnU-Net's segmentation on the input grid, slab by slab.

    See the module docstring. Output arrays are allocated in the input's axis order and written
    through their reoriented (:mod:`.orientation`) and transposed views, so undoing the reorientation
    and ``transpose_forward`` costs no copy.

    Args:
        context: :meth:`NnUNetPipeline.prepare`'s context (shapes, crop box, spacings, ``reorder``: the
            voxel reorder of the input, none when missing).
        label_values: label value of each output channel (regions: the value each region writes).
        transpose_forward: the model's axis order.
        resampling: ``resampling_fn_probabilities`` kwargs (``order``, ``order_z``, ``force_separate_z``).
        regions: the channels are nnU-Net regions (sigmoids written in channel order), not softmax labels.
        threshold: the anisotropy threshold.
        keep_probabilities: also return float16 probabilities ``(K, Z, Y, X)`` (softmax, or each region's sigmoid).
        uncertainty: also return the normalised entropy of the softmax (regions: the largest binary entropy).
        candidates_only: with labels only (softmax labels, no probabilities, no uncertainty) and at least
            :data:`CANDIDATE_MIN_CLASSES` classes, interpolate for each output slice only the classes that
            can win its argmax (:func:`candidate_channels`); False interpolates every class (the same labels,
            more work: for comparison).
    """

    def __init__(
        self,
        context: dict[str, Any],
        label_values: Sequence[int],
        transpose_forward: Sequence[int],
        resampling: dict[str, Any],
        *,
        regions: bool = False,
        threshold: float = ANISOTROPY_THRESHOLD,
        keep_probabilities: bool = False,
        uncertainty: bool = False,
        candidates_only: bool = True,
    ) -> None:
        self.values = np.asarray(label_values)
        self.channels = len(self.values)
        self.regions = regions
        self._identity_values = bool(np.array_equal(self.values, np.arange(self.channels)))
        self.crop = [tuple(int(v) for v in b) for b in context["bbox"]]
        self.crop_shape = tuple(int(s) for s in context["shape_after_crop"])
        self.network_shape = tuple(int(s) for s in context["network_shape"])
        self._allocate(context, [int(a) for a in transpose_forward], keep_probabilities, uncertainty)
        order, order_z = int(resampling.get("order", 1)), int(resampling.get("order_z", 0))
        axis = None
        if self.network_shape != self.crop_shape:
            axis = separate_axis(
                context["network_spacing"], context["spacing_transposed"], resampling.get("force_separate_z"), threshold
            )
        self.maps = [
            _AxisMap.build(n_in, n_out, order_z if a == axis else order)
            for a, (n_in, n_out) in enumerate(zip(self.network_shape, self.crop_shape, strict=True))
        ]
        first = self.maps[0]
        self._lo, self._hi = first.i0, (first.i1 if first.mode == "linear" else first.i0)
        # the plane torch interpolates: nearest axes are selected first
        plane = math.prod(
            n_out if m.mode == "nearest" else n_in
            for m, n_in, n_out in zip(self.maps[1:], self.network_shape[1:], self.crop_shape[1:], strict=True)
        )
        self._prune_channels = (
            candidates_only
            and not regions
            and not keep_probabilities
            and not uncertainty
            and self.channels >= CANDIDATE_MIN_CLASSES
            and any(m.mode == "linear" for m in self.maps[1:])
            and sum(self.crop_shape[1:]) >= GENERIC_BILINEAR_MIN_OUTPUT_HEIGHT_PLUS_WIDTH
            # a 1 x 1 plane is channels-last contiguous too, and gets the vectorised kernel
            and plane > 1
        )
        #: output slices whose argmax ran over a subset of the channels, and channels interpolated in all
        self.pruned_slices = 0
        self.interpolated_channel_slices = 0
        self._candidates_of: tuple[tuple[int, int], torch.Tensor | None] = ((-1, -1), None)  # the last search's
        self._buffer: list[tuple[int, np.ndarray]] = []  # (network z0, float16 logits)
        self._received = 0
        self._emitted = 0
        self.max_buffered_slices = 0  # the memory bound: network slices held at once

    def _allocate(self, context: dict[str, Any], tf: list[int], keep_probabilities: bool, uncertainty: bool) -> None:
        """The outputs on the input grid, and the views the slabs are written through (reoriented, then transposed)."""
        before = tuple(int(s) for s in context["shape_before_crop"])
        oriented = [0, 0, 0]
        for i, a in enumerate(tf):
            oriented[a] = before[i]
        reorder = context.get("reorder") or AxisReorder()
        shape = input_shape(reorder, oriented)
        dtype = np.uint8 if int(self.values.max()) < 255 else np.uint16
        self.labels = np.zeros(shape, dtype=dtype)
        self._labels_t = reorder.apply(self.labels).transpose(tf)
        self.probabilities = None
        self._probabilities_t = None
        if keep_probabilities:
            self.probabilities = np.zeros((self.channels, *shape), dtype=np.float16)
            if not self.regions:  # background outside the crop, as nnU-Net reverts the crop of probabilities
                self.probabilities[0] = 1
            self._probabilities_t = reorder.apply(self.probabilities).transpose([0, *[a + 1 for a in tf]])
        self.entropy = np.zeros(shape, dtype=np.float32) if uncertainty else None
        self._entropy_t = reorder.apply(self.entropy).transpose(tf) if self.entropy is not None else None

    def add(self, z_start: int, z_stop: int, blended: np.ndarray) -> None:
        """One finished slab of logits ``(K, z_stop - z_start, Y', X')`` (z in order)."""
        if blended.shape[0] != self.channels:
            raise ConfigError(
                "internal: logit slab has the wrong channel count", expected=str(self.channels), found=str(blended.shape)
            )
        # nnU-Net's logits are float16 (its accumulators are); so are the slices kept here. torch's
        # conversion rounds as numpy's astype does (to nearest even), in threads.
        self._buffer.append((z_start, torch_view(blended, np.float32).half().numpy()))
        self._received = z_stop
        self.max_buffered_slices = max(self.max_buffered_slices, sum(b.shape[1] for _, b in self._buffer))
        ready = int(np.searchsorted(self._hi, self._received, side="left"))
        if ready > self._emitted:
            self._emit(ready)

    def _emit(self, stop: int) -> None:
        # bytes per output slice, at most: every channel's float32 interpolation, float16 copy and the
        # argmax's class-last copy (+ float32 softmax)
        plane = self.crop_shape[1] * self.crop_shape[2]
        per_slice = plane * self.channels * (14 if self.probabilities is not None or self.entropy is not None else 10)
        chunk = max(1, EXPORT_CHUNK_BYTES // max(per_slice, 1))
        for start in range(self._emitted, stop, chunk):
            self._emit_rows(start, min(start + chunk, stop))
        self._emitted = stop
        keep_from = int(self._lo[stop]) if stop < len(self._lo) else self._received
        self._buffer = [(z0, b) for z0, b in self._buffer if z0 + b.shape[1] > keep_from]

    def _source(self, m0: int, m1: int) -> np.ndarray:
        """Network slices ``[m0, m1)`` of all channels, float16, from the buffered slabs (a view into one
        slab when it holds them all; callers only read it)."""
        for z0, block in self._buffer:
            if z0 <= m0 and m1 <= z0 + block.shape[1]:
                return block[:, m0 - z0 : m1 - z0]
        out = np.empty((self.channels, m1 - m0, *self.network_shape[1:]), dtype=np.float16)
        for z0, block in self._buffer:
            lo, hi = max(z0, m0), min(z0 + block.shape[1], m1)
            if lo < hi:
                out[:, lo - m0 : hi - m0] = block[:, lo - z0 : hi - z0]
        return out

    def _logits(self, source: np.ndarray, rows: slice, m0: int) -> torch.Tensor:
        """All channels' logits on the cropped input grid for output ``rows``: ``(n, K, Yc, Xc)`` float16 tensor.

        ``source``: network slices ``[m0, ...)`` of all channels, ``(K, m, Y', X')`` float16. nnU-Net's export
        buffer is float16 (ties are decided there), so the interpolated values are rounded to float16; the
        interpolations themselves run in float32. Everything runs in torch, in its threads.
        """
        first = self.maps[0]
        block = torch.from_numpy(source)
        if first.mode == "identity":
            block = block[:, rows.start - m0 : rows.stop - m0]
        else:
            block = _AxisMap(first.mode, first.i0[rows], first.i1[rows], first.t[rows]).apply(block, 1, m0)
        block = self._select_nearest(block)
        # Slices first, classes as channels: torch picks its bilinear kernel (and with it the float32
        # rounding) by the channel count and plane size, and a value that lands on a float16 midpoint
        # can then round the other way. This layout is the one the export's labels are pinned to.
        planes = block.transpose(0, 1).contiguous()  # (n, K, Y', X')
        size = self.crop_shape[1:]
        if tuple(planes.shape[2:]) != size:
            # bilinear with half-pixel centres and clamped edges (torch's align_corners=False) is scipy's
            # zoom(order=1, grid_mode=True, mode="nearest"); an axis already at its size maps to itself
            planes = torch.nn.functional.interpolate(planes.float(), size=size, mode="bilinear", align_corners=False)
        # The argmax compares the float16 values themselves: the same labels as over float32 copies of
        # them, a quarter faster, and one conversion less.
        return planes.to(torch.float16)

    def _emit_rows(self, r0: int, r1: int) -> None:
        rows = slice(r0, r1)
        m0, m1 = int(self._lo[r0]), int(self._hi[r1 - 1]) + 1
        source = self._source(m0, m1)
        (z0, _), (y0, y1), (x0, x1) = self.crop
        target = (slice(z0 + r0, z0 + r1), slice(y0, y1), slice(x0, x1))
        if self._prune_channels:
            _store(self._labels_t[target], self._label_values(self._argmax_of_candidates(source, r0, r1, m0)))
            return
        logits = self._logits(source, rows, m0)
        self.interpolated_channel_slices += self.channels * (r1 - r0)
        extras = self.probabilities is not None or self.entropy is not None
        if not self.regions and not extras:
            # the first maximum wins, as numpy's argmax in nnU-Net
            _store(self._labels_t[target], self._label_values(first_argmax(logits, 1)))
            return
        if self.regions:
            probabilities = torch.sigmoid(logits.float())
            labels = self._region_labels(probabilities)
        else:
            probabilities = torch.softmax(logits.float(), dim=1)
            labels = self._label_values(first_argmax(probabilities, 1))
        _store(self._labels_t[target], labels)
        if not extras:
            return
        by_class = probabilities.numpy().transpose(1, 0, 2, 3)
        if self._probabilities_t is not None:
            _store(self._probabilities_t[(slice(None), *target)], by_class)
        if self._entropy_t is not None:
            _store(self._entropy_t[target], region_entropy(by_class) if self.regions else normalised_entropy(by_class))

    def _argmax_of_candidates(self, source: np.ndarray, r0: int, r1: int, m0: int) -> np.ndarray:
        """Channel index of the first maximum for output ``rows`` ``[r0, r1)``: ``(n, Yc, Xc)``, the labels
        of the full argmax, interpolating per group of rows (those between the same network slices) only
        the channels :func:`candidate_channels` leaves. The candidates keep their order, so ties go to the
        same (first) channel, and each keeps the values it has among all channels: torch's generic
        bilinear kernel computes a channel independently of the others (at least
        :data:`GENERIC_BILINEAR_MIN_CHANNELS` of them are always given, the lowest others filling up)."""
        index = np.empty((r1 - r0, *self.crop_shape[1:]), dtype=np.uint8 if self.channels <= 256 else np.int64)
        start = r0
        while start < r1:
            lo, hi = int(self._lo[start]), int(self._hi[start])
            stop = start + 1
            while stop < r1 and int(self._lo[stop]) == lo and int(self._hi[stop]) == hi:
                stop += 1
            window = source[:, lo - m0 : hi - m0 + 1]
            rows = slice(start - r0, stop - r0)
            if self._candidates_of[0] != (lo, hi):  # rows between the same slices can fall in two chunks
                self._candidates_of = ((lo, hi), candidate_channels(self._select_nearest(torch.from_numpy(window))))
            candidates = self._candidates_of[1]
            if candidates is None or len(candidates) > CANDIDATE_MAX_FRACTION * self.channels:
                index[rows] = first_argmax(self._logits(window, slice(start, stop), lo), 1)
                self.interpolated_channel_slices += self.channels * (stop - start)
            else:
                chosen = candidates.numpy()
                if len(chosen) < GENERIC_BILINEAR_MIN_CHANNELS:
                    fill = np.setdiff1d(np.arange(self.channels), chosen)[: GENERIC_BILINEAR_MIN_CHANNELS - len(chosen)]
                    chosen = np.union1d(chosen, fill)
                logits = self._logits(np.ascontiguousarray(window[chosen]), slice(start, stop), lo)
                index[rows] = chosen[first_argmax(logits, 1)]
                self.pruned_slices += stop - start
                self.interpolated_channel_slices += len(chosen) * (stop - start)
            start = stop
        return index

    def _select_nearest(self, block: torch.Tensor) -> torch.Tensor:
        """``block`` ``(K, n, Y', X')`` with the in-plane nearest-neighbour axes selected (a selection commutes
        with the linear interpolation of the other axes)."""
        for axis, mapping in ((2, self.maps[1]), (3, self.maps[2])):
            if mapping.mode == "nearest":
                block = block.index_select(axis, torch.from_numpy(mapping.i0))
        return block

    def _region_labels(self, probabilities: torch.Tensor) -> np.ndarray:
        """nnU-Net's ``convert_probabilities_to_segmentation`` with regions: sigmoids ``(n, R, Y, X)`` ->
        labels ``(n, Y, X)``, each region writing its value where its probability is above 0.5, in order."""
        labels = torch.zeros((probabilities.shape[0], *probabilities.shape[2:]), dtype=torch.int32)
        for channel, value in enumerate(self.values):
            labels.masked_fill_(probabilities[:, channel] > 0.5, int(value))
        return labels.numpy()

    def _label_values(self, index: np.ndarray) -> np.ndarray:
        """Channel indices -> label values (the indices themselves when channel ``k`` is label ``k``)."""
        if self._identity_values:
            return index
        return self.values[index]

    def finish(self) -> CollectedOutput:
        """Labels (and the rest) on the input grid, in the input's axis order."""
        if self._emitted < self.crop_shape[0]:
            if self._received < self.network_shape[0]:
                raise ConfigError(
                    "internal: the sliding window ended before the last slab",
                    expected=f"{self.network_shape[0]} slices",
                    found=str(self._received),
                )
            self._emit(self.crop_shape[0])
        return CollectedOutput(self.labels, self.probabilities, self.entropy)
