"""Segmentation pipelines: slab-by-slab resampling back to the input grid, ensembles, the registry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixtures import tiny_card

from deepseg_core.errors import ConfigError
from deepseg_core.inference import pipelines
from deepseg_core.inference.pipelines import (
    StreamingGridCollector,
    first_argmax,
    linear_axes,
    pipeline_for,
    resample_linear,
)
from deepseg_core.io import Volume
from deepseg_core.model_store import load_network, write_model_folder
from deepseg_core.nets import LogitEnsemble, build_net
from deepseg_core.preprocessing import resample_to_spacing
from deepseg_core.uncertainty import normalised_entropy


def oblique_reference() -> Volume:
    angle = np.deg2rad(25)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    return Volume(np.zeros((23, 29, 31), np.int16), (0.8, 0.9, 2.7), (-5.0, 12.0, 40.0), tuple(direction.ravel()))


def step_bytes_for_groups_of_two_or_three(model_grid: Volume, reference: Volume) -> int:
    """A byte budget for steps of one input slice that puts 2 or 3 classes in a group: a one-slice step
    interpolates 1 or 2 model slices, float32, after x, after y and after z."""
    (_, height, width), (_, model_height, model_width) = reference.shape_zyx, model_grid.shape_zyx
    per_model_slice = model_height * model_width + model_height * width + height * width
    return 2 * 4 * (2 * per_model_slice + height * width)


@pytest.mark.parametrize("step", ["default", "one class at a time", "two or three classes at a time"])
@pytest.mark.parametrize("target_spacing", [(1.5, 1.5, 1.5), (0.8, 0.9, 1.0), (1.1, 1.3, 4.2)])
def test_streaming_back_to_the_input_grid_equals_resampling_the_whole_volume(target_spacing, step, monkeypatch):
    reference = oblique_reference()
    model_grid = resample_to_spacing(reference, target_spacing)
    if step == "one class at a time":
        monkeypatch.setattr(pipelines, "RESAMPLE_CHUNK_BYTES", 1)
        monkeypatch.setattr(pipelines, "RESAMPLE_CHUNK_SLICES", 3)
    elif step == "two or three classes at a time":
        monkeypatch.setattr(pipelines, "RESAMPLE_CHUNK_BYTES", step_bytes_for_groups_of_two_or_three(model_grid, reference))
        monkeypatch.setattr(pipelines, "RESAMPLE_CHUNK_SLICES", 1)
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(5, *model_grid.shape_zyx)).astype(np.float32)
    # class 3 ties with class 1 in half the volume: the earlier class must keep those voxels, also when
    # the two are resampled in different groups
    logits[3, : model_grid.shape_zyx[0] // 2] = logits[1, : model_grid.shape_zyx[0] // 2] + 2.0
    logits[1, : model_grid.shape_zyx[0] // 2] += 2.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=0, keepdims=True)
    collector = StreamingGridCollector(model_grid, reference, 5, keep_probabilities=True, uncertainty=True)
    z = 0
    for depth in (3, 1, 4, 2) * 20:  # uneven slabs, as the sliding window emits them
        if z >= model_grid.shape_zyx[0]:
            break
        stop = min(z + depth, model_grid.shape_zyx[0])
        collector.add(z, stop, probs[:, z:stop])
        z = stop
    out = collector.finish()
    # the whole-volume way: every class probability (float16, as kept) resampled by SimpleITK, then argmax
    whole = np.stack([sitk_linear(p.astype(np.float16).astype(np.float32), model_grid, reference) for p in probs])
    np.testing.assert_array_equal(out.labels_zyx, np.argmax(whole, axis=0))
    np.testing.assert_allclose(out.probabilities.astype(np.float32), whole, atol=1e-3)
    entropy = sitk_linear(normalised_entropy(probs), model_grid, reference)
    np.testing.assert_allclose(out.entropy_zyx, np.clip(entropy, 0, 1), atol=1e-5)
    assert collector.max_buffered_slices <= 4 + 2 * StreamingGridCollector.MARGIN + 4


def sitk_linear(values_zyx: np.ndarray, source: Volume, reference: Volume, *, edge: int = 2) -> np.ndarray:
    """What SimpleITK itself gives: ``sitk.Resample`` with ``sitkLinear``, float32, from ``source`` with
    ``edge`` copies of its outermost voxels added on every side (``ZeroFluxNeumannPad``), so that voxels
    past its last ones take its edge values; NaN where even those do not reach (default 0 without them)."""
    import SimpleITK as sitk

    image = source.with_array(values_zyx.astype(np.float32)).to_sitk()
    if edge:
        image = sitk.ZeroFluxNeumannPad(image, [edge] * 3, [edge] * 3)
    default = float("nan") if edge else 0.0
    resampled = sitk.Resample(image, reference.to_sitk(), sitk.Transform(), sitk.sitkLinear, default, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(resampled)


# (input shape zyx, input spacing xyz, model spacing xyz, model origin shift in model voxels xyz, oblique)
RESAMPLING_GEOMETRIES = [
    ((23, 29, 31), (0.8, 0.9, 2.7), (1.5, 1.5, 1.5), (0.0, 0.0, 0.0), True),
    ((20, 26, 24), (0.75, 0.75, 0.75), (1.5, 1.5, 1.5), (0.0, 0.0, 0.0), False),  # the last voxels on the grid's edge
    ((30, 17, 19), (0.7, 0.7, 0.5), (1.4, 1.4, 1.0), (0.0, 0.0, 0.0), True),  # the same edge, spacings not exact in binary
    ((12, 40, 36), (1.2, 1.1, 3.0), (0.8, 0.7, 1.0), (0.0, 0.0, 0.0), False),  # a finer model grid
    ((16, 21, 25), (0.9, 1.3, 1.7), (1.1, 0.6, 2.3), (0.3, -0.7, 1.6), True),  # shifted: voxels outside on both sides
]


@pytest.mark.parametrize("geometry", RESAMPLING_GEOMETRIES)
def test_separable_resampling_is_simpleitks_linear_resampling(geometry):
    """The torch resampling the collector runs (every class at once, separable) against SimpleITK's own,
    class by class, from the model grid with its edge repeated: the same values to float32 rounding,
    also where plain SimpleITK gives 0 (input voxels past the model grid's last ones)."""
    shape, input_spacing, model_spacing, shift, oblique = geometry
    angle = np.deg2rad(25 if oblique else 0)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    reference = Volume(np.zeros(shape, np.int16), input_spacing, (-5.0, 12.0, 40.0), tuple(direction.ravel()))
    model_grid = resample_to_spacing(reference, model_spacing)
    origin = np.asarray(model_grid.origin_lps) + direction @ (np.asarray(shift) * np.asarray(model_spacing))
    model_grid = Volume(np.zeros(model_grid.shape_zyx, np.float32), model_spacing, tuple(origin), tuple(direction.ravel()))
    values = np.random.default_rng(7).random((3, *model_grid.shape_zyx)).astype(np.float32)
    ours = resample_linear(torch.from_numpy(values), linear_axes(model_grid, reference)).numpy()
    theirs = np.stack([sitk_linear(v, model_grid, reference) for v in values])
    assert not np.isnan(theirs).any(), "two repeated edge voxels must reach every input voxel"
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=5e-7)  # float32 rounding: 1.2e-7 seen
    plain = sitk_linear(values[0], model_grid, reference, edge=0)
    past_the_edge = plain == 0.0  # the random values are never 0 where ITK interpolates
    np.testing.assert_allclose(ours[0][~past_the_edge], plain[~past_the_edge], rtol=0, atol=5e-7)
    if geometry is RESAMPLING_GEOMETRIES[1]:
        # the last slice lies on the model grid's edge, which ITK counts as outside: it was background
        assert past_the_edge[-1].all() and (ours[:, -1] > 0).all()


@pytest.mark.parametrize(
    "shape, input_spacing, model_spacing",
    [
        ((101, 9, 8), (1.0, 1.0, 1.0), (1.0, 1.0, 2.0)),  # 50.5 model slices, rounded to 50: slice 99 on the edge, 100 past
        ((100, 9, 8), (1.0, 1.0, 1.0), (1.0, 1.0, 2.0)),  # exactly on the model grid's edge (ITK: outside)
        ((30, 11, 512), (0.8, 1.0, 0.625), (1.5, 1.0, 1.5)),  # 512 columns of 0.8 mm at 1.5: the last 0.05 mm past
    ],
)
def test_an_organ_through_the_last_input_slice_is_labelled_there_too(shape, input_spacing, model_spacing):
    """An organ that runs through the volume's end (a volume cropped to it, a thin-slice CT) must not lose
    the input voxels the model grid's rounded extent leaves out: they take the nearest model voxels'
    probabilities and entropy, not background with an entropy of 0 (certain)."""
    reference = Volume(np.zeros(shape, np.int16), input_spacing, (10.0, -4.0, 7.5))
    model_grid = resample_to_spacing(reference, model_spacing)
    model_shape = model_grid.shape_zyx
    assert (model_shape[0] - 0.5) * model_spacing[2] <= (shape[0] - 1) * input_spacing[2] or (
        (model_shape[2] - 0.5) * model_spacing[0] < (shape[2] - 1) * input_spacing[0]
    ), "the case must have input voxels past the model grid"
    probs = np.empty((3, *model_shape), np.float32)
    probs[0], probs[1], probs[2] = 0.1, 0.7, 0.2  # the organ (class 1) everywhere, the last model voxels included
    collector = StreamingGridCollector(model_grid, reference, 3, keep_probabilities=True, uncertainty=True)
    for z in range(0, model_shape[0], 7):
        collector.add(z, min(z + 7, model_shape[0]), probs[:, z : z + 7])
    out = collector.finish()
    assert (out.labels_zyx == 1).all()
    np.testing.assert_allclose(out.probabilities.astype(np.float32).sum(0), 1.0, atol=2e-3)
    expected_entropy = float(normalised_entropy(probs[:, :1, :1, :1]).ravel()[0])
    np.testing.assert_allclose(out.entropy_zyx, expected_entropy, atol=1e-5)


def test_a_model_grid_that_does_not_start_at_the_input_is_refused():
    reference = oblique_reference()
    model_grid = resample_to_spacing(reference, (1.5, 1.5, 1.5))
    shifted = Volume(model_grid.array_zyx, model_grid.spacing_xyz_mm, (0.0, 0.0, 0.0), tuple(model_grid.direction_lps.ravel()))
    with pytest.raises(ConfigError, match="must start at the input's first voxel"):
        StreamingGridCollector(shifted, reference, 3, keep_probabilities=False, uncertainty=False)


def test_ensemble_weights_round_trip_and_average_their_members_logits(tmp_path):
    card, _ = tiny_card()
    members = {
        name: build_net(card.architecture.name, card.architecture.config, seed=seed)
        for seed, name in enumerate(("fold_0", "fold_1"))
    }
    ensemble = LogitEnsemble(members)
    written = write_model_folder(tmp_path / "m", card.__class__(**{**card.__dict__, "ensemble": ("fold_0", "fold_1")}), ensemble)
    assert written.ensemble == ("fold_0", "fold_1")
    _, loaded = load_network(tmp_path / "m")
    x = torch.randn(2, 1, *card.inference.patch_size_zyx)
    with torch.no_grad():
        expected = (members["fold_0"].eval()(x) + members["fold_1"].eval()(x)) / 2
        torch.testing.assert_close(loaded(x), expected)


def test_an_unknown_pipeline_names_the_known_ones():
    card, _ = tiny_card()
    with pytest.raises(ConfigError, match="unknown segmentation pipeline 'nnunetv9'.*deepseg"):
        pipeline_for(card.__class__(**{**card.__dict__, "pipeline": {"name": "nnunetv9"}}), 3, 1)


@pytest.mark.parametrize("axis", [0, 1, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int16])
@pytest.mark.parametrize("count", [1, 3, 64, 65, 300])
@pytest.mark.parametrize("in_turn", [True, False], ids=["planes-in-turn", "axis-moved-last"])
def test_first_argmax_is_numpys_argmax_ties_nans_and_infinities_included(axis, dtype, count, in_turn, monkeypatch):
    # few distinct values, so most positions hold ties, which must go to the first maximum; a NaN is a
    # maximum (the first NaN wins), as in numpy and torch. Planes as large as RUNNING_ARGMAX_MIN_PLANE are
    # compared in turn, smaller arrays move the axis last: both ways must agree with numpy (the threshold is
    # set here so that these small arrays take each way).
    monkeypatch.setattr(pipelines, "RUNNING_ARGMAX_MIN_PLANE", 1 if in_turn else 10**9)
    rng = np.random.default_rng(axis + count)
    shape = [3, 5, 6, 4]
    shape[axis] = count
    scores = rng.integers(-1, 2, size=shape).astype(dtype)
    if dtype != np.int16:
        scores[rng.random(shape) < 0.05] = np.nan
        scores[rng.random(shape) < 0.05] = np.inf
        scores[rng.random(shape) < 0.05] = -np.inf
        scores[rng.random(shape) < 0.1] = -0.0
    # with NaNs, a comparison in turn hands over to the argmax; without, it decides every position itself
    without_nans = np.nan_to_num(scores, nan=1.0, posinf=np.inf, neginf=-np.inf)
    for values in (scores, without_nans):
        expected = np.argmax(values, axis=axis)
        # numpy, torch, and a non-contiguous view with the axis last
        for given, along in ((values, axis), (torch.from_numpy(values), axis), (np.moveaxis(values, axis, -1), 3)):
            found = first_argmax(given, along)
            assert found.dtype == (np.uint8 if count <= 256 else np.int64)
            np.testing.assert_array_equal(found, expected)


@pytest.mark.parametrize(
    "shape, new_shape, order",
    [
        ((30, 41, 27), (19, 60, 33), 3),  # down along z, up in-plane
        ((5, 7, 9), (3, 2, 11), 3),  # fewer output rows than threads
        ((40, 30), (13, 77), 3),  # 2D (a separate axis's slices)
        ((20, 21, 22), (31, 9, 22), 1),  # labels' order: no prefilter
        ((20, 21, 22), (31, 9, 22), 0),
        ((12, 10, 11), (17, 6, 9), 5),
        ((1, 9, 9), (1, 5, 5), 3),  # one slice: a single slab
        ((2, 9, 9), (0, 5, 5), 3),  # an axis rounded to nothing: an empty result, as scipy gives
    ],
)
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_the_threaded_spline_zoom_is_scipys_bit_for_bit(shape, new_shape, order, threads):
    from scipy import ndimage

    from deepseg_core.pipelines.nnunet import resampling

    assert resampling._split_zoom_matches_scipy(), "this scipy's zoom kernel is not used: resampling would run on one thread"
    rng = np.random.default_rng(3)
    for data in (
        rng.normal(size=shape).astype(np.float32),
        np.asarray(rng.normal(size=shape[::-1]).astype(np.float32)).T,  # a non-contiguous view, as the transpose gives
        (rng.random(shape) * 2000 - 1000).astype(np.int16),
    ):
        before = data.copy()
        zoom = [n / s for n, s in zip(new_shape, shape, strict=True)]
        expected = ndimage.zoom(data.astype(np.float64), zoom, order=order, mode="nearest", grid_mode=True)
        np.clip(expected, data.min(), data.max(), out=expected)
        ours = resampling.resize_array(data, new_shape, order, threads=threads)
        assert ours.dtype == np.float64
        np.testing.assert_array_equal(ours, expected)
        np.testing.assert_array_equal(data, before)


def test_a_scipy_whose_zoom_kernel_changed_falls_back_to_scipys_zoom(monkeypatch, caplog):
    from scipy.ndimage import _nd_image

    from deepseg_core.pipelines.nnunet import resampling

    def changed_signature(*args):
        raise TypeError(f"zoom_shift() takes 10 arguments ({len(args)} given)")

    with monkeypatch.context() as patched:
        patched.setattr(_nd_image, "zoom_shift", changed_signature)
        assert resampling._check_split_zoom.__wrapped__() is False
    assert "resampling on one thread" in caplog.text
    monkeypatch.setattr(resampling, "_split_zoom_matches_scipy", lambda: False)
    data = np.random.default_rng(4).normal(size=(9, 8, 7)).astype(np.float32)
    out = resampling.resize_array(data, (5, 11, 7), 3, threads=4)
    assert out.shape == (5, 11, 7) and out.dtype == np.float64


def test_arrays_with_a_flipped_axis_of_length_one_reach_torch():
    # numpy calls such an array contiguous, but its stride is negative and torch.from_numpy refuses it
    # (a one-slice image whose slice axis a reorientation flips)
    from deepseg_core.inference.pipelines import torch_view

    flipped = np.arange(24, dtype=np.float32).reshape(2, 1, 3, 4)[:, ::-1]
    assert flipped.flags["C_CONTIGUOUS"] and min(flipped.strides) < 0
    np.testing.assert_array_equal(torch_view(flipped).numpy(), flipped)
    np.testing.assert_array_equal(torch_view(flipped, np.float16).numpy(), flipped.astype(np.float16))
    plain = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert torch_view(plain).data_ptr() == plain.ctypes.data  # no copy where none is needed
    probabilities = np.full((2, 1, 3, 4), 0.5, np.float32)[:, ::-1]
    np.testing.assert_allclose(normalised_entropy(probabilities), 1.0, atol=1e-6)


@pytest.mark.parametrize("arch", ["3d", "2.5d"])
@pytest.mark.parametrize(
    "shape_zyx, spacing_xyz",
    [
        ((1, 20, 22), (1.5, 1.5, 2.5)),
        ((7, 33, 41), (0.7, 0.8, 1.0)),
        ((101, 10, 12), (3.1, 2.9, 1.0)),
        ((9, 12, 10), (1.5, 1.5, 2.5001)),  # within the tolerance: not resampled
    ],
)
def test_the_network_grid_is_known_before_preparing_the_image(arch, shape_zyx, spacing_xyz):
    # the domain check's field-of-view finding uses it; it must be the grid prepare() resamples onto
    card, _ = tiny_card(arch=arch)
    pipeline = pipeline_for(card, 3 if arch == "3d" else 2, 1 if arch == "3d" else 3)
    volume = Volume(np.full(shape_zyx, 40, np.int16), spacing_xyz)
    grid = pipeline.network_grid([volume])
    prepared = pipeline.prepare([volume])
    assert grid.shape_zyx == prepared.image_czyx.shape[1:] == prepared.grid.shape_zyx
    assert grid.spacing_zyx_mm == tuple(card.preprocessing.target_spacing_xyz_mm[::-1])
    assert grid.input_axes == ("z", "y", "x")
