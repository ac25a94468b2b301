"""Losses against hand-computed values and the identities that define them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from deepseg_core import metrics
from deepseg_core.errors import ConfigError, ShapeError
from deepseg_core.losses import (
    BoundaryLoss,
    DeepSupervisionLoss,
    SoftDiceLoss,
    TverskyLoss,
    build_loss,
    loss_names,
    signed_distance_map,
)


def logit(p):
    p = torch.as_tensor(p, dtype=torch.float64)
    return torch.log(p / (1 - p))


def binary_logits(probabilities):
    """Single-channel logits (B=1, C=1, N) whose sigmoid is ``probabilities``."""
    return logit(probabilities).reshape(1, 1, -1)


def labels(values):
    return torch.tensor(values, dtype=torch.long).reshape(1, -1)


def test_cross_entropy_hand_computed():
    x = torch.tensor([[[0.0, math.log(3)], [math.log(3), 0.0]]], dtype=torch.float64)  # (B=1, C=2, N=2)
    x = x.permute(0, 2, 1)
    t = labels([1, 1])  # p(class 1) = 3/4 and 1/4
    expected = (math.log(4 / 3) + math.log(4)) / 2
    assert float(build_loss("ce")(x, t)) == pytest.approx(expected, rel=1e-12)


def test_binary_ce_is_bce_with_logits():
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    t = torch.randint(0, 2, (2, 5, 5))
    expected = F.binary_cross_entropy_with_logits(x[:, 0], t.double())
    assert float(build_loss("ce")(x, t)) == pytest.approx(float(expected), rel=1e-10)


def test_weighted_ce_hand_computed():
    x = binary_logits([0.8, 0.3])  # voxel 0 target 0 (p0 = 0.2), voxel 1 target 1 (p1 = 0.3)
    t = labels([0, 1])
    expected = (1 * -math.log(0.2) + 3 * -math.log(0.3)) / (1 + 3)
    assert float(build_loss("wce", class_weights=[1, 3])(x, t)) == pytest.approx(expected, rel=1e-10)
    with pytest.raises(ConfigError, match="2 values"):
        build_loss("wce", class_weights=[1, 2, 3])(x, t)


def test_focal_hand_computed_and_gamma_zero_is_ce():
    x = binary_logits([0.9, 0.4])
    t = labels([1, 0])  # p_t = 0.9 and 0.6
    expected = (0.1**2 * -math.log(0.9) + 0.4**2 * -math.log(0.6)) / 2
    assert float(build_loss("focal", gamma=2.0)(x, t)) == pytest.approx(expected, rel=1e-10)
    alpha = (0.25 * 0.1**2 * -math.log(0.9) + 0.75 * 0.4**2 * -math.log(0.6)) / 2
    assert float(build_loss("focal", gamma=2.0, alpha=0.25)(x, t)) == pytest.approx(alpha, rel=1e-10)
    multi = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    target = torch.randint(0, 4, (2, 6, 6))
    assert float(build_loss("focal", gamma=0.0)(multi, target)) == pytest.approx(
        float(build_loss("ce")(multi, target)), rel=1e-12
    )


def test_soft_dice_hand_computed():
    x = binary_logits([0.9, 0.6, 0.2, 0.1])
    t = labels([1, 1, 0, 0])  # TP = 1.5, FP = 0.3, FN = 0.5
    loss = SoftDiceLoss(smooth=0.0)(x, t)
    assert float(loss) == pytest.approx(1 - 3.0 / 3.8, rel=1e-10)


def test_soft_dice_on_hard_masks_equals_f1():
    rng = np.random.default_rng(0)
    pred = rng.random((2, 9, 9)) > 0.6
    ref = rng.random((2, 9, 9)) > 0.5
    x = torch.where(torch.from_numpy(pred), 40.0, -40.0).double().unsqueeze(1)
    loss = SoftDiceLoss(smooth=0.0)(x, torch.from_numpy(ref).long())
    assert 1 - float(loss) == pytest.approx(metrics.dice(pred, ref), abs=1e-12)
    tp, fp, fn = (np.sum(pred & ref), np.sum(pred & ~ref), np.sum(~pred & ref))
    f1 = 2 * (tp / (tp + fp)) * (tp / (tp + fn)) / ((tp / (tp + fp)) + (tp / (tp + fn)))
    assert 1 - float(loss) == pytest.approx(f1, abs=1e-12)


def test_tversky_half_half_equals_dice():
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64)
    t = torch.randint(0, 4, (3, 7, 7))
    for reduction in ("batch", "sample"):
        dice = SoftDiceLoss(smooth=1.0, reduction=reduction)(x, t)
        tversky = TverskyLoss(alpha=0.5, beta=0.5, smooth=0.5, reduction=reduction)(x, t)
        assert float(tversky) == pytest.approx(float(dice), rel=1e-12)
    # beta > alpha punishes misses more than false alarms
    x = binary_logits([0.1, 0.1, 0.1, 0.1])
    t = labels([1, 1, 0, 0])
    assert float(TverskyLoss(alpha=0.3, beta=0.7)(x, t)) > float(TverskyLoss(alpha=0.7, beta=0.3)(x, t))


def test_dice_batch_and_sample_reduction_differ_as_computed_by_hand():
    x = torch.cat([binary_logits([0.9, 0.1]), binary_logits([0.5, 0.5])])
    t = torch.tensor([[1, 0], [0, 0]])
    # sample 0: TP .9 FP .1 FN .1 -> 1.8/2.0; sample 1: TP 0 FP 1 FN 0 -> 0/1
    sample = SoftDiceLoss(smooth=0.0, reduction="sample")(x, t)
    assert float(sample) == pytest.approx(1 - (0.9 + 0.0) / 2, rel=1e-10)
    # batch: TP .9 FP 1.1 FN .1 -> 1.8 / 3.0
    batch = SoftDiceLoss(smooth=0.0, reduction="batch")(x, t)
    assert float(batch) == pytest.approx(1 - 1.8 / 3.0, rel=1e-10)


@pytest.mark.parametrize("name", ["ce", "focal", "dice", "tversky", "boundary", "dice_ce"])
def test_ignore_label_voxels_do_not_count(name):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 10, dtype=torch.float64)
    t = torch.randint(0, 3, (1, 10))
    # a background voxel next to the ignored block, so the boundary loss sees the same region
    # edges in the cropped and the ignored version
    t[0, 5] = 0
    t_ignored = t.clone()
    t_ignored[0, 6:] = 255
    loss = build_loss(name, ignore_index=255)
    full_subset = build_loss(name)(x[..., :6], t[..., :6])
    assert float(loss(x, t_ignored)) == pytest.approx(float(full_subset), rel=1e-10)
    grad_x = x.clone().requires_grad_(True)
    loss(grad_x, t_ignored).backward()
    assert float(grad_x.grad[..., 6:].abs().sum()) == 0.0


def test_boundary_loss_hand_computed():
    t = labels([0, 0, 1, 1, 0])
    assert signed_distance_map(t[0].numpy() == 1).tolist() == [2, 1, 0, 0, 1]
    p = [0.1, 0.2, 0.9, 0.8, 0.3]
    expected = (0.1 * 2 + 0.2 * 1 + 0 + 0 + 0.3 * 1) / 5
    assert float(BoundaryLoss()(binary_logits(p), t)) == pytest.approx(expected, rel=1e-10)
    # deeper inside is negative; spacing puts distances in mm
    inside = signed_distance_map(np.array([0, 1, 1, 1, 1, 1, 0], dtype=bool))
    assert inside.tolist() == [1, 0, -1, -2, -1, 0, 1]
    assert signed_distance_map(np.array([1, 0, 0], dtype=bool), spacing_mm=[2.5]).tolist() == [0, 2.5, 5.0]
    assert signed_distance_map(np.zeros(3, dtype=bool)).tolist() == [1, 1, 1]


def test_compound_is_the_weighted_sum_and_reports_terms():
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    t = torch.randint(0, 3, (2, 6, 6))
    compound = build_loss("dice_ce", weights=(2.0, 0.5))
    expected = 2.0 * build_loss("dice")(x, t) + 0.5 * build_loss("ce")(x, t)
    assert float(compound(x, t)) == pytest.approx(float(expected), rel=1e-12)
    assert set(compound.last_terms) == {"dice", "ce"}


def test_deep_supervision_downsamples_the_target():
    base = build_loss("dice_ce")
    x = torch.randn(1, 3, 8, 8)
    t = torch.randint(0, 3, (1, 8, 8))
    wrapped = DeepSupervisionLoss(base)
    assert float(wrapped(x, t)) == pytest.approx(float(base(x, t)))
    low = torch.randn(1, 3, 4, 4)
    expected = (1.0 * base(x, t) + 0.5 * base(low, t[:, ::2, ::2])) / 1.5
    assert float(wrapped([x, low], t)) == pytest.approx(float(expected), rel=1e-6)


def test_a_dropped_output_that_overflowed_leaves_the_loss_and_the_gradients_finite():
    base = build_loss("dice_ce")
    wrapped = DeepSupervisionLoss(base, drop_lowest=True)
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    t = torch.randint(0, 3, (1, 8, 8))
    low = torch.randn(1, 3, 4, 4)
    low[0, 1, 2, 2] = float("inf")  # a float16 head overflowing, as under AMP
    low[0, 2, 0, 0] = float("nan")
    low.requires_grad_(True)
    loss = wrapped([x, low], t)
    assert float(loss) == pytest.approx(float(base(x, t)), rel=1e-6)
    loss.backward()
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
    # the dropped head still gets a gradient (DDP needs every parameter used), and it is zero
    assert low.grad is not None and float(low.grad.abs().max()) == 0.0


def foreground_gradient_share(name: str, p_fg_at_background: float, p_fg_at_lesion: float, n_background: int = 10_000) -> float:
    """|dL/dlogit| on the single foreground voxel divided by the total over all voxels."""
    x = torch.full((1, 1, n_background + 1), float(logit(p_fg_at_background)), dtype=torch.float64)
    x[0, 0, 0] = float(logit(p_fg_at_lesion))
    x.requires_grad_(True)
    t = torch.zeros(1, n_background + 1, dtype=torch.long)
    t[0, 0] = 1
    build_loss(name)(x, t).backward()
    grad = x.grad.abs()[0, 0]
    return float(grad[0] / grad.sum())


def test_foreground_gradient_is_not_drowned_at_1_to_10000(record_property):
    """One lesion voxel among 10,000 background voxels, background already well classified
    (p_fg = 0.05) and the lesion missed (p_fg = 0.05). With plain CE the background voxels together
    carry ~99.8% of the gradient; Dice and focal put a large share on the lesion voxel."""
    shares = {name: foreground_gradient_share(name, 0.05, 0.05) for name in ("ce", "dice", "focal", "tversky")}
    for name, share in shares.items():
        record_property(f"fg_gradient_share_{name}", share)
    assert shares["ce"] < 0.002
    assert shares["dice"] > 0.4
    assert shares["tversky"] > 0.4
    assert shares["focal"] > 0.2
    assert min(shares["dice"], shares["focal"]) > 100 * shares["ce"]
    # focal's advantage comes from down-weighting easy voxels: at an untrained uniform start it equals CE
    assert foreground_gradient_share("focal", 0.5, 0.5) == pytest.approx(foreground_gradient_share("ce", 0.5, 0.5))


def test_registry_errors_list_valid_names_and_options():
    with pytest.raises(ConfigError) as err:
        build_loss("dice_lovasz")
    for name in ("dice_ce", "focal", "boundary", "tversky"):
        assert name in str(err.value)
    with pytest.raises(ConfigError, match="gamma"):
        build_loss("focal", gama=2)
    with pytest.raises(ConfigError, match="a dict per term"):
        build_loss("dice_ce", focal={})
    assert "dice_ce" in loss_names()


def test_bad_targets_are_refused():
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ShapeError, match=r"values in \[0, 2\]"):
        build_loss("dice")(x, torch.full((1, 4, 4), 3))
    with pytest.raises(ShapeError, match="does not match the logits"):
        build_loss("ce")(x, torch.zeros(1, 5, 4, dtype=torch.long))
    with pytest.raises(ShapeError, match="integer"):
        build_loss("ce")(x, torch.zeros(1, 4, 4))
