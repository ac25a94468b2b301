"""The phantom generator: deterministic, consistent ground truth, anatomy in mm, profiles that shift."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from deepseg_core import io, phantoms
from deepseg_core.errors import ConfigError

SMALL = {"shape_zyx": (24, 64, 64), "spacing_xyz_mm": (2.0, 2.0, 3.0)}


def test_deterministic_under_a_seed():
    a = phantoms.generate_phantom(seed=5, **SMALL)
    b = phantoms.generate_phantom(seed=5, **SMALL)
    c = phantoms.generate_phantom(seed=6, **SMALL)
    np.testing.assert_array_equal(a.image.array_zyx, b.image.array_zyx)
    np.testing.assert_array_equal(a.labels.array_zyx, b.labels.array_zyx)
    assert not np.array_equal(a.image.array_zyx, c.image.array_zyx)


@pytest.mark.parametrize("seed", range(4))
def test_ground_truth_is_consistent(seed):
    p = phantoms.generate_phantom(seed=seed, n_lesions=(3, 5), **SMALL)
    labels, instances = p.labels.array_zyx, p.instances
    assert set(np.unique(labels)) <= {0, 1, 2}
    np.testing.assert_array_equal(labels == phantoms.LESION_LABEL, instances > 0)
    n = len(p.lesion_radii_mm)
    assert n >= 2, "the organ should hold several lesions"
    assert sorted(np.unique(instances[instances > 0])) == list(range(1, n + 1))
    # every lesion is one connected component, and lesions do not touch each other
    _, components = ndimage.label(instances > 0, structure=np.ones((3, 3, 3)))
    assert components == n
    # lesions lie inside the organ (their 1-voxel shell is organ or lesion, not background)
    shell = ndimage.binary_dilation(instances > 0) & ~(instances > 0)
    assert np.mean(labels[shell] > 0) > 0.9
    assert len(p.lesion_contrasts) == n and len(set(np.round(p.lesion_contrasts, 3))) == n


def test_varied_lesion_sizes():
    radii = [r for s in range(6) for r in phantoms.generate_phantom(seed=s, **SMALL).lesion_radii_mm]
    assert min(radii) < 5.0 < max(radii)


def test_anatomy_is_drawn_in_millimetres():
    """Same field of view at two spacings: the organ volume in ml barely changes."""
    iso = phantoms.generate_phantom(seed=3, shape_zyx=(24, 48, 48), spacing_xyz_mm=(2.0, 2.0, 2.0), n_lesions=0)
    aniso = phantoms.generate_phantom(seed=3, shape_zyx=(16, 96, 96), spacing_xyz_mm=(1.0, 1.0, 3.0), n_lesions=0)
    ml = [np.count_nonzero(p.labels.array_zyx == 1) * p.image.voxel_volume_ml for p in (iso, aniso)]
    assert ml[1] == pytest.approx(ml[0], rel=0.15)
    assert aniso.image.spacing_xyz_mm == (1.0, 1.0, 3.0)


def tissue_stats(profile: str):
    p = phantoms.generate_phantom(seed=11, profile=profile, n_lesions=4, **SMALL)
    img, lab = p.image.array_zyx, p.labels.array_zyx
    inner = ndimage.binary_erosion(lab == 1, iterations=3)
    return float(img[inner].mean()), float(img[inner].std()), p


def test_profiles_shift_intensity_and_noise():
    means, stds = {}, {}
    for name in ("ct-A", "ct-B", "ct-C"):
        means[name], stds[name], _ = tissue_stats(name)
    assert stds["ct-A"] < stds["ct-B"] < stds["ct-C"]
    assert abs(means["ct-B"] - means["ct-A"]) > 10
    mr_a, mr_sd, p = tissue_stats("mr-A")
    assert p.profile.modality == "MR" and p.image.array_zyx.min() >= 0
    assert mr_a > 3 * means["ct-A"]  # MR units differ from HU


def test_lesions_are_visible_in_the_reference_profile():
    p = phantoms.generate_phantom(seed=2, profile="ct-A", n_lesions=4, **SMALL)
    img, lab = p.image.array_zyx, p.labels.array_zyx
    organ = img[ndimage.binary_erosion(lab == 1, iterations=2)]
    for lesion_id, contrast in enumerate(p.lesion_contrasts, start=1):
        core = ndimage.binary_erosion(p.instances == lesion_id)
        if core.sum() < 5:
            continue
        measured = img[core].mean() - organ.mean()
        assert np.sign(measured) == np.sign(contrast)
        assert abs(measured) > 2 * p.profile.noise_sigma / np.sqrt(core.sum())


def test_interpolated_profiles_grade_the_shift():
    a, b = phantoms.PROFILES["ct-A"], phantoms.PROFILES["ct-C"]
    start = phantoms.interpolate_profiles(a, b, 0.0)
    end = phantoms.interpolate_profiles(a, b, 1.0)
    assert dataclasses.replace(start, name=a.name) == a
    assert dataclasses.replace(end, name=b.name) == b
    mid = phantoms.interpolate_profiles(a, b, 0.5)
    assert a.noise_sigma < mid.noise_sigma < b.noise_sigma
    with pytest.raises(ConfigError, match="different modalities"):
        phantoms.interpolate_profiles(a, phantoms.PROFILES["mr-A"], 0.5)


def test_unknown_profile_lists_valid_names():
    with pytest.raises(ConfigError, match="ct-A.*mr-C"):
        phantoms.generate_phantom(profile="siemens")


def test_phantom_round_trips_through_files(tmp_path):
    p = phantoms.generate_phantom(seed=1, origin_lps=(10.0, -20.0, 5.0), **SMALL)
    image_path = io.write_image(p.image, tmp_path / "case.nii.gz")
    segments = [lab.segment_info() for lab in phantoms.PHANTOM_LABELS]
    seg_path = io.write_segmentation(tmp_path / "case.seg.nrrd", p.labels, segments)
    image, seg = io.read_image(image_path), io.read_segmentation(seg_path)
    np.testing.assert_array_equal(image.array_zyx, p.image.array_zyx)
    np.testing.assert_array_equal(seg.to_labelmap().array_zyx, p.labels.array_zyx)
    assert seg.grid.same_grid(image)
