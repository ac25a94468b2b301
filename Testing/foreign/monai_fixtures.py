"""Helpers for the MONAI bundle tests and benchmark: bundles, inputs, MONAI's own bundle run, comparisons.

The reference is MONAI's bundle runner exactly as a model-zoo user runs it:
``monai.bundle.run(config_file=configs/inference.json, meta_file=..., logging_file=...,
bundle_root=..., datalist=[...], output_dir=..., dataloader#num_workers=0)`` in a fresh Python
process (MONAI's ``run`` configures logging, seeds and ``sys.path``; a subprocess keeps that out of
pytest). Its labels are read from ``<output_dir>/<stem>/<stem>_trans.nii.gz``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "make_tiny_monai_bundle.py"


def bundle_script():
    """``scripts/make_tiny_monai_bundle.py`` as a module."""
    spec = importlib.util.spec_from_file_location("make_tiny_monai_bundle", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("make_tiny_monai_bundle", module)
    spec.loader.exec_module(module)
    return module


def rotation_z(degrees: float) -> np.ndarray:
    """LPS direction rotated about S."""
    t = np.deg2rad(degrees)
    return np.array([[np.cos(t), -np.sin(t), 0.0], [np.sin(t), np.cos(t), 0.0], [0.0, 0.0, 1.0]])


def phantom_inputs(folder: Path) -> dict[str, Path]:
    """Phantom CTs stored with other geometries than the bundle's, as NIfTI (DeepSeg's writer).

    - ``oblique_lps``: 1.2 x 1.1 x 2.4 mm, voxel axes toward L, P, S (DICOM order, so Orientationd
      flips two axes), rotated 20 degrees about S, origin away from 0;
    - ``sagittal_pir``: voxel axes toward P, I, R (a sagittal acquisition: Orientationd permutes
      and flips), 1.3 x 1.2 x 1.4 mm.

    Spacing ratios to the bundle's 1.5 x 1.5 x 2.0 mm have odd denominators (4/5, 11/15, 6/5,
    13/15, 2/3, 7/10 ...), so no input voxel lies exactly half-way between two model voxels and
    nearest-neighbour resampling has no ties.
    """
    from deepseg_core.io import Volume, write_image
    from deepseg_core.phantoms import generate_phantom

    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    oblique = generate_phantom(seed=7, profile="ct-A", shape_zyx=(36, 104, 112), spacing_xyz_mm=(1.2, 1.1, 2.4))
    volume = Volume(oblique.image.array_zyx.astype(np.int16), (1.2, 1.1, 2.4), (-61.3, 48.2, -312.7), rotation_z(20.0))
    paths["oblique_lps"] = write_image(volume, folder / "oblique_lps.nii.gz")
    sagittal = generate_phantom(seed=11, profile="ct-B", shape_zyx=(70, 96, 64), spacing_xyz_mm=(1.3, 1.2, 1.4))
    # columns: i toward P, j toward I, k toward R (LPS vectors)
    direction = np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]])
    volume = Volume(sagittal.image.array_zyx.astype(np.int16), (1.3, 1.2, 1.4), (22.5, -31.0, 80.25), direction)
    paths["sagittal_pir"] = write_image(volume, folder / "sagittal_pir.nii.gz")
    return paths


def variant_bundle(base: Path, target: Path, changes: dict) -> Path:
    """A copy of ``base`` (same weights) whose inference.json gets ``changes`` (id -> value, ``::`` paths;
    a list index one past the end appends)."""
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(base, target)
    config_path = target / "configs" / "inference.json"
    config = json.loads(config_path.read_text())
    for ref_id, value in changes.items():
        node = config
        parts = ref_id.split("::")
        for part in parts[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
        last = parts[-1]
        if isinstance(node, list) and int(last) == len(node):
            node.append(copy.deepcopy(value))
        elif isinstance(node, list):
            node[int(last)] = copy.deepcopy(value)
        else:
            node[last] = copy.deepcopy(value)
    config_path.write_text(json.dumps(config, indent=4))
    return target


MONAI_RUNNER = textwrap.dedent(
    """
    import json, resource, sys, time

    def peak_rss_mb():
        # VmHWM: this process image's own peak (ru_maxrss survives execve, so a child started from a
        # big parent would report the parent's peak)
        try:
            with open("/proc/self/status") as status:
                return next(int(l.split()[1]) for l in status if l.startswith("VmHWM:")) / 1024
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    started = time.perf_counter()
    from monai.bundle import run
    times = {"import_s": time.perf_counter() - started, "runs_s": []}
    for args in json.loads(sys.argv[1]):
        clock = time.perf_counter()
        run(**args)
        times["runs_s"].append(time.perf_counter() - clock)
    times["peak_rss_mb"] = peak_rss_mb()
    print("MONAI_TIMES " + json.dumps(times))
    """
)


def monai_run_args(bundle: Path, inputs: list[Path], output_dir: Path) -> dict:
    """``monai.bundle.run`` arguments: the bundle's own configs, as a zoo user overrides them for local files.

    ``bundle_root`` (the zoo's is ``"."``, relative to the working directory), ``datalist`` (the zoo
    globs ``dataset_dir/imagesTs``), ``output_dir``, and ``dataloader#num_workers`` 0 (no worker
    processes; the result is the same).
    """
    bundle = Path(bundle).resolve()
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return {
        "config_file": str(bundle / "configs" / "inference.json"),
        "meta_file": str(bundle / "configs" / "metadata.json"),
        "logging_file": str(bundle / "configs" / "logging.conf"),
        "bundle_root": str(bundle),
        "datalist": [str(Path(p).resolve()) for p in inputs],
        "output_dir": str(Path(output_dir).resolve()),
        "dataloader#num_workers": 0,
    }


def run_monai_bundles(runs: list[dict], workdir: Path, timeout: float = 900) -> dict:
    """MONAI's own bundle inference, one ``monai.bundle.run`` per entry of ``runs`` (see
    :func:`monai_run_args`), all in one fresh process; returns its timings and peak RSS.

    Raises:
        AssertionError: with MONAI's output when the run fails.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    # cwd: a folder of ours, so nothing in it shadows a package ("python -c" puts the cwd on sys.path)
    done = subprocess.run(
        [sys.executable, "-c", MONAI_RUNNER, json.dumps(runs)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, f"MONAI's bundle run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    line = next(line for line in done.stdout.splitlines() if line.startswith("MONAI_TIMES "))
    return json.loads(line.split(" ", 1)[1])


def run_monai_bundle(bundle: Path, inputs: list[Path], output_dir: Path, timeout: float = 900) -> dict:
    """One bundle, several inputs: :func:`run_monai_bundles` with one run."""
    return run_monai_bundles([monai_run_args(bundle, inputs, output_dir)], Path(output_dir), timeout)


def monai_output(output_dir: Path, image: Path) -> Path:
    """Where SaveImaged wrote the labels of ``image`` (``<stem>/<stem>_trans.nii.gz``)."""
    stem = Path(image).name.split(".")[0]
    return Path(output_dir) / stem / f"{stem}_trans.nii.gz"


def compare_labels(ours: np.ndarray, theirs: np.ndarray, values) -> dict:
    """Per-label Dice (1.0 when both are empty), voxel agreement and voxel counts."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape, f"shapes differ: {ours.shape} vs {theirs.shape}"
    dice = {}
    counts = {}
    for value in values:
        a, b = ours == value, theirs == value
        total = int(a.sum()) + int(b.sum())
        dice[int(value)] = 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total
        counts[int(value)] = (int(a.sum()), int(b.sum()))
    agreement = float((ours == theirs).mean())
    return {"dice": dice, "agreement": agreement, "voxels_ours_theirs": counts, "differing": int((ours != theirs).sum())}
