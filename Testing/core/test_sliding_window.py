"""Sliding window: exact blending, coverage, memory bound, progress, cancel, OOM fallback, TTA."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from deepseg_core.inference import Cancelled, SlidingWindowConfig, gaussian_importance, sliding_window_predict, tile_starts
from deepseg_core.inference.sliding_window import TILE_PLACEMENTS, count_tiles


class PointwiseNet(nn.Module):
    """A 1x1x1 conv: its output at a voxel depends only on that voxel, so any tiling must agree."""

    def __init__(self, in_ch: int = 2, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(in_ch, classes, 1)
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        return self.conv(x)


def run(net, image, classes, config, **kwargs):
    slabs = []
    out = np.zeros((max(classes, 2), *image.shape[1:]), np.float32)

    def on_slab(z0, z1, probs):
        slabs.append((z0, z1))
        out[:, z0:z1] = probs

    stats = sliding_window_predict(net, image, classes, config, on_slab, **kwargs)
    return out, slabs, stats


def direct(net, image):
    with torch.no_grad():
        return torch.softmax(net.conv(torch.from_numpy(image)[None]), 1)[0].numpy()


@pytest.mark.parametrize("placement", sorted(TILE_PLACEMENTS))
@pytest.mark.parametrize("shape", [(20, 30, 26), (5, 9, 40), (33, 17, 17)])
def test_count_tiles_is_what_a_run_counts(shape, placement):
    # a cascade's progress bar is sized from it before the second stage runs
    config = SlidingWindowConfig(patch_size_zyx=(8, 12, 12), overlap=0.5, batch_size=3, placement=placement)
    _, _, stats = run(PointwiseNet(), np.zeros((2, *shape), np.float32), 3, config)
    assert count_tiles(shape, config) == stats["tiles"] > 1


@pytest.mark.parametrize("shape", [(20, 30, 26), (5, 9, 40), (33, 17, 17)])
def test_tiled_result_equals_whole_volume_prediction(shape):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(2, *shape)).astype(np.float32)
    net = PointwiseNet()
    probs, slabs, stats = run(net, image, 3, SlidingWindowConfig(patch_size_zyx=(8, 12, 12), overlap=0.5, batch_size=3))
    np.testing.assert_allclose(probs, direct(net, image), atol=1e-5)
    # slabs cover [0, Z) once, in order
    assert slabs[0][0] == 0 and slabs[-1][1] == shape[0]
    assert all(a[1] == b[0] for a, b in zip(slabs, slabs[1:], strict=False))
    assert stats["tiles"] == sum(net.calls)
    assert stats["image_device"] == "cpu", "a CPU run leaves the image where it is"
    assert stats["host_copy"] == "not needed", "slabs computed on the CPU are handed over as they are"


@pytest.mark.parametrize("batch_size", [2, 3, 7])
def test_memory_bound_is_one_patch_deep(batch_size, monkeypatch):
    from deepseg_core.inference import sliding_window

    rng = np.random.default_rng(5)
    image = rng.normal(size=(2, 64, 20, 20)).astype(np.float32)
    net = PointwiseNet()
    config = SlidingWindowConfig(patch_size_zyx=(8, 16, 16), overlap=0.25, batch_size=batch_size)
    # 4 tiles per row of tiles, rows 6 slices apart: batches of 3 and 7 span two and three rows. A
    # small growth is allowed (6 more slices, kilobytes here) while fewer than EARLY_HANDOVER_MIN_SLICES
    # slices are finished (rows start at 0, 6, 11, 17, ...); at a batch of 7's third row 11 are, and they
    # leave first...
    assert sliding_window.EARLY_HANDOVER_MIN_SLICES in range(7, 12)
    _, _, stats = run(net, image, 3, config)
    assert stats["max_buffer_depth"] == {2: 8, 3: 14, 7: 14}[batch_size]
    # ...up to the allowance in all (6 slices of 4 channels x 20 x 20 float32 here), however many
    # rows a batch spans...
    monkeypatch.setattr(sliding_window, "MAX_BUFFER_GROWTH_BYTES", 6 * 4 * 20 * 20 * 4)
    _, _, stats = run(net, image, 3, config)
    assert stats["max_buffer_depth"] == (8 if batch_size == 2 else 14)
    # ...and a larger one not at all: the slices the first row finished leave before a tile of the
    # next row is added, so the buffer stays one patch deep
    monkeypatch.setattr(sliding_window, "MAX_BUFFER_GROWTH_BYTES", 1000)
    probs, slabs, stats = run(net, image, 3, config)
    assert stats["max_buffer_depth"] == 8
    assert len(slabs) > 5  # results leave in many slabs, not at the end
    np.testing.assert_allclose(probs, direct(net, image), atol=1e-5)


@pytest.mark.parametrize("batch_size", [3, 7])
def test_many_finished_slices_leave_before_a_tile_of_the_next_row_even_where_growing_would_be_allowed(batch_size):
    """Rows of tiles 12 slices apart (at least EARLY_HANDOVER_MIN_SLICES): the finished slices are handed over
    before a batch's first tile of the next row, so the buffer never grows, though the growth (kilobytes here)
    is far within MAX_BUFFER_GROWTH_BYTES."""
    from deepseg_core.inference import sliding_window

    rng = np.random.default_rng(6)
    image = rng.normal(size=(2, 64, 20, 20)).astype(np.float32)
    net = PointwiseNet()
    config = SlidingWindowConfig(patch_size_zyx=(16, 16, 16), overlap=0.25, batch_size=batch_size)
    assert np.diff(sliding_window.tile_starts(64, 16, 0.25)).min() >= sliding_window.EARLY_HANDOVER_MIN_SLICES
    probs, slabs, stats = run(net, image, 3, config)
    assert stats["max_buffer_depth"] == 16
    # every slice handed over once, in order
    assert slabs[0][0] == 0 and slabs[-1][1] == 64
    assert all(a[1] == b[0] for a, b in zip(slabs, slabs[1:], strict=False))
    np.testing.assert_allclose(probs, direct(net, image), atol=1e-5)


def test_finished_slices_leave_in_pieces_of_bounded_size(monkeypatch):
    from deepseg_core.inference import sliding_window

    rng = np.random.default_rng(4)
    image = rng.normal(size=(2, 30, 20, 13)).astype(np.float32)  # smaller than the patch in x: padded
    config = SlidingWindowConfig(patch_size_zyx=(8, 16, 16), overlap=0.5, batch_size=2)
    whole, whole_slabs, _ = run(PointwiseNet(), image, 3, config)
    # three slices' worth of float32 probabilities of the unpadded plane
    monkeypatch.setattr(sliding_window, "SLAB_PIECE_BYTES", 3 * 3 * 20 * 13 * 4)
    pieces, piece_slabs, _ = run(PointwiseNet(), image, 3, config)
    assert max(z1 - z0 for z0, z1 in piece_slabs) == 3 < max(z1 - z0 for z0, z1 in whole_slabs)
    assert piece_slabs[0][0] == 0 and piece_slabs[-1][1] == 30
    assert all(a[1] == b[0] for a, b in zip(piece_slabs, piece_slabs[1:], strict=False))
    np.testing.assert_array_equal(pieces, whole)


def test_volume_smaller_than_patch_is_padded_and_cropped():
    image = np.random.default_rng(1).normal(size=(2, 3, 5, 7)).astype(np.float32)
    net = PointwiseNet()
    probs, _, stats = run(net, image, 3, SlidingWindowConfig(patch_size_zyx=(8, 16, 16)))
    assert stats["tiles"] == 1
    np.testing.assert_allclose(probs, direct(net, image), atol=1e-5)


def test_single_logit_gives_two_probabilities():
    image = np.random.default_rng(2).normal(size=(2, 6, 6, 6)).astype(np.float32)
    net = PointwiseNet(classes=1)
    probs, _, _ = run(net, image, 1, SlidingWindowConfig(patch_size_zyx=(4, 4, 4)))
    with torch.no_grad():
        fg = torch.sigmoid(net.conv(torch.from_numpy(image)[None]))[0, 0].numpy()
    np.testing.assert_allclose(probs[1], fg, atol=1e-5)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_two_classes_are_blended_as_their_softmax_even_where_one_dominates(scale):
    """Two classes take a sigmoid of the logits' difference instead of the general softmax: the same
    probabilities, summing to 1, with no overflow where one logit is far larger (scale 40)."""
    image = (np.random.default_rng(3).normal(size=(2, 6, 6, 6)) * scale).astype(np.float32)
    net = PointwiseNet(classes=2)
    probs, _, _ = run(net, image, 2, SlidingWindowConfig(patch_size_zyx=(6, 6, 6)))
    with torch.no_grad():
        expected = torch.softmax(net.conv(torch.from_numpy(image)[None]).double(), 1)[0].numpy()
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs, expected, atol=1e-6)
    np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-6)


def test_the_importance_map_is_computed_once_per_map_and_patch_and_shared_read_only(monkeypatch):
    from deepseg_core.inference.sliding_window import IMPORTANCE_MAPS

    made = []

    def counted(patch, sigma_scale):
        made.append((tuple(patch), sigma_scale))
        return gaussian_importance(patch, sigma_scale)

    monkeypatch.setitem(IMPORTANCE_MAPS, "counted", counted)
    image = np.random.default_rng(4).normal(size=(2, 8, 12, 12)).astype(np.float32)
    net = PointwiseNet()
    config = SlidingWindowConfig(patch_size_zyx=(4, 8, 8), importance="counted")
    first, _, _ = run(net, image, 3, config)
    second, _, _ = run(net, image, 3, config)
    np.testing.assert_array_equal(first, second)  # the shared map was not changed by the first run
    np.testing.assert_allclose(first, direct(net, image), atol=1e-5)
    assert made == [((4, 8, 8), 0.125)]
    run(net, image, 3, SlidingWindowConfig(patch_size_zyx=(4, 6, 6), importance="counted"))
    run(net, image, 3, SlidingWindowConfig(patch_size_zyx=(4, 8, 8), importance="counted", sigma_scale=0.25))
    assert made == [((4, 8, 8), 0.125), ((4, 6, 6), 0.125), ((4, 8, 8), 0.25)]


def test_progress_reports_every_batch_with_eta():
    image = np.zeros((2, 16, 16, 16), np.float32)
    events = []
    run(
        PointwiseNet(),
        image,
        3,
        SlidingWindowConfig(patch_size_zyx=(8, 8, 8), overlap=0.0, batch_size=3),
        on_progress=lambda d, t, eta: events.append((d, t, eta)),
    )
    assert [e[0] for e in events] == [3, 6, 8]
    assert all(e[1] == 8 for e in events) and events[-1][2] == 0.0


def test_cancel_stops_within_one_batch():
    image = np.zeros((2, 32, 16, 16), np.float32)
    net = PointwiseNet()
    progress = []
    with pytest.raises(Cancelled):
        run(
            net,
            image,
            3,
            SlidingWindowConfig(patch_size_zyx=(8, 8, 8), overlap=0.0, batch_size=2),
            on_progress=lambda d, t, e: progress.append(d),
            should_cancel=lambda: len(progress) >= 1,
        )
    assert net.calls == [2]


class OutOfMemoryAboveBatchOne(PointwiseNet):
    """Test double: raises CUDA's OOM error for batches above one tile (no GPU here to exhaust)."""

    def forward(self, x):
        if x.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("simulated")
        return super().forward(x)


def test_out_of_memory_halves_the_batch_and_finishes():
    image = np.random.default_rng(3).normal(size=(2, 16, 16, 16)).astype(np.float32)
    net = OutOfMemoryAboveBatchOne()
    probs, _, stats = run(net, image, 3, SlidingWindowConfig(patch_size_zyx=(8, 8, 8), overlap=0.5, batch_size=4))
    assert stats["batch_size"] == 1
    np.testing.assert_allclose(probs, direct(net, image), atol=1e-5)


def test_out_of_memory_growing_the_buffer_moves_it_to_the_cpu_and_adds_each_tile_once(monkeypatch, caplog):
    """Test double: the accumulator is labelled as on CUDA and its first growth raises CUDA's OOM
    error (no GPU here to exhaust). The tile must land once, on the CPU, in a buffer left intact."""
    from deepseg_core.inference import sliding_window

    accumulator = sliding_window._SlabAccumulator(2, 4, (3, 3), torch.device("cpu"))
    accumulator.device = torch.device("cuda")
    grow = sliding_window._SlabAccumulator.ensure
    failures = []

    def ensure_failing_once(self, z_stop):
        if self.device.type == "cuda" and z_stop - self.z0 > self.depth:
            failures.append(z_stop)
            raise torch.cuda.OutOfMemoryError("simulated")
        grow(self, z_stop)

    monkeypatch.setattr(sliding_window._SlabAccumulator, "ensure", ensure_failing_once)
    probs, weight = torch.full((2, 4, 3, 3), 0.5), torch.full((4, 3, 3), 2.0)
    sliding_window._add_tile(accumulator, (0, 0, 0), probs, weight)  # fits: no growth
    with caplog.at_level("WARNING"):
        sliding_window._add_tile(accumulator, (2, 0, 0), probs, weight)  # needs 6 slices
    assert failures == [6] and accumulator.device.type == "cpu" and accumulator.depth == 6
    assert "CUDA out of memory growing the accumulator: moving it to the CPU" in caplog.text
    expected = torch.tensor([2.0, 2.0, 4.0, 4.0, 2.0, 2.0])  # slices 2-3 from both tiles, once each
    torch.testing.assert_close(accumulator.weights[0, :, 1, 1], expected)
    torch.testing.assert_close(accumulator.sums[1, :, 1, 1], expected * 0.5)


def test_mirror_tta_runs_every_combination_and_is_exact_for_symmetric_nets():
    image = np.random.default_rng(4).normal(size=(2, 8, 8, 8)).astype(np.float32)
    net = PointwiseNet()
    probs, _, stats = run(net, image, 3, SlidingWindowConfig(patch_size_zyx=(8, 8, 8), mirror_axes=(0, 1, 2)))
    assert len(net.calls) == 8 and stats["network_calls"] == 1
    np.testing.assert_allclose(probs, direct(net, image), atol=1e-5)


def test_tile_starts_cover_with_requested_overlap():
    for length, patch, overlap in [(192, 96, 0.25), (160, 96, 0.5), (100, 30, 0.5), (30, 30, 0.5), (10, 30, 0.5)]:
        starts = tile_starts(length, patch, overlap)
        assert starts[0] == 0 and starts[-1] == max(length - patch, 0)
        for a, b in zip(starts, starts[1:], strict=False):
            assert patch - (b - a) >= overlap * patch - 1
    assert tile_starts(192, 96, 0.25) == [0, 48, 96]


def test_gaussian_importance_map():
    g = gaussian_importance((8, 16, 16), 0.125)
    assert float(g.max()) == pytest.approx(1.0) and float(g.min()) > 0
    assert torch.allclose(g, torch.flip(g, [0, 1, 2]))
    assert float(g[4, 8, 8]) > float(g[0, 0, 0])


class _EchoNet(torch.nn.Module):
    """Logits = (input, -input): a voxel-wise net, so any tiling must give back the input exactly."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, -x], dim=1)


@pytest.mark.parametrize("pad", ["end", "center"])
@pytest.mark.parametrize("placement_importance", [("deepseg", "deepseg"), ("deepseg", "constant")])
def test_logit_blending_and_padding_place_every_voxel_back_where_it_was(pad, placement_importance):
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 5, 13, 30)).astype(np.float32)  # smaller than the patch along z and y
    placement, importance = placement_importance
    config = SlidingWindowConfig(
        patch_size_zyx=(8, 16, 16), overlap=0.5, blend="logits", pad=pad, placement=placement, importance=importance
    )
    slabs = []
    sliding_window_predict(_EchoNet(), image, 2, config, lambda z0, z1, b: slabs.append((z0, z1, b)))
    assert [s[0] for s in slabs][0] == 0 and slabs[-1][1] == 5
    assert all(b.shape[0] == 2 for _, _, b in slabs)  # logits: num_classes channels, not max(num_classes, 2)
    out = np.concatenate([b for _, _, b in slabs], axis=1)
    np.testing.assert_allclose(out[0], image[0], atol=1e-5)
    np.testing.assert_allclose(out[1], -image[0], atol=1e-5)


def test_unknown_sliding_window_rules_are_refused_with_the_known_ones():
    from deepseg_core.errors import ShapeError

    with pytest.raises(ShapeError, match="unknown sliding-window tile placement.*deepseg"):
        SlidingWindowConfig(patch_size_zyx=(8, 8, 8), placement="nnunet-v0")
    with pytest.raises(ShapeError, match="unknown sliding-window blend"):
        SlidingWindowConfig(patch_size_zyx=(8, 8, 8), blend="max")


@pytest.mark.parametrize("perturbed_channels", [None, 1])
def test_intensity_perturbations_leave_channels_past_perturbed_channels_alone(perturbed_channels):
    # a cascade's second stage reads the image (channel 0) and the first stage's one-hot labels (channel 1): only the
    # image is an intensity to perturb. The echo net returns both channels as logits, averaged over the passes.
    rng = np.random.default_rng(1)
    image = np.stack([rng.normal(size=(6, 16, 16)), (rng.random((6, 16, 16)) > 0.5)]).astype(np.float32)
    config = SlidingWindowConfig(
        patch_size_zyx=(6, 16, 16),
        blend="logits",
        intensity_perturbations=((1.5, 0.2),),
        perturbed_channels=perturbed_channels,
    )
    slabs = []
    sliding_window_predict(_EchoNet(), image, 4, config, lambda z0, z1, b: slabs.append(b))
    out = np.concatenate(slabs, axis=1)
    np.testing.assert_allclose(out[0], (image[0] + image[0] * 1.5 + 0.2) / 2, atol=1e-5)  # the plain and the perturbed pass
    expected_labels = image[1] if perturbed_channels == 1 else (image[1] + image[1] * 1.5 + 0.2) / 2
    np.testing.assert_allclose(out[1], expected_labels, atol=1e-5)
