"""The CUDA paths, on a real GPU: segmentation against the CPU, float16 autocast, out-of-memory recovery
from the real caching allocator, training with AMP, and ``deepseg segment --device cuda``.

Skipped where torch sees no CUDA device (CI, and this project's development machine); run on a GPU
machine with ``python -m pytest Testing/core/test_cuda.py``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deepseg_core import io
from deepseg_core.datasets import Dataset
from deepseg_core.demo import DEFAULT_MODEL, SAMPLE_SPACING_XYZ_MM, SAMPLE_VOLUME
from deepseg_core.inference import Segmenter, SegmentOptions, SlidingWindowConfig, sliding_window, sliding_window_predict
from deepseg_core.model_store import ModelStore, load_network
from deepseg_core.phantoms import PHANTOM_LABELS, generate_phantom
from deepseg_core.training.engine import RetrainConfig, retrain

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

REPO = Path(__file__).resolve().parents[2]
#: far more than any GPU has: asking the caching allocator for it raises a real OutOfMemoryError
IMPOSSIBLE_BYTES = 1 << 46


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean())


@pytest.fixture(scope="module")
def cpu_labels() -> np.ndarray:
    segmenter = Segmenter.load(DEFAULT_MODEL, device="cpu")
    result = segmenter.segment([io.read_image(SAMPLE_VOLUME)], SegmentOptions(device="cpu", backend="torch"))
    return result.labels.array_zyx


def test_bundled_model_on_cuda_agrees_with_cpu(cpu_labels):
    segmenter = Segmenter.load(DEFAULT_MODEL, device="cuda")
    volume = io.read_image(SAMPLE_VOLUME)
    options = SegmentOptions(device="cuda")
    assert segmenter.window_config(options).amp, "CUDA runs float16 autocast by default"
    result = segmenter.segment([volume], options)
    assert result.backend == "torch" and result.precision == "float16"
    assert result.labels.same_grid(volume, tolerance_mm=1e-9)
    # float16 autocast differs from the CPU's float32 only at near-ties
    assert agreement(result.labels.array_zyx, cpu_labels) >= 0.999
    # asking for bfloat16 on CUDA keeps float16 autocast, and says so
    assert segmenter.precision_note(SegmentOptions(device="cuda", precision="bfloat16")) == "CUDA runs float16 autocast"


def test_tta_uncertainty_and_probabilities_on_cuda_agree_with_cpu():
    """What ``deepseg segment --tta --uncertainty U --probabilities P`` computes: mirrored passes,
    their entropy and the kept probabilities, on CUDA (float16 autocast) against the CPU's float32."""
    volume = io.read_image(SAMPLE_VOLUME)
    asked = {"tta": True, "uncertainty": "tta", "keep_probabilities": True}
    cpu = Segmenter.load(DEFAULT_MODEL, device="cpu").segment([volume], SegmentOptions(device="cpu", backend="torch", **asked))
    cuda = Segmenter.load(DEFAULT_MODEL, device="cuda").segment([volume], SegmentOptions(device="cuda", **asked))
    assert cuda.precision == "float16" and cuda.probabilities is not None and cuda.uncertainty is not None
    assert cpu.probabilities is not None and cpu.uncertainty is not None
    assert agreement(cuda.labels.array_zyx, cpu.labels.array_zyx) >= 0.999
    # float16 autocast moves probabilities by about 1e-3 (the kept probabilities are float16 too)
    difference = np.abs(cuda.probabilities.astype(np.float32) - cpu.probabilities.astype(np.float32))
    assert difference.max() <= 5e-3, difference.max()
    assert np.abs(cuda.uncertainty.array_zyx - cpu.uncertainty.array_zyx).max() <= 5e-3
    assert cuda.uncertainty.array_zyx.max() > 0.1, "some voxels are uncertain, so the check compares something"


class Pointwise(nn.Module):
    """A 1x1x1 conv, so every tiling gives the same probabilities; ``fail`` decides when a forward
    first asks the real CUDA allocator for more memory than the GPU has."""

    def __init__(self, fail) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv3d(1, 3, 1)
        self.fail = fail
        self.calls: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(x.shape[0])
        if self.fail(x, len(self.calls)):
            torch.empty(IMPOSSIBLE_BYTES, dtype=torch.uint8, device=x.device)
        return self.conv(x)


@pytest.fixture
def exact_float32(monkeypatch):
    """cuDNN computes float32 convolutions in TF32 by default; these tests compare with the CPU to 1e-5."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def _run(net: nn.Module, image: np.ndarray, batch: int) -> tuple[np.ndarray, dict]:
    out = np.zeros((3, *image.shape[1:]), np.float32)

    def on_slab(z0, z1, probs):
        out[:, z0:z1] = probs

    config = SlidingWindowConfig(patch_size_zyx=(16, 16, 16), overlap=0.5, batch_size=batch, amp=False)
    stats = sliding_window_predict(net, image, 3, config, on_slab, device="cuda")
    return out, stats


def _direct(net: nn.Module, image: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(net.conv(torch.from_numpy(image)[None]), 1)[0].numpy()


def test_real_out_of_memory_halves_the_batch(caplog, exact_float32):
    image = np.random.default_rng(0).normal(size=(1, 32, 40, 40)).astype(np.float32)
    net = Pointwise(lambda x, call: x.shape[0] > 1).cuda()
    with caplog.at_level(logging.WARNING):
        probs, stats = _run(net, image, batch=4)
    assert net.calls[:3] == [4, 2, 1] and stats["batch_size"] == 1
    assert "retrying with tile batch 2" in caplog.text
    np.testing.assert_allclose(probs, _direct(net.cpu(), image), atol=1e-5)


def test_real_out_of_memory_at_batch_one_moves_the_accumulator_to_the_cpu(caplog, exact_float32):
    image = np.random.default_rng(1).normal(size=(1, 24, 32, 32)).astype(np.float32)
    net = Pointwise(lambda x, call: call == 1).cuda()
    with caplog.at_level(logging.WARNING):
        probs, stats = _run(net, image, batch=1)
    assert "moving the accumulator to the CPU" in caplog.text
    assert stats["tiles"] == len(net.calls) - 1
    np.testing.assert_allclose(probs, _direct(net.cpu(), image), atol=1e-5)


def test_tiles_are_cut_from_the_image_in_gpu_memory(exact_float32):
    image = np.random.default_rng(2).normal(size=(1, 24, 40, 40)).astype(np.float32)
    net = Pointwise(lambda x, call: False).cuda()
    probs, stats = _run(net, image, batch=2)
    assert stats["image_device"].startswith("cuda")
    np.testing.assert_allclose(probs, _direct(net.cpu(), image), atol=1e-5)


def _kept_slabs(net: nn.Module, image: np.ndarray) -> tuple[np.ndarray, dict]:
    """Probabilities assembled after the run from the slabs as handed over, each kept by reference."""
    kept: list = []
    config = SlidingWindowConfig(patch_size_zyx=(16, 16, 16), overlap=0.5, batch_size=2, amp=False)
    stats = sliding_window_predict(net, image, 3, config, lambda z0, z1, probs: kept.append((z0, z1, probs)), device="cuda")
    out = np.zeros((3, *image.shape[1:]), np.float32)
    for z0, z1, probs in kept:
        out[:, z0:z1] = probs
    return out, stats


def test_slabs_reach_host_memory_through_one_pinned_buffer_and_stay_valid(monkeypatch, exact_float32):
    # pieces of 3 slices: the one staging buffer is refilled 12 times while every earlier slab is kept
    monkeypatch.setattr(sliding_window, "SLAB_PIECE_BYTES", 3 * 3 * 40 * 40 * 4)
    image = np.random.default_rng(4).normal(size=(1, 36, 40, 40)).astype(np.float32)
    net = Pointwise(lambda x, call: False).cuda()
    probs, stats = _kept_slabs(net, image)
    assert stats["host_copy"] == "pinned"
    np.testing.assert_allclose(probs, _direct(net.cpu(), image), atol=1e-5)


def test_without_page_locked_memory_slabs_are_copied_to_pageable_memory(monkeypatch, caplog, exact_float32):
    real_empty = torch.empty

    def empty_without_pinning(*args, pin_memory=False, **kwargs):
        if pin_memory:
            raise RuntimeError("cudaHostAlloc refused (simulated)")
        return real_empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", empty_without_pinning)
    image = np.random.default_rng(5).normal(size=(1, 24, 40, 40)).astype(np.float32)
    net = Pointwise(lambda x, call: False).cuda()
    with caplog.at_level(logging.WARNING):
        probs, stats = _kept_slabs(net, image)
    assert stats["host_copy"] == "pageable" and "no page-locked host memory" in caplog.text
    np.testing.assert_allclose(probs, _direct(net.cpu(), image), atol=1e-5)


def test_out_of_memory_after_the_accumulator_moved_moves_the_image_too(caplog, exact_float32):
    image = np.random.default_rng(3).normal(size=(1, 24, 32, 32)).astype(np.float32)
    net = Pointwise(lambda x, call: call <= 2).cuda()
    with caplog.at_level(logging.WARNING):
        probs, stats = _run(net, image, batch=1)
    assert "moving the accumulator to the CPU" in caplog.text and "moving the image to the CPU" in caplog.text
    assert stats["image_device"] == "cpu" and stats["tiles"] == len(net.calls) - 2
    np.testing.assert_allclose(probs, _direct(net.cpu(), image), atol=1e-5)


def test_fine_tuning_on_cuda_with_amp(tmp_path):
    root = tmp_path / "siteB"
    dataset = Dataset.create(root, "siteB", PHANTOM_LABELS, ("CT",))
    for seed in range(3):
        p = generate_phantom(seed=700 + seed, profile="ct-B", shape_zyx=(32, 64, 64), spacing_xyz_mm=SAMPLE_SPACING_XYZ_MM)
        dataset.add_case(f"b{seed}", [p.image], p.labels.array_zyx.astype(np.uint8))
    store = ModelStore(tmp_path / "store")
    events: list[dict] = []
    outcome = retrain(
        root,
        "phantom-liver",
        RetrainConfig(epochs=2, steps_per_epoch=4, batch_size=2, learning_rate=1e-3, seed=5),
        tmp_path / "ckpt",
        base=DEFAULT_MODEL,
        store=store,
        device="cuda",
        on_event=events.append,
        activate=False,
    )
    losses = [e["loss"] for e in events if e["event"] == "epoch_end"]
    assert len(losses) == 2 and all(np.isfinite(losses))
    parent = load_network(store.folder("phantom-liver:1"))[1].state_dict()
    _, child = load_network(store.folder(outcome.card.ref))
    changed = [name for name, weight in child.state_dict().items() if not torch.equal(weight, parent[name])]
    assert changed, "training on CUDA changed no weight"
    assert all(torch.isfinite(w).all() for w in child.state_dict().values() if w.is_floating_point())
    assert set(outcome.validation["mean"]) == {"liver", "liver lesion"}


def test_cli_segment_on_cuda_reports_device_and_precision(tmp_path):
    out = tmp_path / "sample.seg.nrrd"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "deepseg_core",
            "segment",
            str(SAMPLE_VOLUME),
            "--model",
            str(DEFAULT_MODEL),
            "--output",
            str(out),
            "--device",
            "cuda",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=REPO / "DeepSeg",
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    events = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert next(e for e in events if e["event"] == "start")["device"].startswith("cuda")
    case = next(e for e in events if e["event"] == "case_done")
    assert case["precision"] == "float16" and case["backend"] == "torch"
    assert {s["name"] for s in case["segments"]} == {"liver", "liver lesion"}
    assert io.read_segmentation(out).grid.same_grid(io.read_image(SAMPLE_VOLUME))
