"""Cases shared by the tests of imported models: a CT phantom off the training grid and a second site's dataset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from deepseg_core import io, phantoms
from deepseg_core.datasets import Dataset

#: zero frames on three sides (y low and high, x low): nnU-Net's crop is not symmetric
THREE_SIDED_FRAMES = ((slice(None), slice(0, 4)), (slice(None), slice(-3, None)), (slice(None), slice(None), slice(0, 5)))


@pytest.fixture
def one_torch_thread():
    """One torch thread, as the nnU-Net reference runs: on the shared 2-core CI machine two threads per process made
    the 2D run 30x slower (OpenMP threads spin while waiting for a core). Import it and name it in ``usefixtures``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def offgrid_ct_phantom(seed: int, zero_frames: tuple[tuple[slice, ...], ...] = ((slice(None), slice(0, 4)),)) -> io.Volume:
    """A CT phantom on another grid than the tiny models' training data: 0.9 x 1.1 x 4 mm (z anisotropic, so
    nnU-Net's resampling takes its separate-axis path), another origin, x and y flipped, and zero ``frames``
    (index tuples into ``(z, y, x)``) that nnU-Net crops away."""
    phantom = phantoms.generate_phantom(
        seed=seed,
        profile="ct-A",
        shape_zyx=(14, 60, 52),
        spacing_xyz_mm=(0.9, 1.1, 4.0),
        n_lesions=(2, 3),
        lesion_radius_mm=(8.0, 14.0),
        origin_lps=(-12.5, 30.0, 7.25),
    )
    array = phantom.image.array_zyx.astype(np.int16)
    for frame in zero_frames:
        array[frame] = 0
    return io.Volume(array, phantom.image.spacing_xyz_mm, phantom.image.origin_lps, np.diag([-1.0, -1.0, 1.0]))


def site_dataset(folder: Path) -> Path:
    """A second site (CT profile ``ct-B``): 2 training cases and 1 validation case, the truth standing in for
    corrections."""
    dataset = Dataset.create(folder, "siteB", phantoms.PHANTOM_LABELS, ("CT",))
    for seed, split in ((700, "train"), (701, "train"), (702, "validation")):
        case = phantoms.generate_phantom(seed=seed, profile="ct-B", shape_zyx=(36, 64, 64), spacing_xyz_mm=(1.5, 1.5, 2.0))
        dataset.add_case(f"case{seed}", [case.image], case.labels.array_zyx.astype(np.uint8), split=split)
    return folder


def add_lowres_configuration(plans: dict, spacing_factor: float) -> None:
    """Give nnU-Net ``plans`` a ``3d_lowres`` configuration as its planner writes one for a cascade: 3d_fullres at
    ``spacing_factor`` times its spacing, with ``next_stage`` 3d_cascade_fullres."""
    fullres = plans["configurations"]["3d_fullres"]
    plans["configurations"]["3d_lowres"] = {
        "inherits_from": "3d_fullres",
        "data_identifier": "nnUNetPlans_3d_lowres",
        "spacing": [s * spacing_factor for s in fullres["spacing"]],
        "next_stage": "3d_cascade_fullres",
    }
