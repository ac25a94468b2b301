"""The Segmenter: input checks, preprocessing, labels back on the exact input grid, 2D/2.5D/3D models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_fixtures import tiny_model_folder

from deepseg_core import phantoms
from deepseg_core.errors import DeepSegError, ImageError
from deepseg_core.inference import Segmenter, SegmentOptions, choose_device
from deepseg_core.io import Volume
from deepseg_core.model_card import Normalization
from deepseg_core.preprocessing import normalize, resample_to_spacing


def oblique() -> np.ndarray:
    a = np.deg2rad(15)
    return np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])


def ct_volume(shape=(12, 20, 24), spacing=(1.5, 1.5, 2.5)) -> Volume:
    case = phantoms.generate_phantom(seed=1, shape_zyx=shape, spacing_xyz_mm=spacing, n_lesions=1)
    return Volume(case.image.array_zyx, spacing, origin_lps=(-40.0, 12.5, 300.0), direction_lps=oblique())


@pytest.mark.parametrize("arch", ["3d", "2d", "2.5d"])
def test_labels_land_on_the_exact_input_grid(tmp_path, arch):
    segmenter = Segmenter.load(tiny_model_folder(tmp_path / "m", arch=arch), device="cpu")
    volume = ct_volume()
    result = segmenter.segment([volume], SegmentOptions())
    assert result.labels.same_grid(volume, tolerance_mm=1e-9)
    assert result.labels.array_zyx.dtype == np.uint8
    assert set(np.unique(result.labels.array_zyx)) <= {0, 1, 2}


def test_resampling_path_returns_to_the_input_grid(tmp_path):
    """Model spacing 2 x 2 x 3 mm, input 1.5 x 1.5 x 2.5 mm: probabilities resampled, argmax on the input grid."""
    segmenter = Segmenter.load(tiny_model_folder(tmp_path / "m", spacing=(2.0, 2.0, 3.0)), device="cpu")
    volume = ct_volume()
    result = segmenter.segment([volume], SegmentOptions(keep_probabilities=True))
    assert result.labels.same_grid(volume, tolerance_mm=1e-9)
    assert result.probabilities.shape == (3, *volume.shape_zyx)
    np.testing.assert_allclose(result.probabilities.astype(np.float32).sum(0), 1.0, atol=2e-2)
    probs = result.probabilities.astype(np.float32)
    labels = result.labels.array_zyx
    chosen = np.take_along_axis(probs, labels[None].astype(np.int64), 0)[0]
    # the labels are the argmax of the float32 probabilities; the kept copy is float16, so the
    # only allowed disagreements are near-ties within float16 precision
    assert np.all(chosen >= probs.max(0) - 2e-3)


def test_same_result_as_the_network_on_the_whole_volume(tmp_path):
    """A volume the size of one patch: the pipeline must reproduce normalise -> net -> argmax exactly."""
    segmenter = Segmenter.load(tiny_model_folder(tmp_path / "m"), device="cpu")
    volume = ct_volume(shape=(8, 16, 16))
    result = segmenter.segment([volume], SegmentOptions())
    assert result.window_stats["tiles"] == 1 and result.window_stats["network_calls"] == 1
    assert result.window_stats["max_buffer_depth"] == segmenter.card.inference.patch_size_zyx[0]
    norm = segmenter.card.preprocessing.normalization
    with torch.no_grad():
        logits = segmenter.net(torch.from_numpy(normalize(volume.array_zyx, norm))[None, None])
    np.testing.assert_array_equal(result.labels.array_zyx, logits[0].argmax(0).numpy())


def test_channel_count_mismatch(tmp_path):
    segmenter = Segmenter.load(tiny_model_folder(tmp_path / "m", channels=("T1", "T2"), modality="MR"), device="cpu")
    mr = ct_volume().with_array(np.abs(ct_volume().array_zyx))
    with pytest.raises(ImageError, match=r"needs 2 input channel\(s\) \['T1', 'T2'\].*found 1"):
        segmenter.segment([mr])
    shifted = Volume(mr.array_zyx, mr.spacing_xyz_mm, origin_lps=(0, 0, 0))
    with pytest.raises(ImageError, match="not on the same grid"):
        segmenter.segment([mr, shifted], subjects=["t1.nrrd", "t2.nrrd"])
    assert segmenter.segment([mr, mr]).labels.same_grid(mr)


def test_modality_checks(tmp_path):
    ct_model = Segmenter.load(tiny_model_folder(tmp_path / "ct"), device="cpu")
    mr_like = ct_volume().with_array(np.abs(ct_volume().array_zyx) + 1)
    with pytest.raises(ImageError, match="mr.nrrd: does not look like a CT in Hounsfield units.*--skip-modality-check"):
        ct_model.segment([mr_like], subjects=["mr.nrrd"])
    assert ct_model.segment([mr_like], SegmentOptions(check_modality=False)).labels.same_grid(mr_like)
    mr_model = Segmenter.load(tiny_model_folder(tmp_path / "mr", modality="MR", channels=("T1",)), device="cpu")
    with pytest.raises(ImageError, match="looks like a CT, but the model expects MR"):
        mr_model.segment([ct_volume()])


def test_device_choice():
    assert choose_device("cpu").type == "cpu"
    assert choose_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(DeepSegError, match="CUDA was requested but no CUDA device is available.*--device cpu"):
            choose_device("cuda")


def test_instances_are_counted(tmp_path):
    segmenter = Segmenter.load(tiny_model_folder(tmp_path / "m"), device="cpu")
    result = segmenter.segment([ct_volume()], SegmentOptions(instances=True, min_instance_mm3=0.0))
    assert result.instance_ids is not None
    assert result.instance_ids.max() == len(result.instances)
    assert all(inst.label == 2 for inst in result.instances)


def test_resample_to_spacing_keeps_extent():
    volume = ct_volume(shape=(10, 20, 30), spacing=(1.0, 1.0, 3.0))
    out = resample_to_spacing(volume, (2.0, 2.0, 1.5))
    assert out.shape_zyx == (20, 10, 15)
    assert out.origin_lps == volume.origin_lps
    labels = volume.with_array((volume.array_zyx > 50).astype(np.uint8))
    assert resample_to_spacing(labels, (2.0, 2.0, 1.5), is_label=True).array_zyx.dtype == np.uint8


def test_a_finer_model_grid_repeats_the_inputs_last_voxels_where_simpleitk_gives_zero():
    """12 slices of 3 mm onto 1 mm: the new grid's last centre lies past the input's last voxel (35 mm
    from the first centre; the input's voxels end at 34.5 mm), as does the last column at 1.1 -> 0.5 mm
    (9.5 mm; the input ends at 9.35 mm). ITK would give them 0 (water in a CT, background in labels);
    the input's edge is repeated there, and everywhere else the result is SimpleITK's own."""
    import SimpleITK as sitk

    volume = ct_volume(shape=(12, 8, 9), spacing=(1.1, 1.0, 3.0))
    volume = volume.with_array(volume.array_zyx.astype(np.float32) - 2000.0)  # no voxel near 0
    out = resample_to_spacing(volume, (0.5, 1.0, 1.0))
    assert out.shape_zyx == (36, 8, 20)
    plain = sitk.GetArrayFromImage(
        sitk.Resample(volume.to_sitk(), out.to_sitk(), sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    )
    past = plain == 0.0
    assert past[35].all() and past[:, :, 19].all() and not past[:35, :, :19].any()
    np.testing.assert_array_equal(out.array_zyx[~past], plain[~past])
    # z: slices 34 (which ITK clamps) and 35 lie past the input's last centre (33 mm): its last slice
    np.testing.assert_array_equal(out.array_zyx[34], out.array_zyx[33])
    np.testing.assert_array_equal(out.array_zyx[35], out.array_zyx[33])
    # x: columns 18 (9.0 mm, which ITK clamps) and 19 (9.5 mm) lie past the input's last column (8.8 mm)
    np.testing.assert_array_equal(out.array_zyx[..., 19], out.array_zyx[..., 18])
    assert (out.array_zyx < -900).all()

    labels = volume.with_array(np.ones(volume.shape_zyx, np.uint8))
    resampled_labels = resample_to_spacing(labels, (0.5, 1.0, 1.0), is_label=True)
    assert resampled_labels.array_zyx.dtype == np.uint8 and (resampled_labels.array_zyx == 1).all()


def test_normalisation_schemes():
    data = np.random.default_rng(0).normal(100, 20, size=(4, 5, 6)).astype(np.float32)
    ct = normalize(data, Normalization("ct", window=(60.0, 140.0), mean=100.0, std=20.0))
    assert ct.min() >= -2.0 - 1e-6 and ct.max() <= 2.0 + 1e-6
    z = normalize(data, Normalization("zscore"))
    assert abs(float(z.mean())) < 0.2 and abs(float(z.std()) - 1) < 0.1
    p = normalize(data, Normalization("percentile", percentiles=(5.0, 95.0)))
    assert abs(float(p.mean())) < 1e-4


def test_a_cascades_progress_counts_both_stages_also_when_the_first_reports_once():
    from deepseg_core.inference.predictor import _two_stage_progress

    events = []
    first, second = _two_stage_progress(lambda *event: events.append(event), 6)
    first(2, 2, 0.0)  # a first stage of one tile batch reports once, when it is done
    second(3, 6, 1.0)
    second(6, 6, 0.0)
    assert [event[:2] for event in events] == [(2, 8), (5, 8), (8, 8)]
    assert events[0][2] > 0, "the second stage's six tiles are still to run"
    assert _two_stage_progress(None, 6) == (None, None)
