"""Real DICOM files of pydicom's test set through ``io.read_image``'s DICOM checks (``dicom_series``).

- ``dicomdirtests/98892003/MR700``: one series of 7 radial MR slices, each in its own orientation;
- ``dicomdirtests/98892003/MR2``: three series, one of them a tri-planar localizer (3 orientations);
- ``dicomdirtests/98892003/MR1``: three series of one slice each;
- ``rtdose.dcm``: an RT Dose grid (multi-frame), not an image;
- ``CT_small.dcm``: one real CT slice (128 x 128, rescaled), copied into a regular stack.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file

from deepseg_core import io
from deepseg_core.errors import ImageError


def _test_folder(name: str) -> Path:
    return Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892003" / name


def test_a_radial_mr_series_of_seven_orientations_is_refused():
    with pytest.raises(ImageError, match=r"mixes slices of 7 orientations in one series.*Slicer's DICOM module"):
        io.read_image(_test_folder("MR700"))


def test_a_localizer_series_is_refused_and_a_folder_of_several_series_names_the_option_that_picks_one():
    folder = _test_folder("MR2")
    with pytest.raises(ImageError, match=r"holds several DICOM series.*--series-uid"):
        io.read_image(folder)
    localizer = next(uid for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) if uid.endswith(".136"))
    assert len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), localizer)) == 3
    with pytest.raises(ImageError, match="mixes slices of 3 orientations"):
        io.read_image(folder, series_uid=localizer)


def test_a_series_of_one_slice_is_refused():
    folder = _test_folder("MR1")
    uid = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))[0]
    with pytest.raises(ImageError, match="holds a single slice"):
        io.read_image(folder, series_uid=uid)


def test_an_rt_dose_grid_is_not_read_as_an_image(tmp_path):
    dose = Path(get_testdata_file("rtdose.dcm"))
    with pytest.raises(ImageError, match=r"rtdose\.dcm: holds an RT Dose object \(a dose grid\), not an image"):
        io.read_image(dose)
    (tmp_path / "plan").mkdir()
    shutil.copy(dose, tmp_path / "plan" / dose.name)
    with pytest.raises(ImageError, match=r"holds an RT Dose object \(a dose grid\), not an image"):
        io.read_image(tmp_path / "plan")


def test_a_regular_stack_of_a_real_ct_slice_reads_its_rescaled_values(tmp_path):
    source = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    expected_slice = source.pixel_array * float(source.RescaleSlope) + float(source.RescaleIntercept)
    folder = tmp_path / "ct"
    folder.mkdir()
    x, y, z = (float(v) for v in source.ImagePositionPatient)
    for k in range(4):
        copy = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        copy.ImagePositionPatient = [x, y, z + 3.0 * k]
        copy.SOPInstanceUID = f"{source.SOPInstanceUID}.{k + 1}"
        copy.InstanceNumber = k + 1
        copy.save_as(str(folder / f"{k}.dcm"))
    volume = io.read_image(folder)
    assert volume.shape_zyx == (4, 128, 128)
    assert volume.spacing_xyz_mm[2] == pytest.approx(3.0)
    for k in range(4):
        np.testing.assert_array_equal(volume.array_zyx[k], expected_slice)
    (folder / "1.dcm").unlink()  # a missing slice: 3 and 6 mm gaps
    with pytest.raises(ImageError, match="unequally spaced slices"):
        io.read_image(folder)
