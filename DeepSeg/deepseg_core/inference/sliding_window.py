"""Memory-bounded sliding-window inference with Gaussian blending, tile batching and mirror TTA.

Tiles are visited in z order. Softmax probabilities of each tile, weighted by a Gaussian importance
map (sigma = ``sigma_scale`` x patch size, as nnU-Net), are accumulated in a *slab* buffer that
covers only the z range of the tiles in flight. As soon as no remaining tile reaches below some z,
those slices are final: they are normalised by the accumulated weights and handed to
``on_slab(z_start, z_stop, probabilities)`` in pieces of at most :data:`SLAB_PIECE_BYTES`, and the
buffer moves on.

Peak memory of the aggregation is therefore ``(C + 1) x D x Y x X x 4`` bytes, where ``D`` is the
patch depth (a tile batch that spans rows of tiles adds at most :data:`MAX_BUFFER_GROWTH_BYTES`;
beyond that the finished slices leave between its tiles), instead of ``(C + 1) x Z x Y x X x 4``
for a whole-volume accumulator. For 117 classes, a 512 x 512 slice and a 96-slice patch that is
11.8 GB instead of 37 GB at 300 slices; for 10 classes, 1.1 GB.
Callers keep only what they need of each slab (labels as uint8, maybe float16 probabilities).

On CUDA an out-of-memory error halves the tile batch and retries; at batch 1 it moves the
accumulator to the CPU and retries once more before giving up with a clear error.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.profiler import record_function

from ..errors import DeepSegError, ShapeError

log = logging.getLogger(__name__)

#: the largest slab handed to ``on_slab`` at once (bytes, float32; one slice when a slice alone is
#: larger); a finished z range goes out in several slabs when it is larger
SLAB_PIECE_BYTES = 256 * 2**20
#: the most the accumulator may hold beyond one patch depth (bytes), to keep a tile batch that spans
#: rows of tiles; a tile that would need more hands the finished slices over first instead
MAX_BUFFER_GROWTH_BYTES = 256 * 2**20
#: a tile that would need the accumulator deeper than one patch hands the finished slices over first when
#: there are at least this many of them, whatever the growth would cost: growing copies the whole buffer
#: and makes the next shift longer, handing over first needs neither, but each handover has a fixed cost,
#: which made handing a 2D network's one-slice rows over one at a time slower (MAX_BUFFER_GROWTH_BYTES)
EARLY_HANDOVER_MIN_SLICES = 8

ProgressCallback = Callable[[int, int, float], None]
SlabCallback = Callable[[int, int, np.ndarray], None]


class Cancelled(DeepSegError):
    """The caller's cancel callback asked to stop."""


@dataclass(frozen=True)
class SlidingWindowConfig:
    """How to tile and blend.

    Attributes:
        patch_size_zyx: tile size ``(Z, Y, X)``; use ``Z = 1`` for 2D / 2.5D networks.
        overlap: fraction of a tile shared with its neighbour along each axis (0 <= overlap < 1).
        batch_size: tiles per network call (on CPU, >= 2 takes PyTorch's faster oneDNN path).
        sigma_scale: Gaussian sigma as a fraction of the patch size (nnU-Net: 1/8).
        mirror_axes: spatial axes (0 = z, 1 = y, 2 = x) to mirror for test-time augmentation;
            every combination is run (``2 ** len(mirror_axes)`` passes).
        intensity_perturbations: extra unmirrored passes, each ``(gain, shift)`` applied to the
            normalised input (``x * gain + shift``); used for uncertainty.
        perturbed_channels: the first input channels the perturbations apply to (None: all); the
            rest are not intensities (the one-hot labels a cascade's second stage reads).
        repeats: times the unmirrored, unperturbed pass is run; > 1 only makes sense with
            stochastic layers (Monte-Carlo dropout).
        amp: float16 autocast on CUDA (ignored on CPU).
        placement: how tile starts are chosen along each axis, a key of :data:`TILE_PLACEMENTS`
            (``deepseg``: evenly spaced with at least ``overlap``); imported models' pipelines add
            their tool's rule.
        importance: the tile weight map, a key of :data:`IMPORTANCE_MAPS` (``deepseg``: Gaussian,
            max 1, no zeros; ``constant``: all ones).
        blend: ``probabilities`` (softmax of each pass, averaged and blended; slabs hold
            probabilities) or ``logits`` (raw logits averaged and blended, as nnU-Net and MONAI do;
            slabs hold logits and the pipeline turns them into labels).
        pad: where an image smaller than a tile is padded, and with what (a key of
            :data:`PAD_MODES`): ``end`` or ``center`` with zeros; ``center_replicate`` (edge values
            repeated) or ``center_reflect`` (mirrored without repeating the edge), as MONAI's
            ``SlidingWindowInferer(padding_mode="replicate" | "reflect")`` pads.
    """

    patch_size_zyx: tuple[int, int, int]
    overlap: float = 0.5
    batch_size: int = 2
    sigma_scale: float = 0.125
    mirror_axes: tuple[int, ...] = ()
    intensity_perturbations: tuple[tuple[float, float], ...] = ()
    perturbed_channels: int | None = None
    repeats: int = 1
    amp: bool = True
    placement: str = "deepseg"
    importance: str = "deepseg"
    blend: str = "probabilities"
    pad: str = "end"

    def passes(self) -> list[tuple[tuple[int, ...], float, float]]:
        """Every network pass per tile as ``(mirrored axes, gain, shift)``; the probabilities are averaged."""
        axes = self.mirror_axes
        combos = [c for r in range(1, len(axes) + 1) for c in itertools.combinations(axes, r)]
        plain: tuple[int, ...] = ()
        return (
            [(plain, 1.0, 0.0)] * self.repeats
            + [(c, 1.0, 0.0) for c in combos]
            + [(plain, float(g), float(b)) for g, b in self.intensity_perturbations]
        )

    def __post_init__(self) -> None:
        if not 0.0 <= self.overlap < 1.0:
            raise ShapeError("invalid sliding-window overlap", expected="0 <= overlap < 1", found=str(self.overlap))
        if self.batch_size < 1 or min(self.patch_size_zyx) < 1:
            raise ShapeError(
                "invalid sliding-window batch or patch", found=f"batch {self.batch_size}, patch {self.patch_size_zyx}"
            )
        if any(a not in (0, 1, 2) for a in self.mirror_axes):
            raise ShapeError("mirror axes must be among 0 (z), 1 (y), 2 (x)", found=str(self.mirror_axes))
        if self.repeats < 1:
            raise ShapeError("sliding-window repeats must be >= 1", found=str(self.repeats))
        for value, known, what in (
            (self.placement, TILE_PLACEMENTS, "tile placement"),
            (self.importance, IMPORTANCE_MAPS, "importance map"),
            (self.blend, ("probabilities", "logits"), "blend"),
            (self.pad, PAD_MODES, "padding"),
        ):
            if value not in known:
                raise ShapeError(f"unknown sliding-window {what}", expected=f"one of {sorted(known)}", found=value)


#: pad setting -> ``(where, torch.nn.functional.pad mode)``; ``where`` is ``end`` or ``center``
#: (``(patch - size) // 2`` before, the rest after, as MONAI's sliding window pads).
PAD_MODES: dict[str, tuple[str, str]] = {
    "end": ("end", "constant"),
    "center": ("center", "constant"),
    "center_replicate": ("center", "replicate"),
    "center_reflect": ("center", "reflect"),
}


def tile_starts(length: int, patch: int, overlap: float) -> list[int]:
    """Evenly spaced tile starts covering ``[0, length)`` with at least ``overlap`` between neighbours."""
    if length <= patch:
        return [0]
    step = patch * (1.0 - overlap)
    count = math.ceil((length - patch) / max(step, 1e-6)) + 1
    return sorted({int(round(i * (length - patch) / (count - 1))) for i in range(count)})


#: placement name -> ``(length, patch, overlap) -> sorted tile starts`` along one axis.
TILE_PLACEMENTS: dict[str, Callable[[int, int, float], list[int]]] = {"deepseg": tile_starts}


def gaussian_importance(patch_size: Sequence[int], sigma_scale: float) -> torch.Tensor:
    """Gaussian weights of a tile, max 1, no zeros (so every voxel gets some weight)."""
    axes = []
    for size in patch_size:
        centre = (size - 1) / 2.0
        sigma = max(size * sigma_scale, 1e-6)
        coords = torch.arange(size, dtype=torch.float64)
        axes.append(torch.exp(-0.5 * ((coords - centre) / sigma) ** 2))
    weights = axes[0].reshape(-1, 1, 1) * axes[1].reshape(1, -1, 1) * axes[2].reshape(1, 1, -1)
    weights = weights / weights.max()
    smallest = weights[weights > 0].min()
    return torch.clamp(weights, min=float(smallest)).float()


def constant_importance(patch_size: Sequence[int], sigma_scale: float) -> torch.Tensor:
    """Equal weights (plain averaging of overlapping tiles)."""
    return torch.ones(tuple(patch_size), dtype=torch.float32)


#: importance name -> ``(patch_size, sigma_scale) -> float32 weights of a tile`` (no zeros).
IMPORTANCE_MAPS: dict[str, Callable[[Sequence[int], float], torch.Tensor]] = {
    "deepseg": gaussian_importance,
    "constant": constant_importance,
}


@functools.lru_cache(maxsize=8)
def _importance(make: Callable[[Sequence[int], float], torch.Tensor], patch: tuple[int, ...], sigma_scale: float) -> torch.Tensor:
    """``make(patch, sigma_scale)``, computed once per map, patch and sigma instead of once per image
    (DeepSeg's Gaussian took 23 ms at 96^3 and 55 ms at 128^3 on an AVX2 CPU). Shared between runs,
    so read only."""
    return make(patch, sigma_scale)


class _SlabAccumulator:
    """Probability and weight sums over a moving z range ``[z0, z0 + depth)``."""

    def __init__(self, channels: int, depth: int, plane: tuple[int, int], device: torch.device) -> None:
        self.channels, self.plane, self.device = channels, plane, device
        self.base_depth = depth
        self.z0 = 0
        self.sums = torch.zeros((channels, depth, *plane), dtype=torch.float32, device=device)
        self.weights = torch.zeros((1, depth, *plane), dtype=torch.float32, device=device)

    @property
    def depth(self) -> int:
        return int(self.sums.shape[1])

    def extra_bytes(self, z_stop: int) -> int:
        """Bytes beyond its initial depth the buffer needs to reach ``z_stop`` (0 if it needs none)."""
        extra = max(0, z_stop - self.z0 - self.base_depth)
        return extra * (self.channels + 1) * self.plane[0] * self.plane[1] * 4

    def ensure(self, z_stop: int) -> None:
        """Grow the buffer so it reaches ``z_stop`` (a batch spanning rows of tiles, when that costs at
        most ``MAX_BUFFER_GROWTH_BYTES``). Both buffers are grown before either is replaced, so an
        out-of-memory error leaves the accumulator as it was."""
        needed = z_stop - self.z0
        if needed > self.depth:
            grow = needed - self.depth
            sums = torch.cat([self.sums, self.sums.new_zeros((self.channels, grow, *self.plane))], dim=1)
            weights = torch.cat([self.weights, self.weights.new_zeros((1, grow, *self.plane))], dim=1)
            self.sums, self.weights = sums, weights

    def add(self, start: tuple[int, int, int], probs: torch.Tensor, gaussian: torch.Tensor) -> None:
        z, y, x = start
        pz, py, px = probs.shape[1:]
        self.ensure(z + pz)
        zs = slice(z - self.z0, z - self.z0 + pz)
        self.sums[:, zs, y : y + py, x : x + px].addcmul_(probs, gaussian)
        self.weights[:, zs, y : y + py, x : x + px].add_(gaussian)

    def normalised(self, z_start: int, z_stop: int, ys: slice, xs: slice) -> torch.Tensor:
        """Normalised probabilities ``(C, z_stop - z_start, Y', X')`` of finished slices (a new tensor)."""
        region = (slice(None), slice(z_start - self.z0, z_stop - self.z0), ys, xs)
        return self.sums[region] / self.weights[region]

    def advance(self, z_stop: int) -> None:
        """Forget ``[z0, z_stop)`` (handed over): the buffer then starts at ``z_stop``."""
        count = z_stop - self.z0
        # shift the unfinished slices to the front in place (no second buffer-sized allocation)
        for buffer in (self.sums, self.weights):
            rest = buffer.shape[1] - count
            if rest > 0:
                buffer[:, :rest] = buffer[:, count:].clone() if rest > count else buffer[:, count:]
            buffer[:, max(rest, 0) :].zero_()
        self.z0 = z_stop

    def to(self, device: torch.device) -> None:
        self.sums, self.weights, self.device = self.sums.to(device), self.weights.to(device), device


def sliding_window_predict(
    net: nn.Module,
    image_czyx: np.ndarray | torch.Tensor,
    num_classes: int,
    config: SlidingWindowConfig,
    on_slab: SlabCallback,
    *,
    device: str | torch.device = "cpu",
    on_progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> dict[str, int]:
    """Run ``net`` over ``image_czyx`` tile by tile and hand finished z-slabs to ``on_slab``.

    Args:
        net: maps ``(B, C_in, pz, py, px)`` to logits ``(B, num_classes, pz, py, px)``; for
            ``num_classes == 1`` a single sigmoid logit (probabilities become ``[1 - p, p]``).
        image_czyx: normalised input ``(C_in, Z, Y, X)``; smaller than a tile along an axis is
            padded (``config.pad``: zeros unless asked otherwise) and cropped back.
        num_classes: network output channels.
        config: tiling and blending.
        on_slab: receives ``(z_start, z_stop, blended)`` with ``blended`` a float32 numpy array
            ``(K, z_stop - z_start, Y, X)`` in z order, covering ``[0, Z)`` exactly once: softmax
            probabilities (``K = max(num_classes, 2)``) or, with ``config.blend == "logits"``,
            logits (``K = num_classes``).
        device: where the network runs.
        on_progress: ``(tiles_done, tiles_total, eta_seconds)`` after every batch.
        should_cancel: checked before every batch; True raises :class:`Cancelled`.

    Returns:
        ``{"tiles": n, "network_calls": m, "max_buffer_depth": d, "batch_size": b, "image_device": s,
        "host_copy": h}``, where ``d`` is the largest z depth the accumulator reached (the memory bound
        above), ``b`` the batch size finally used (lower after a CUDA out-of-memory fallback), ``s``
        where the image was at the end (on CUDA: on the GPU unless it did not fit there) and ``h`` how
        slabs on the GPU reached host memory (:class:`SlabCopier`).
    """
    device = torch.device(device)
    image = torch.as_tensor(image_czyx, dtype=torch.float32)
    if image.ndim != 4:
        raise ShapeError("sliding window needs (C, Z, Y, X)", found=str(tuple(image.shape)))
    shape = tuple(int(s) for s in image.shape[1:])
    patch = tuple(int(p) for p in config.patch_size_zyx)
    padded_shape = tuple(max(s, p) for s, p in zip(shape, patch, strict=True))
    where, pad_mode = PAD_MODES[config.pad]
    before = [(p - s) // 2 if where == "center" else 0 for s, p in zip(shape, padded_shape, strict=True)]
    if padded_shape != shape:
        pads = []
        for s, p, b in zip(reversed(shape), reversed(padded_shape), reversed(before), strict=True):
            pads += [b, p - s - b]
        image = torch.nn.functional.pad(image, pads, mode=pad_mode)
    image = _place_image(image, device)
    starts = _tile_grid(padded_shape, config)
    gaussian = _importance(IMPORTANCE_MAPS[config.importance], patch, config.sigma_scale).to(device)
    out_channels = num_classes if config.blend == "logits" else max(num_classes, 2)
    z_before, y_before, x_before = before
    accumulator = _SlabAccumulator(out_channels, patch[0], padded_shape[1:], device)
    use_amp = config.amp and device.type == "cuda"
    batch_size = config.batch_size
    done, started = 0, time.perf_counter()
    emitted = 0
    calls = 0
    max_depth = accumulator.depth

    # finished slices go out in pieces of at most SLAB_PIECE_BYTES: each piece is a normalised copy,
    # and a whole row's (117 classes x 48 x 273 x 273 float32: 1.7 GB) was the largest transient
    slice_bytes = out_channels * shape[1] * shape[2] * 4
    piece_depth = max(1, SLAB_PIECE_BYTES // slice_bytes)
    inside_y, inside_x = slice(y_before, y_before + shape[1]), slice(x_before, x_before + shape[2])
    to_host = SlabCopier(out_channels * min(piece_depth, shape[0]) * shape[1] * shape[2])

    def emit(z_stop: int) -> None:
        # padded z index -> image z index: the centre padding's slices are never normalised or emitted
        nonlocal emitted
        z_stop = min(z_stop, z_before + shape[0])
        if z_stop <= emitted:
            return
        for z_start in range(max(accumulator.z0, z_before), z_stop, piece_depth):
            z_end = min(z_start + piece_depth, z_stop)
            with _named("sliding_window.normalise"):
                piece = accumulator.normalised(z_start, z_end, inside_y, inside_x)
            with _named("sliding_window.copy_to_host"):
                piece = to_host(piece)
            with _named("sliding_window.on_slab"):
                on_slab(z_start - z_before, z_end - z_before, piece)
        if z_stop < z_before + shape[0]:
            # after the image's last slice nothing is emitted again: shifting and zeroing the buffer would be
            # wasted (at 192 x 192 voxels and two classes, 4 ms of a 0.65 s run)
            with _named("sliding_window.advance"):
                accumulator.advance(z_stop)
        emitted = z_stop

    with torch.inference_mode():
        index = 0
        while index < len(starts):
            if should_cancel is not None and should_cancel():
                raise Cancelled("cancelled by the user")
            batch = starts[index : index + batch_size]
            try:
                calls += 1
                with _named("sliding_window.predict_batch"):
                    probs = _predict_batch(net, image, batch, patch, num_classes, config, device, use_amp)
            except torch.cuda.OutOfMemoryError:
                batch_size, image = _recover_from_oom(batch_size, accumulator, image)
                continue
            for start, tile_probs in zip(batch, probs, strict=True):
                # Tiles come in z order, so every tile that starts below this one is in. When this
                # tile needs the buffer much deeper than one patch (a batch that spans two rows of
                # tiles: at 117 classes and 273 x 273 voxels per slice, 48 more slices are 1.7 GB), or
                # deeper at all while many slices are finished, those slices are handed over first. A
                # little more depth is kept for a few finished slices: a 2D network's batch spans many
                # one-slice rows, and handing each slice over alone was up to 20 % slower. For MONAI's
                # reference UNet over 160 x 192 x 192 (rows 64 slices apart) handing over first took
                # blending from 16.5 to 11.0 ms and shifting from 4.2 to 1.4 ms.
                beyond_one_patch = accumulator.extra_bytes(start[0] + patch[0])
                finished = start[0] - accumulator.z0
                if beyond_one_patch > MAX_BUFFER_GROWTH_BYTES or (beyond_one_patch > 0 and finished >= EARLY_HANDOVER_MIN_SLICES):
                    emit(start[0])
                with _named("sliding_window.blend"):
                    _add_tile(accumulator, start, tile_probs, gaussian)
            index += len(batch)
            done += len(batch)
            max_depth = max(max_depth, accumulator.depth)
            next_z = starts[index][0] if index < len(starts) else padded_shape[0]
            emit(next_z)
            if on_progress is not None:
                elapsed = time.perf_counter() - started
                on_progress(done, len(starts), elapsed / done * (len(starts) - done))
    emit(z_before + shape[0])
    return {
        "tiles": len(starts),
        "network_calls": calls,
        "max_buffer_depth": max_depth,
        "batch_size": batch_size,
        "image_device": str(image.device),
        "host_copy": to_host.kind,
    }


def _tile_grid(padded_shape_zyx: Sequence[int], config: SlidingWindowConfig) -> list[tuple[int, ...]]:
    """Every tile's start ``(z, y, x)`` over an image padded to at least the patch, in z order."""
    place = TILE_PLACEMENTS[config.placement]
    patch = config.patch_size_zyx
    return list(itertools.product(*(place(s, p, config.overlap) for s, p in zip(padded_shape_zyx, patch, strict=True))))


def count_tiles(shape_zyx: Sequence[int], config: SlidingWindowConfig) -> int:
    """How many tiles :func:`sliding_window_predict` runs over an image of ``shape_zyx`` voxels."""
    return len(_tile_grid([max(int(s), int(p)) for s, p in zip(shape_zyx, config.patch_size_zyx, strict=True)], config))


class SlabCopier:
    """Copies finished slabs from the GPU to host memory through one page-locked staging buffer.

    A copy from device memory to pageable host memory ran at 1.6 GB/s on an H200 (0.40 s of a 0.76 s
    sliding window over 300 x 512 x 512 with two classes: ``bench_sliding_window.py``'s ``parts_s``). Into
    page-locked memory the GPU writes at full bus speed; the staged slab is then copied to an ordinary
    array by the CPU's threads, so callers may keep what they receive. The one buffer holds one slab
    (at most :data:`SLAB_PIECE_BYTES`, or one slice where a slice is larger); it comes from torch's
    caching host allocator, which keeps it page-locked for the process's next runs.

    ``kind`` says what was done: ``"not needed"`` (every slab was on the CPU already), ``"pinned"``,
    or ``"pageable"`` (page-locked memory could not be had, logged once; or a device other than CUDA).
    """

    def __init__(self, max_elements: int) -> None:
        """``max_elements``: the largest slab, in float32 elements; the staging buffer holds that many."""
        self.max_elements = max_elements
        self.staging: torch.Tensor | None = None
        self.kind = "not needed"

    def __call__(self, slab: torch.Tensor) -> np.ndarray:
        """``slab`` ``(K, D, Y, X)`` float32 on any device -> the same values in a numpy array it owns (on
        the CPU: a view of ``slab``)."""
        if slab.device.type == "cpu":
            return slab.numpy()
        if slab.device.type != "cuda":  # page-locked memory serves CUDA copies
            self.kind = "pageable"
        if self.kind == "not needed":
            try:
                self.staging = torch.empty(self.max_elements, dtype=slab.dtype, pin_memory=True)
                self.kind = "pinned"
            except RuntimeError as error:
                log.warning("no page-locked host memory (%s): copying slabs to pageable memory", error)
                self.kind = "pageable"
        if self.staging is None:
            return slab.cpu().numpy()
        staged = self.staging[: slab.numel()].view(slab.shape)
        staged.copy_(slab)
        host = torch.empty(slab.shape, dtype=slab.dtype)
        host.copy_(staged)
        return host.numpy()


_NOT_PROFILED = contextlib.nullcontext()


def _named(name: str) -> contextlib.AbstractContextManager:
    """A named range in a torch.profiler trace (``Testing/Benchmarks/profile_sliding_window.py``).
    Without a profiler running it is a shared no-op: a record_function costs about 20 us even then."""
    return record_function(name) if getattr(torch.autograd.profiler, "_is_profiler_enabled", True) else _NOT_PROFILED


def _place_image(image: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The padded image ``(C, Z, Y, X)`` on ``device`` when that is a GPU with room for it.

    From host memory, every tile batch costs a gather on the CPU and a copy from pageable memory,
    with the GPU waiting for both; from device memory it is one more kernel. A 512 x 512 x 300 CT
    is 315 MB in float32, small beside the accumulator. Without room, the tiles are copied over
    batch by batch as before."""
    if device.type != "cuda" or image.device == device:
        return image
    try:
        return image.to(device)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        log.warning("the image (%.0f MB) does not fit on %s: copying tiles there batch by batch", image.nbytes / 1e6, device)
        return image


def _add_tile(accumulator: _SlabAccumulator, start: tuple[int, int, int], probs: torch.Tensor, gaussian: torch.Tensor) -> None:
    """Add one tile; growing the buffer on CUDA can run out of memory, and then the accumulator moves
    to the CPU (an add that fails leaves it untouched, so the tile is added once)."""
    where = accumulator.sums.device
    try:
        accumulator.add(start, probs.to(where), gaussian.to(where))
    except torch.cuda.OutOfMemoryError:
        if accumulator.device.type != "cuda":
            raise
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("CUDA out of memory growing the accumulator: moving it to the CPU")
        accumulator.to(torch.device("cpu"))
        accumulator.add(start, probs.cpu(), gaussian.cpu())


def _recover_from_oom(batch_size: int, accumulator: _SlabAccumulator, image: torch.Tensor) -> tuple[int, torch.Tensor]:
    """The next batch size and where the image lives, after a CUDA out-of-memory error: halve the
    batch, then at batch 1 move the accumulator (the larger buffer), then the image to the CPU."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if batch_size > 1:
        log.warning("CUDA out of memory: retrying with tile batch %d", batch_size // 2)
        return batch_size // 2, image
    if accumulator.device.type == "cuda":
        log.warning("CUDA out of memory at batch 1: moving the accumulator to the CPU")
        accumulator.to(torch.device("cpu"))
        return 1, image
    if image.device.type == "cuda":
        log.warning("CUDA out of memory at batch 1: moving the image to the CPU")
        return 1, image.cpu()
    raise DeepSegError(
        "out of GPU memory even with one tile per batch and the accumulator and the image on the CPU",
        hint="Use --device cpu, or a model with a smaller patch size.",
    )


def _predict_batch(
    net: nn.Module,
    image: torch.Tensor,
    starts: Sequence[tuple[int, int, int]],
    patch: tuple[int, int, int],
    num_classes: int,
    config: SlidingWindowConfig,
    device: torch.device,
    use_amp: bool,
) -> torch.Tensor:
    """Probabilities (or logits, ``config.blend``) ``(B, K, *patch)`` of a batch of tiles, averaged over the passes."""
    passes = config.passes()
    tiles = torch.stack([image[:, z : z + patch[0], y : y + patch[1], x : x + patch[2]] for z, y, x in starts]).to(device)
    total = None
    for combo, gain, shift in passes:
        dims = [a + 2 for a in combo]
        inputs = torch.flip(tiles, dims) if dims else tiles
        if gain != 1.0 or shift != 0.0:
            n = config.perturbed_channels
            inputs = inputs * gain + shift if n is None else torch.cat([inputs[:, :n] * gain + shift, inputs[:, n:]], dim=1)
        with torch.autocast(device_type="cuda", dtype=torch.float16, enabled=use_amp):
            logits = net(inputs)
        probs = logits.float() if config.blend == "logits" else _probabilities(logits.float(), num_classes)
        probs = torch.flip(probs, dims) if dims else probs
        if total is None:
            # a runtime that writes every call's output into one buffer would overwrite this pass
            keep_copy = len(passes) > 1 and getattr(net, "reuses_output", False)
            total = probs.clone() if keep_copy else probs
        else:
            total.add_(probs)
    # in place: at 117 classes a batch of two 64 x 128 x 128 tiles is 1 GB per copy
    return total if len(passes) == 1 else total.div_(len(passes))


def _probabilities(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Softmax over the class axis, written into ``logits`` (a tile function's output, which nothing
    else reads: fresh, or a runtime's output buffer): at 117 classes a batch of two 64 x 128 x 128
    tiles is 1 GB per copy."""
    if num_classes == 1:
        fg = torch.sigmoid(logits)
        return torch.cat([1.0 - fg, fg], dim=1)
    if num_classes == 2:
        # softmax of two is a sigmoid of their difference: two passes over half the data instead of
        # five over all of it (3.8 instead of 9.8 ms per batch of two 96^3 tiles); each class from
        # its own sigmoid, so a probability near 0 keeps its relative precision (no 1 - p)
        background, foreground = logits[:, 0:1], logits[:, 1:2]
        foreground.sub_(background)
        torch.neg(foreground, out=background)
        foreground.sigmoid_()
        background.sigmoid_()
        return logits
    logits.sub_(logits.amax(dim=1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=1, keepdim=True))
