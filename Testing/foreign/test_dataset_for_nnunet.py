"""A DeepSeg dataset through nnU-Net v2's own dataset check (``verify_dataset_integrity``).

DESIGN.md promises datasets nnU-Net v2 can train on as they are (``imagesTr/<case>_0000.nii.gz``,
``labelsTr/<case>.nii.gz``, ``dataset.json``). nnU-Net's check reads every case with its own reader and
refuses missing channels, label values outside ``dataset.json``, and images and labels whose shape,
spacing, origin or direction differ. The cases here are added as users add them: a corrected
``.seg.nrrd`` through ``deepseg dataset add``, and two channels.
"""

from __future__ import annotations

import pytest

from deepseg_core import io
from deepseg_core.cli import EXIT_OK, main
from deepseg_core.datasets import CaseProvenance, Dataset
from deepseg_core.phantoms import PHANTOM_LABELS, generate_phantom


def test_a_deepseg_dataset_passes_nnunets_own_integrity_check(tmp_path, capfd):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    root = tmp_path / "Dataset777_DeepSegSite"
    dataset = Dataset.create(root, "site", PHANTOM_LABELS, ("CT", "CT smoothed"))
    for seed in range(2):  # oblique, anisotropic phantoms with lesions
        case = generate_phantom(seed=seed, shape_zyx=(16, 32, 40), spacing_xyz_mm=(0.8, 0.9, 2.5), origin_lps=(4.0, -9.0, 30.0))
        smoothed = io.Volume(
            case.image.array_zyx // 2, case.image.spacing_xyz_mm, case.image.origin_lps, case.image.direction_lps
        )
        dataset.add_case(f"site_{seed:03d}", [case.image, smoothed], case.labels.array_zyx, CaseProvenance(source="phantom"))
    corrected = generate_phantom(seed=7, shape_zyx=(16, 32, 40), spacing_xyz_mm=(0.8, 0.9, 2.5))
    images = [io.write_image(corrected.image, tmp_path / f"c{k}.nrrd") for k in range(2)]
    segments = [label.segment_info() for label in PHANTOM_LABELS]
    labels = io.write_segmentation(tmp_path / "corrected.seg.nrrd", corrected.labels, segments)
    command = [
        "dataset",
        "add",
        str(root),
        "--case",
        "site_007",
        "--image",
        str(images[0]),
        str(images[1]),
        "--labels",
        str(labels),
    ]
    assert main(command) == EXIT_OK
    assert sorted(Dataset.open(root).cases) == ["site_000", "site_001", "site_007"]

    verify_dataset_integrity(str(root), num_processes=1)  # raises on any problem it finds

    (root / "imagesTr" / "site_001_0001.nii.gz").unlink()  # the check is live: a missing channel is found
    capfd.readouterr()
    with pytest.raises(Exception, match="Some images have errors"):
        verify_dataset_integrity(str(root), num_processes=1)
    said = capfd.readouterr().out
    assert "Unexpected number of modalities" in said and "site_001_0000.nii.gz" in said
