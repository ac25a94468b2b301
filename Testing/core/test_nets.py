"""Contract tests of the U-Net family, parametrised over 2D, 2.5D and 3D."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepseg_core.config import from_dict, to_dict
from deepseg_core.errors import ConfigError, ShapeError
from deepseg_core.nets import UNetConfig, build_net, count_parameters, unet_config
from deepseg_core.preprocessing import stack_neighbour_slices

ARCHS = ("2d", "2.5d", "3d")
# sizes deliberately not multiples of the downsampling factor 8
ODD_SIZES = {"2d": (37, 45), "2.5d": (37, 45), "3d": (13, 22, 19)}
EVEN_SIZES = {"2d": (32, 48), "2.5d": (32, 48), "3d": (16, 24, 16)}


def small(arch: str, **kwargs) -> UNetConfig:
    kwargs.setdefault("features", (8, 16, 32, 32))
    return unet_config(arch, in_channels=2, num_classes=3, context_slices=3, **kwargs)


@pytest.mark.parametrize("arch", ARCHS)
def test_output_shape_matches_input(arch):
    cfg = small(arch)
    net = build_net("unet", cfg, seed=0).eval()
    x = torch.randn(2, cfg.network_in_channels, *EVEN_SIZES[arch])
    assert net(x).shape == (2, 3, *EVEN_SIZES[arch])


def test_2p5d_takes_modalities_times_slices():
    cfg = small("2.5d")
    assert cfg.kind == "2.5d" and cfg.network_in_channels == 2 * 3
    net = build_net("unet", cfg, seed=0).eval()
    with pytest.raises(ShapeError, match=r"\(batch, 6, size, size\)"):
        net(torch.randn(1, 2, 32, 32))


@pytest.mark.parametrize("arch", ARCHS)
def test_backward_reaches_every_parameter(arch):
    cfg = small(arch)
    net = build_net("unet", cfg, seed=0).train()
    out = net(torch.randn(2, cfg.network_in_channels, *EVEN_SIZES[arch]))
    out.square().mean().backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert any(float(p.grad.abs().sum()) > 0 for p in net.parameters())


@pytest.mark.parametrize("arch", ARCHS)
def test_odd_sizes_are_padded_and_cropped_back(arch):
    cfg = small(arch)
    net = build_net("unet", cfg, seed=0).eval()
    x = torch.randn(1, cfg.network_in_channels, *ODD_SIZES[arch])
    assert net(x).shape == (1, 3, *ODD_SIZES[arch])


@pytest.mark.parametrize("arch", ARCHS)
def test_odd_sizes_refused_with_a_clear_message(arch):
    cfg = small(arch, size_policy="refuse")
    net = build_net("unet", cfg, seed=0).eval()
    x = torch.randn(1, cfg.network_in_channels, *ODD_SIZES[arch])
    with pytest.raises(ShapeError, match="multiple of the network's downsampling factor") as err:
        net(x)
    assert "(8, 8" in str(err.value) and "size_policy='pad'" in str(err.value)


@pytest.mark.parametrize("arch", ARCHS)
def test_deterministic_under_a_seed(arch):
    cfg = small(arch, dropout=0.0)
    a, b, c = (build_net("unet", cfg, seed=s).eval() for s in (7, 7, 8))
    x = torch.randn(1, cfg.network_in_channels, *EVEN_SIZES[arch])
    assert torch.equal(a(x), b(x))
    assert not torch.equal(a(x), c(x))
    # a seeded build leaves the global random state alone
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    build_net("unet", cfg, seed=7)
    assert torch.equal(torch.rand(1), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_count_reported(arch, record_property):
    cfg = small(arch)
    net = build_net("unet", cfg, seed=0)
    n = count_parameters(net)
    record_property(f"params_{arch}", n)
    assert n == sum(p.numel() for p in net.parameters())
    # first conv weight: features[0] x (modalities * k) x kernel^dims, no bias under a norm
    first = next(net.parameters())
    assert first.shape[:2] == (8, cfg.network_in_channels)


def test_parameter_count_by_hand_for_a_one_level_net():
    cfg = UNetConfig(spatial_dims=2, in_channels=1, num_classes=2, features=(4,), convs_per_level=1, norm="none")
    net = build_net("unet", cfg)
    # conv 3x3 1->4 with bias (36 + 4) and head 1x1 4->2 with bias (8 + 2)
    assert count_parameters(net) == 40 + 10


@pytest.mark.parametrize("arch", ARCHS)
def test_deep_supervision_outputs_in_training_only(arch):
    cfg = small(arch, deep_supervision=True)
    net = build_net("unet", cfg, seed=0)
    x = torch.randn(1, cfg.network_in_channels, *ODD_SIZES[arch])
    outs = net.train()(x)
    assert isinstance(outs, list) and len(outs) == 3
    assert outs[0].shape[2:] == x.shape[2:]
    assert outs[1].shape[2:] == tuple(-(-s // 2) for s in x.shape[2:])
    assert outs[2].shape[2:] == tuple(-(-s // 4) for s in x.shape[2:])
    assert isinstance(net.eval()(x), torch.Tensor)


@pytest.mark.parametrize("norm,activation,downsampling", [("batch", "relu", "maxpool"), ("none", "gelu", "conv")])
def test_norm_activation_downsampling_variants(norm, activation, downsampling):
    cfg = small("3d", norm=norm, activation=activation, downsampling=downsampling, dropout=0.1)
    net = build_net("unet", cfg, seed=0).train()
    out = net(torch.randn(2, cfg.network_in_channels, 8, 16, 16))
    assert out.shape == (2, 3, 8, 16, 16)


def test_anisotropic_strides_change_the_divisor():
    cfg = UNetConfig(spatial_dims=3, features=(4, 8, 8), strides=((1, 2, 2), (2, 2, 2)), size_policy="refuse")
    assert cfg.size_divisor == (2, 4, 4)
    net = build_net("unet", cfg, seed=0).eval()
    assert net(torch.randn(1, 1, 6, 12, 8)).shape == (1, 2, 6, 12, 8)


def test_config_round_trips_through_json_and_rejects_typos():
    cfg = small("3d", strides=((1, 2, 2), (2, 2, 2), (2, 2, 2)))
    assert from_dict(UNetConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError, match="unknown UNetConfig field"):
        from_dict(UNetConfig, {**to_dict(cfg), "feature": [1]})


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"spatial_dims": 4}, "spatial_dims"),
        ({"context_slices": 2, "spatial_dims": 2}, "odd"),
        ({"context_slices": 3, "spatial_dims": 3}, "2.5D needs spatial_dims=2"),
        ({"norm": "group"}, "instance"),
        ({"strides": ((2, 2),)}, "strides"),
    ],
)
def test_invalid_configs_are_refused(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        UNetConfig(**kwargs)


def test_unknown_net_lists_valid_names():
    with pytest.raises(ConfigError, match=r"unknown network architecture 'vnet'.*one of \[.*'unet'.*\]"):
        build_net("vnet", {})


def test_stack_neighbour_slices_layout():
    volume = np.arange(2 * 4 * 1 * 1, dtype=np.float32).reshape(2, 4, 1, 1)  # (C=2, Z=4)
    stacked = stack_neighbour_slices(volume, 3)
    assert stacked.shape == (4, 6, 1, 1)
    # z = 0: offsets -1 (clamped to 0), 0, +1; channel j*C + c
    assert stacked[0, :, 0, 0].tolist() == [0, 4, 0, 4, 1, 5]
    assert stacked[3, :, 0, 0].tolist() == [2, 6, 3, 7, 3, 7]
