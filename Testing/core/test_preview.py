"""The PNG preview shows each label's overlay where the label is, in all three views, with square millimetres."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from deepseg_core.io import Volume
from deepseg_core.preview import render_overlay, write_preview

RED, GREEN = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)


def decode(path) -> np.ndarray:
    """The PNG as (H, W, 3) uint8, read by ITK's PNG reader (an independent decoder)."""
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_the_overlay_is_drawn_where_the_labels_are_in_every_view(tmp_path):
    # 10 slices of 2.5 mm, 20 x 30 voxels of 1.25 mm: views must be stretched 2x along z.
    grey = np.tile(np.linspace(0, 200, 30, dtype=np.float32), (10, 20, 1))
    labels = np.zeros((10, 20, 30), np.uint8)
    labels[2:8, 5:15, 5:20] = 1  # a "liver" block
    labels[4, 3:5, 5:20] = 1  # slice 4 has the most labelled voxels: the axial view shows it
    labels[4:6, 8:12, 10:14] = 2  # a "lesion" inside the liver
    image = Volume(grey, (1.25, 1.25, 2.5))
    path = write_preview(tmp_path / "p.png", image, labels, {1: RED, 2: GREEN}, window=(0, 200))
    picture = decode(path)
    np.testing.assert_array_equal(picture, render_overlay(image, labels, {1: RED, 2: GREEN}, window=(0, 200)))
    scale = 2
    # axial 20 x 30, coronal and sagittal 10 slices stretched to 20 rows; 4-pixel gaps after each panel
    assert picture.shape == (20 * scale, (30 + 4 + 30 + 4 + 20 + 4) * scale, 3)
    axial = picture[: 20 * scale, : 30 * scale].astype(int)
    z = 4
    expected = np.repeat(np.repeat(labels[z], scale, axis=0), scale, axis=1)
    reds = (axial[..., 0] > axial[..., 1] + 60) & (axial[..., 0] > axial[..., 2] + 60)
    greens = (axial[..., 1] > axial[..., 0] + 60) & (axial[..., 1] > axial[..., 2] + 60)
    np.testing.assert_array_equal(greens, expected == 2)
    np.testing.assert_array_equal(reds, expected == 1)
    unlabelled = expected == 0
    assert (axial[unlabelled][:, 0] == axial[unlabelled][:, 1]).all()  # plain grey outside the labels
    # the outline of the liver block is the pure label colour; inside, grey and colour are blended
    assert tuple(axial[3 * scale, 10 * scale]) == (255, 0, 0)
    inside = axial[10 * scale, 7 * scale]
    grey_value = round(200 * 7 / 29 * 255 / 200)
    assert abs(int(inside[0]) - round(0.55 * grey_value + 0.45 * 255)) <= 1
    assert abs(int(inside[1]) - round(0.55 * grey_value)) <= 1
    # coronal view: superior (high z) at the top, each slice two rows (2.5 mm / 1.25 mm)
    coronal = picture[:, (30 + 4) * scale : (30 + 4 + 30) * scale].astype(int)
    liver_rows = np.flatnonzero((coronal[..., 0] > coronal[..., 1] + 60).any(axis=1)) // scale
    assert liver_rows.min() == 2 * (10 - 8) and liver_rows.max() == 2 * (10 - 2) - 1
