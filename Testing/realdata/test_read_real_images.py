"""Real NIfTI files through ``deepseg_core.io.read_image``: shape, spacing, origin, direction and voxels exact.

Each file is compared with two independent readers: SimpleITK's own reader (no DeepSeg code) and a
NIfTI-1 decoder written from the specification (``nifti_header``), which turns the header's sform /
qform (RAS) into LPS by hand. The left/right check on the AAL atlas then shows the LPS geometry is
anatomically right, not just self-consistent.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from nifti_header import lps_geometry, read_header_and_voxels
from real_images import AAL, COLIN_T1, HEAD_CT, MNI_GM, MNI_T1, MNI_WM, NIFTI_FILES, real_file

from deepseg_core import io

#: What the files are (shape z, y, x; voxel type; sform / qform codes), from their headers.
FACTS = {
    MNI_T1: ((189, 233, 197), np.uint8, 2, 0),
    MNI_GM: ((189, 233, 197), np.uint8, 2, 0),
    MNI_WM: ((189, 233, 197), np.uint8, 2, 0),
    COLIN_T1: ((181, 217, 181), np.uint8, 4, 0),
    AAL: ((181, 217, 181), np.uint8, 4, 0),
    HEAD_CT: ((179, 202, 202), np.int16, 2, 0),
}


@pytest.mark.parametrize("name", NIFTI_FILES)
def test_read_image_equals_simpleitk_reader(name):
    path = real_file(name)
    volume = io.read_image(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    image = reader.Execute()
    assert volume.shape_zyx == tuple(reversed(image.GetSize()))
    assert volume.spacing_xyz_mm == image.GetSpacing()
    assert volume.origin_lps == image.GetOrigin()
    assert tuple(volume.direction_lps.reshape(-1)) == image.GetDirection()
    expected = sitk.GetArrayViewFromImage(image)
    assert volume.array_zyx.dtype == expected.dtype
    np.testing.assert_array_equal(volume.array_zyx, expected)


@pytest.mark.parametrize("name", NIFTI_FILES)
def test_read_image_geometry_equals_hand_decoded_nifti_header(name):
    path = real_file(name)
    volume = io.read_image(path)
    header, voxels = read_header_and_voxels(path)
    shape, dtype, sform_code, qform_code = FACTS[name]
    assert (header.sform_code, header.qform_code) == (sform_code, qform_code)
    assert header.dim[0] == 3 and volume.shape_zyx == shape == voxels.shape
    spacing, origin, direction = lps_geometry(header.voxel_to_ras())
    # float32 header values, carried into float64 by both readers: equal to far below a micrometre
    np.testing.assert_allclose(volume.spacing_xyz_mm, spacing, rtol=0, atol=1e-9)
    np.testing.assert_allclose(volume.origin_lps, origin, rtol=0, atol=1e-9)
    np.testing.assert_allclose(volume.direction_lps, direction, rtol=0, atol=1e-12)
    np.testing.assert_allclose(volume.ijk_to_ras(), header.voxel_to_ras(), rtol=0, atol=1e-9)
    assert volume.array_zyx.dtype == np.dtype(dtype) == voxels.dtype.newbyteorder("=")
    np.testing.assert_array_equal(volume.array_zyx, voxels)


def test_every_file_is_as_the_data_readme_says():
    """Sizes and spacing the README and ENVIRONMENT.md state (1 mm everywhere)."""
    sizes_xyz = {name: tuple(reversed(FACTS[name][0])) for name in FACTS}
    assert sizes_xyz[MNI_T1] == (197, 233, 189)
    assert sizes_xyz[COLIN_T1] == sizes_xyz[AAL] == (181, 217, 181)
    assert sizes_xyz[HEAD_CT] == (202, 202, 179)
    for name in NIFTI_FILES:
        assert io.read_image(real_file(name)).spacing_xyz_mm == (1.0, 1.0, 1.0)


def test_atlases_share_their_images_grids():
    assert io.read_image(real_file(AAL)).same_grid(io.read_image(real_file(COLIN_T1)), tolerance_mm=0.0)
    t1 = io.read_image(real_file(MNI_T1))
    for name in (MNI_GM, MNI_WM):
        assert io.read_image(real_file(name)).same_grid(t1, tolerance_mm=0.0)


def test_aal_left_labels_lie_left_in_ras_and_lps(aal_names):
    """Every ``*_L`` AAL region's centroid is at R < 0 (RAS), i.e. L > 0 (LPS); ``*_R`` the opposite.

    A flipped x axis anywhere between the header and ``Volume.ijk_to_ras`` would swap all 108
    lateralised regions, so this checks the LPS/RAS conversion on anatomy.
    """
    aal, names = io.read_image(real_file(AAL)), aal_names
    labels = aal.array_zyx.ravel()
    counts = np.bincount(labels, minlength=117)
    z, y, x = np.unravel_index(np.arange(labels.size), aal.shape_zyx)
    index_sums = np.stack([np.bincount(labels, weights=w, minlength=117) for w in (x, y, z)], axis=1)
    centroid_ijk = index_sums[1:] / counts[1:, None]
    centroid_ras = (aal.ijk_to_ras() @ np.c_[centroid_ijk, np.ones(116)].T).T[:, :3]
    centroid_lps = (aal.ijk_to_lps() @ np.c_[centroid_ijk, np.ones(116)].T).T[:, :3]
    lateral = {v: n for v, n in names.items() if n.endswith(("_L", "_R"))}
    assert len(lateral) == 108
    for value, name in lateral.items():
        sign = -1 if name.endswith("_L") else 1
        assert sign * centroid_ras[value - 1, 0] > 5.0, (name, centroid_ras[value - 1])
        assert -sign * centroid_lps[value - 1, 0] > 5.0, (name, centroid_lps[value - 1])
    frontal_sup, occipital_sup = names_to_value(names, "Frontal_Sup_L"), names_to_value(names, "Occipital_Sup_L")
    assert centroid_ras[frontal_sup - 1, 1] > centroid_ras[occipital_sup - 1, 1] + 50  # anterior is +A in RAS
    precentral, cerebellum = names_to_value(names, "Precentral_L"), names_to_value(names, "Cerebelum_Crus1_L")
    assert centroid_ras[precentral - 1, 2] > centroid_ras[cerebellum - 1, 2] + 50  # superior is +S


def names_to_value(names: dict[int, str], name: str) -> int:
    return next(v for v, n in names.items() if n == name)


def test_written_nifti_qform_and_sform_both_decode_to_the_read_geometry(tmp_path):
    """DeepSeg's writer stores qform AND sform; decoded by hand, both give the original LPS geometry."""
    original = io.read_image(real_file(COLIN_T1))
    written = io.write_image(original, tmp_path / "colin.nii.gz")
    header, voxels = read_header_and_voxels(written)
    assert header.qform_code > 0 and header.sform_code > 0
    for matrix in (header.qform_ras(), header.sform_ras()):
        spacing, origin, direction = lps_geometry(matrix)
        np.testing.assert_allclose(spacing, original.spacing_xyz_mm, atol=1e-6)
        np.testing.assert_allclose(origin, original.origin_lps, atol=1e-4)
        np.testing.assert_allclose(direction, original.direction_lps, atol=1e-6)
    np.testing.assert_array_equal(voxels, original.array_zyx)
    again = io.read_image(written)
    assert again.same_grid(original, tolerance_mm=1e-4)
    np.testing.assert_array_equal(again.array_zyx, original.array_zyx)
