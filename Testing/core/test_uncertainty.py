"""Voxel-wise uncertainty: entropy, regions, error detection, and the predictor's TTA / MC-dropout passes."""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager

import numpy as np
import pytest
import torch
import whole_array
from model_fixtures import tiny_card
from torch import nn

from deepseg_core import phantoms, uncertainty
from deepseg_core.config import to_dict
from deepseg_core.demo import DEFAULT_MODEL
from deepseg_core.errors import ConfigError
from deepseg_core.inference import Cancelled, Segmenter, SegmentOptions, predictor
from deepseg_core.inference.sliding_window import SlidingWindowConfig
from deepseg_core.io import SegmentInfo, Volume
from deepseg_core.nets import UNetConfig, build_net


def test_normalised_entropy_is_zero_for_certainty_and_one_for_uniform():
    probs = np.zeros((3, 1, 1, 3), dtype=np.float32)
    probs[:, 0, 0, 0] = (1.0, 0.0, 0.0)
    probs[:, 0, 0, 1] = 1 / 3
    probs[:, 0, 0, 2] = (0.5, 0.5, 0.0)
    h = uncertainty.normalised_entropy(probs)[0, 0]
    assert h[0] == pytest.approx(0.0, abs=1e-5)
    assert h[1] == pytest.approx(1.0, abs=1e-5)
    assert h[2] == pytest.approx(math.log(2) / math.log(3), abs=1e-5)


def test_regions_are_ranked_by_entropy_weighted_volume_and_located_in_ras():
    array = np.zeros((20, 30, 40), dtype=np.float32)
    array[2:4, 2:4, 2:4] = 0.9  # small, very uncertain
    array[10:16, 10:20, 20:30] = 0.6  # large, moderately uncertain
    array[18, 28, 38] = 0.95  # one voxel: below the minimum volume
    direction = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    grid = Volume(array, spacing_xyz_mm=(1.0, 1.0, 2.0), origin_lps=(10.0, 20.0, 30.0), direction_lps=direction)
    regions = uncertainty.uncertain_regions(grid, threshold=0.5, min_volume_mm3=3.0)
    assert [r.rank for r in regions] == [1, 2]
    big, small = regions
    assert big.voxels == 6 * 10 * 10 and small.voxels == 8
    assert big.centre_ijk == pytest.approx((24.5, 14.5, 12.5))
    lps = grid.ijk_to_lps() @ np.array([24.5, 14.5, 12.5, 1.0])
    assert big.centre_lps_mm == pytest.approx(tuple(lps[:3]))
    assert big.centre_ras_mm == pytest.approx((-lps[0], -lps[1], lps[2]))
    assert big.mean_entropy == pytest.approx(0.6) and big.score_ml == pytest.approx(600 * 2.0 * 0.6 / 1000)
    assert uncertainty.uncertain_regions(grid.with_array(np.zeros_like(array))) == []


def test_error_detection_auroc_and_top_fraction():
    rng = np.random.default_rng(0)
    errors = np.zeros(1000, dtype=bool)
    errors[:30] = True
    perfect = np.where(errors, 1.0, 0.0) + rng.uniform(0, 0.01, 1000)
    assert uncertainty.error_detection(perfect, errors)["auroc"] == pytest.approx(1.0)
    assert uncertainty.error_detection(perfect, errors)["errors_in_top"] == pytest.approx(1.0)
    assert uncertainty.error_detection(-perfect, errors)["auroc"] == pytest.approx(0.0)
    chance = uncertainty.error_detection(rng.uniform(size=1000), errors)
    assert 0.35 < chance["auroc"] < 0.65 and chance["errors_in_top"] < 0.3
    assert math.isnan(uncertainty.error_detection(perfect, np.zeros(1000, dtype=bool))["auroc"])


def test_segment_summary_counts_the_uncertain_shell():
    labels = np.zeros((10, 10, 10), dtype=np.uint8)
    labels[3:7, 3:7, 3:7] = 1
    entropy = np.zeros(labels.shape, dtype=np.float32)
    entropy[2, 3:7, 3:7] = 0.8  # just outside the segment: its boundary could move there
    entropy[0, 0, 0] = 0.9  # far away: not this segment's
    grid = Volume(labels, spacing_xyz_mm=(2.0, 2.0, 2.0))
    (summary, empty) = uncertainty.segment_uncertainty(grid, entropy, [SegmentInfo("a", 1), SegmentInfo("b", 2)])
    assert summary.uncertain_ml == pytest.approx(16 * 8 / 1000)
    assert summary.mean_entropy == pytest.approx(0.0)
    assert math.isnan(empty.mean_entropy) and empty.uncertain_ml == 0.0


def test_segment_summaries_in_boxes_are_the_whole_arrays():
    # each segment is summarised in its box and shell: the whole array's numbers, exactly, also for
    # segments cut by the array's edge and one that is absent
    rng = np.random.default_rng(8)
    labels = np.zeros((16, 28, 24), np.uint8)
    labels[0:6, 3:12, 0:9] = 1  # at the array's edge
    labels[7:14, 15:28, 10:20] = 2
    labels[rng.random(labels.shape) < 0.02] = 3  # scattered over the whole array
    entropy = rng.random(labels.shape, dtype=np.float32)
    grid = Volume(labels, (0.7, 0.9, 2.0))
    ours = uncertainty.segment_uncertainty(grid, entropy, [SegmentInfo(f"s{v}", v) for v in (1, 2, 3, 4)], threshold=0.6)
    expected = whole_array.segment_uncertainty(labels, entropy, (1, 2, 3), threshold=0.6)
    assert [(s.mean_entropy, s.uncertain_ml) for s in ours[:3]] == [(m, n * grid.voxel_volume_ml) for m, n in expected]
    assert all(n > 0 for _, n in expected)
    assert math.isnan(ours[3].mean_entropy) and ours[3].uncertain_ml == 0.0


def test_sliding_window_passes_cover_mirrors_perturbations_and_repeats():
    config = SlidingWindowConfig((8, 8, 8), mirror_axes=(0, 1, 2), intensity_perturbations=((0.9, 0.0), (1.0, 0.2)))
    passes = config.passes()
    assert len(passes) == 8 + 2 and passes[0] == ((), 1.0, 0.0) and ((0, 1, 2), 1.0, 0.0) in passes
    assert len(SlidingWindowConfig((8, 8, 8), repeats=5).passes()) == 5


def test_bundled_model_uncertainty_is_on_the_input_grid_and_points_at_errors():
    # halfway to scanner profile B: errors appear, and they should be where the model is unsure
    profile = phantoms.interpolate_profiles(phantoms.PROFILES["ct-A"], phantoms.PROFILES["ct-B"], 0.5)
    # the training field of view (about 144 mm across) on a grid the model must resample from
    case = phantoms.generate_phantom(seed=1301, profile=profile, shape_zyx=(32, 90, 90), spacing_xyz_mm=(1.6, 1.6, 2.4))
    segmenter = Segmenter.load(DEFAULT_MODEL, device="cpu")
    result = segmenter.segment([case.image], SegmentOptions(device="cpu", uncertainty="tta"))
    u = result.uncertainty
    assert u is not None and u.same_grid(case.image) and u.array_zyx.dtype == np.float32
    assert 0.0 <= float(u.array_zyx.min()) and float(u.array_zyx.max()) <= 1.0
    errors = result.labels.array_zyx != case.labels.array_zyx
    assert errors.any()
    detection = uncertainty.error_detection(u.array_zyx, errors)
    assert detection["auroc"] > 0.85  # 0.5 is chance; measured 0.95
    assert detection["errors_in_top"] > 0.5  # measured 0.87 (random ranking: 0.05)
    plain = segmenter.segment([case.image], SegmentOptions(device="cpu"))
    assert plain.uncertainty is None


def _dropout_segmenter(dropout: float) -> tuple[Segmenter, nn.Module, Volume]:
    """A tiny 3D U-Net built with ``dropout`` after every conv, its segmenter, and a phantom on its grid."""
    card, _ = tiny_card()
    config = UNetConfig(spatial_dims=3, in_channels=1, num_classes=3, features=(4, 8), dropout=dropout)
    card = dataclasses.replace(card, architecture=dataclasses.replace(card.architecture, config=to_dict(config)))
    net = build_net("unet", config, seed=0)
    # 2 x 3 x 3 tiles of the card's 8 x 16 x 16 patch
    image = phantoms.generate_phantom(seed=3, shape_zyx=(12, 32, 32), spacing_xyz_mm=(1.5, 1.5, 2.5)).image
    return Segmenter(card, net, torch.device("cpu")), net, image


MC = SegmentOptions(device="cpu", uncertainty="mc_dropout", uncertainty_passes=2, check_modality=False)


@contextmanager
def _dropout_left_off(net, enable, ref):
    """What a broken ``_mc_dropout`` would do: leave every layer in eval mode (the passes are then identical)."""
    yield


def _mc_entropy(segmenter: Segmenter, image: Volume, seed: int) -> np.ndarray:
    torch.manual_seed(seed)  # dropout masks come from torch's global generator
    return segmenter.segment([image], MC).uncertainty.array_zyx


def _dropout_part(segmenter: Segmenter, image: Volume, monkeypatch) -> tuple[np.ndarray, np.ndarray]:
    """How much the Monte-Carlo passes disagree, measured through ``segment`` alone.

    Returns (entropy with MC dropout minus the entropy of the same passes with dropout off, the
    difference between two MC runs under different seeds). Both are exactly 0 everywhere when
    the passes are identical, i.e. when the dropout layers were not switched on. (The entropy
    itself is not 0 then: it is the softmax's own entropy, which averaging identical passes keeps.)
    """
    with monkeypatch.context() as patched:
        patched.setattr(predictor, "_mc_dropout", _dropout_left_off)
        deterministic = _mc_entropy(segmenter, image, seed=0)
    first, second = _mc_entropy(segmenter, image, seed=0), _mc_entropy(segmenter, image, seed=1)
    return first - deterministic, first - second


def test_mc_dropout_needs_dropout_layers():
    segmenter, _, image = _dropout_segmenter(0.0)
    with pytest.raises(ConfigError, match="no dropout layers"):
        segmenter.segment([image], MC)


def test_mc_dropout_passes_differ_because_the_dropout_layers_are_on(monkeypatch):
    segmenter, _, image = _dropout_segmenter(0.3)
    added, between_runs = _dropout_part(segmenter, image, monkeypatch)
    assert np.abs(added).max() > 0.01 and float(added.mean()) > 0.0  # disagreeing passes raise the entropy
    assert np.abs(between_runs).max() > 0.01  # and it is random: another seed, other masks


def test_with_the_dropout_layers_left_off_the_passes_agree_exactly(monkeypatch):
    """The control: the measure above is exactly 0 everywhere when ``_mc_dropout`` switches nothing on,
    so the previous test fails if Monte-Carlo dropout ever stops switching the dropout layers on."""
    segmenter, _, image = _dropout_segmenter(0.3)
    monkeypatch.setattr(predictor, "_mc_dropout", _dropout_left_off)
    added, between_runs = _dropout_part(segmenter, image, monkeypatch)
    assert not added.any() and not between_runs.any()


def test_mc_dropout_switches_only_the_dropout_layers_and_switches_them_back():
    segmenter, net, image = _dropout_segmenter(0.3)
    dropouts = [m for m in net.modules() if isinstance(m, nn.Dropout3d)]
    others = [m for m in net.modules() if not isinstance(m, nn.Dropout3d)]
    seen: list[tuple[bool, bool]] = []
    hook = net.register_forward_pre_hook(
        lambda module, args: seen.append((all(m.training for m in dropouts), any(m.training for m in others)))
    )
    segmenter.segment([image], MC)
    hook.remove()
    assert seen and set(seen) == {(True, False)}  # during the passes: dropout on, norms and the rest in eval
    assert not any(m.training for m in net.modules())  # afterwards: all in eval again
    calls = iter([False, True])  # cancelled after the first batch of tiles
    with pytest.raises(Cancelled):
        segmenter.segment([image], MC, should_cancel=lambda: next(calls, True))
    assert not any(m.training for m in net.modules())  # also after a cancelled run
    plain = segmenter.segment([image], SegmentOptions(device="cpu", check_modality=False))
    again = segmenter.segment([image], SegmentOptions(device="cpu", check_modality=False))
    np.testing.assert_array_equal(plain.labels.array_zyx, again.labels.array_zyx)  # no stray dropout later


def test_unknown_uncertainty_method_is_refused():
    with pytest.raises(ConfigError, match="unknown uncertainty method"):
        SegmentOptions(uncertainty="ensembles")
