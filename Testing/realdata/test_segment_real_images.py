"""The bundled liver-CT model on real brain MRs and a real head CT, through the real ``deepseg segment`` CLI.

Two CLI runs (module-scoped, each volume segmented once):

* without ``--skip-modality-check``: MNI152 T1, Colin27 T1 and the head CT in one batch. The two MRs
  are refused by the modality check (no voxel below 0 HU); the head CT passes it and is segmented.
* with ``--skip-modality-check``: the two MRs, segmented.

Every result must lie on its input's exact grid, and the domain check (``domain_check`` JSON event,
and ``Segmenter.check_inputs`` in process) must not say ``ok`` for any of these inputs, with reasons
that say why. ``--overlap 0.25`` keeps the CPU time low; these tests are about geometry and the
domain check, not about segmentation quality (a liver model has nothing to find in a head).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from real_images import COLIN_T1, HEAD_CT, MNI_T1, REPO

from deepseg_core import io
from deepseg_core.cli import EXIT_INPUT, EXIT_OK
from deepseg_core.demo import DEFAULT_MODEL
from deepseg_core.domain_shift import INTENSITY_CAUTION

CASES = {MNI_T1: "mni_icbm152_t1_tal_nlin_sym_09a_converted", COLIN_T1: "ch2", HEAD_CT: "ct_brain_atlas_1mm"}
MR_FILES = (MNI_T1, COLIN_T1)
ALL_FILES = (MNI_T1, COLIN_T1, HEAD_CT)


def run_segment(inputs: list[Path], output: Path, *extra: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    command = [sys.executable, "-m", "deepseg_core", "segment", *map(str, inputs), "--model", str(DEFAULT_MODEL)]
    command += ["--output", str(output), "--batch", "--json", "--device", "cpu", "--overlap", "0.25", *extra]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO / "DeepSeg", env=dict(os.environ), check=False)
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    return result, events


def by_case(events: list[dict], kind: str) -> dict[str, dict]:
    return {e["case"]: e for e in events if e["event"] == kind}


@pytest.fixture(scope="module")
def inputs(mni_t1_path, colin_t1_path, head_ct_path) -> dict[str, Path]:
    return {MNI_T1: mni_t1_path, COLIN_T1: colin_t1_path, HEAD_CT: head_ct_path}


@pytest.fixture(scope="module")
def plain_run(inputs, tmp_path_factory):
    """All three volumes, no override: the MRs are refused, the head CT is segmented."""
    out = tmp_path_factory.mktemp("plain")
    result, events = run_segment([inputs[name] for name in ALL_FILES], out)
    return out, result, events


@pytest.fixture(scope="module")
def override_run(inputs, tmp_path_factory):
    """The two MRs with ``--skip-modality-check``: both are segmented."""
    out = tmp_path_factory.mktemp("override")
    result, events = run_segment([inputs[name] for name in MR_FILES], out, "--skip-modality-check")
    return out, result, events


def result_for(name: str, plain_run, override_run) -> tuple[Path, dict]:
    out, _, events = override_run if name in MR_FILES else plain_run
    done = by_case(events, "case_done")[CASES[name]]
    return out / f"{CASES[name]}.seg.nrrd", done


@pytest.mark.parametrize("name", MR_FILES)
def test_mr_is_refused_without_the_override(name, plain_run):
    out, result, events = plain_run
    assert result.returncode == EXIT_INPUT, result.stderr
    failed = by_case(events, "case_failed")
    assert set(failed) == {CASES[n] for n in MR_FILES}
    error = failed[CASES[name]]["error"]
    maximum = 255 if name == MNI_T1 else 254
    assert "does not look like a CT in Hounsfield units" in error
    assert f"found no voxel below 0 (range 0 .. {maximum})" in error
    assert "--skip-modality-check overrides" in error
    assert not (out / f"{CASES[name]}.seg.nrrd").exists()
    assert "2 of 3 case(s) failed" in result.stderr


def test_override_run_succeeds(override_run):
    _, result, events = override_run
    assert result.returncode == EXIT_OK, result.stderr
    assert events[-1] == {"event": "done", "ok": 2, "failed": 0}


@pytest.mark.parametrize("name", ALL_FILES)
def test_segmentation_is_on_the_inputs_exact_grid(name, inputs, plain_run, override_run, record_property):
    path, done = result_for(name, plain_run, override_run)
    image = io.read_image(inputs[name])
    segmentation = io.read_segmentation(path)
    assert segmentation.grid.shape_zyx == image.shape_zyx
    np.testing.assert_allclose(segmentation.grid.ijk_to_lps(), image.ijk_to_lps(), rtol=0, atol=1e-9)
    stored = sitk.ReadImage(str(path))  # ITK's NRRD reader, no DeepSeg or slicerio code
    assert stored.GetSize() == tuple(reversed(image.shape_zyx))
    np.testing.assert_allclose(stored.GetOrigin(), image.origin_lps, atol=1e-9)
    np.testing.assert_allclose(stored.GetSpacing(), image.spacing_xyz_mm, atol=1e-9)
    np.testing.assert_allclose(np.reshape(stored.GetDirection(), (3, 3)), image.direction_lps, atol=1e-9)
    assert [s.name for s in segmentation.segments] == ["liver", "liver lesion"]
    labelmap = segmentation.to_labelmap().array_zyx
    for segment in done["segments"]:
        assert segment["voxels"] == int(np.count_nonzero(labelmap == segment["value"]))
    counts = ", ".join(f"{s['name']} {s['voxels']} voxels ({s['ml']:.1f} ml)" for s in done["segments"])
    record_property("realdata", f"{name}: {done['seconds']:.1f} s (network {done['timings_s']['network']:.1f} s); {counts}")


@pytest.mark.parametrize("name", ALL_FILES)
def test_domain_check_is_not_ok_and_says_why(name, plain_run, override_run, record_property):
    report = by_case(plain_run[2], "domain_check")[CASES[name]]
    assert report["verdict"] == "out_of_distribution"
    reasons = " ".join(report["reasons"])
    assert "does not look like a CT in Hounsfield units" in reasons and "no air near -1000 HU" in reasons
    assert "intensities differ from the training data" in reasons
    intensity = next(f for f in report["findings"] if f["check"] == "intensity")
    assert intensity["level"] != "ok" and intensity["value"] == report["intensity_distance"] >= INTENSITY_CAUTION
    modality = next(f for f in report["findings"] if f["check"] == "modality")
    assert modality["level"] == "out_of_distribution" and modality["value"] == 0.0
    if name in MR_FILES:  # the override changes nothing about the report
        again = by_case(override_run[2], "domain_check")[CASES[name]]
        assert again["verdict"] == report["verdict"] and again["intensity_distance"] == report["intensity_distance"]
    levels = ", ".join(f"{f['check']}={f['level']}" for f in report["findings"])
    distance = report["intensity_distance"]
    record_property("realdata", f"domain check {name}: {report['verdict']}, Wasserstein {distance:.3f}; {levels}")


@pytest.mark.needs_torch
def test_check_inputs_in_process_agrees_with_the_cli(inputs, plain_run):
    from deepseg_core.inference import Segmenter

    segmenter = Segmenter.load(DEFAULT_MODEL, device="cpu")
    events = by_case(plain_run[2], "domain_check")
    for name in ALL_FILES:
        report = segmenter.check_inputs([io.read_image(inputs[name])])
        assert report.verdict == events[CASES[name]]["verdict"] != "ok"
        assert report.reasons == events[CASES[name]]["reasons"]
        assert report.intensity_distance == pytest.approx(events[CASES[name]]["intensity_distance"], abs=1e-12)
