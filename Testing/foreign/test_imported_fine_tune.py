"""The correct-and-retrain loop from an imported model, end to end through the CLI a panel runs.

An nnU-Net v2 folder and a MONAI bundle, each made by its own tool's code (the tiny cached models of
this folder's fixtures), are imported, fine-tuned on a site dataset with ``deepseg train --base``,
compared with ``deepseg evaluate``, used to segment, promoted and rolled back. The new version keeps
its source's provenance, architecture and preprocessing, records its parent, and is not active
until promoted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import monai_fixtures as mf
import pytest
from foreign_cases import site_dataset

from deepseg_core import io
from deepseg_core.datasets import Dataset
from deepseg_core.model_store import ModelStore, read_model_folder

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str | Path) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [sys.executable, "-m", "deepseg_core", *(str(a) for a in args)],
        capture_output=True,
        text=True,
        cwd=REPO / "DeepSeg",
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert done.returncode == 0, f"deepseg {' '.join(str(a) for a in args)}:\n{done.stderr[-3000:]}"
    return done


def events(done: subprocess.CompletedProcess) -> list[dict]:
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def sources(tiny_folders) -> dict[str, tuple[Path, list[str]]]:
    """Model folder and import options per format."""
    return {
        "nnunetv2": (tiny_folders["3d"], ["--folds", "0"]),
        "monai_bundle": (mf.bundle_script().ensure_bundle(), []),
    }


@pytest.mark.parametrize("fmt", ["nnunetv2", "monai_bundle"])
def test_an_imported_model_is_fine_tuned_compared_promoted_and_rolled_back(fmt, sources, tmp_path, engine_prepares_for):
    folder, options = sources[fmt]
    store_dir = tmp_path / "store"
    # --no-prepare: the imported version is only evaluated (torch) and fine-tuned here, so an export would only cost time
    imported_events = events(
        cli("models", "import", folder, "--name", "site", "--models-dir", store_dir, "--json", "--no-prepare", *options)
    )
    assert [e["event"] for e in imported_events] == ["imported"]
    imported = imported_events[0]
    assert imported["model"] == "site:1" and imported["source"]["format"] == fmt
    dataset = site_dataset(tmp_path / "siteB")

    train = ["train", "--dataset", dataset, "--base", "site", "--name", "site", "--epochs", "1", "--steps", "2"]
    train += ["--device", "cpu", "--no-activate", "--models-dir", store_dir, "--checkpoints", tmp_path / "ck", "--json"]
    trained = events(cli(*train))
    done = next((e for e in trained if e["event"] == "done"), trained[-1])
    assert done["event"] == "done", done
    # the stored version's network is then prepared for this computer's CPU runtime, as an import's would be
    prepared = engine_prepares_for != "torch"
    assert [e["event"] for e in trained[trained.index(done) + 1 :]] == (["status", "prepared"] if prepared else [])
    store = ModelStore(store_dir)
    parent, child = read_model_folder(store.folder("site:1")), read_model_folder(store.folder("site:2"))
    assert child.parent_version == 1 and child.source == parent.source == imported["source"]
    assert child.architecture.name == parent.architecture.name and child.pipeline == parent.pipeline
    assert child.inference == parent.inference
    assert store.folder("site:2") != store.folder("site:1") and store.active_version("site") == 1, "not active until promoted"

    # the weights moved, and deepseg evaluate reproduces what training reported for both versions
    assert (store.folder("site:2") / "weights.safetensors").read_bytes() != (
        store.folder("site:1") / "weights.safetensors"
    ).read_bytes()
    for ref, reported in (("site:1", done["parent_validation"]), ("site:2", done["validation"])):
        evaluate = ["evaluate", "--model", ref, "--dataset", dataset, "--device", "cpu", "--models-dir", store_dir]
        result = json.loads(cli(*evaluate).stdout)
        assert result["model"] == ref and set(result["mean"]) == {"liver", "liver lesion"}
        for label, metrics in reported.items():
            assert result["mean"][label]["dice"] == pytest.approx(metrics["dice"], abs=1e-6), (ref, label)

    # the new version segments with its source's preprocessing, on the input's grid
    case = Dataset.open(dataset).image_paths("case702")[0]
    output = tmp_path / "case702.seg.nrrd"
    segmented = cli("segment", case, "--model", "site:2", "--output", output, "--device", "cpu", "--models-dir", store_dir)
    assert not prepared or "Preparing the network" not in segmented.stdout + segmented.stderr, "prepared by training already"
    segmentation = io.read_segmentation(output)
    assert segmentation.grid.same_grid(io.read_image(case))
    assert [s.name for s in segmentation.segments] == ["liver", "liver lesion"]

    cli("models", "activate", "site:2", "--models-dir", store_dir)
    assert store.active_version("site") == 2
    cli("models", "rollback", "site", "--models-dir", store_dir)
    assert store.active_version("site") == 1 and store.folder("site:2").is_dir(), "rollback keeps the fine-tuned version"


def test_an_ensemble_of_folds_is_refused_for_fine_tuning_with_what_to_do(tiny_folders, tmp_path):
    store_dir = tmp_path / "store"
    cli("models", "import", tiny_folders["3d"], "--name", "folds", "--models-dir", store_dir, "--no-prepare")
    dataset = site_dataset(tmp_path / "siteB")
    train = ["train", "--dataset", dataset, "--base", "folds", "--name", "folds", "--epochs", "1", "--steps", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "deepseg_core", *(str(a) for a in [*train, "--device", "cpu", "--models-dir", store_dir])],
        capture_output=True,
        text=True,
        cwd=REPO / "DeepSeg",
        check=False,
    )
    assert done.returncode != 0
    assert "is an ensemble of 2 networks ['fold_0', 'fold_1']" in done.stderr and "--folds 0" in done.stderr
    assert ModelStore(store_dir).versions("folds") == [1], "nothing stored"


def test_an_imported_nnunet_model_fine_tunes_under_two_process_ddp(sources, tmp_path):
    # nnU-Net weighs its lowest-resolution output 0; a head left out of the loss would stop DDP ("parameters that
    # were not used in producing loss"), so DeepSeg gives it a zero gradient instead
    folder, options = sources["nnunetv2"]
    store_dir = tmp_path / "store"
    cli("models", "import", folder, "--name", "site", "--models-dir", store_dir, "--no-prepare", *options)
    dataset = site_dataset(tmp_path / "siteB")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "deepseg_core"]
    command += ["train", "--dataset", str(dataset), "--base", "site", "--name", "site", "--epochs", "1", "--steps", "2"]
    command += ["--batch-size", "1", "--device", "cpu", "--json", "--models-dir", str(store_dir)]
    command += ["--checkpoints", str(tmp_path / "ck")]
    env = {**os.environ, "PYTHONPATH": str(REPO / "DeepSeg"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    reported = events(done)
    digests = {e["rank"]: e["weights_sha256"] for e in reported if e["event"] == "rank_done"}
    assert sorted(digests) == [0, 1] and digests[0] == digests[1]
    assert [e["model"] for e in reported if e["event"] == "done"] == ["site:2"]


def test_freezing_the_encoder_of_a_monai_network_is_refused_rather_than_reported_and_not_done(sources, tmp_path):
    """A MONAI bundle's network has no encoder module DeepSeg can tell apart: the run used to report every early
    epoch as `encoder_frozen` while it trained every weight. It is now refused before training, storing nothing."""
    from deepseg_core.errors import ConfigError
    from deepseg_core.training.engine import RetrainConfig, retrain

    store_dir = tmp_path / "store"
    cli("models", "import", sources["monai_bundle"][0], "--name", "site", "--models-dir", store_dir, "--no-prepare")
    dataset = site_dataset(tmp_path / "siteB")
    config = RetrainConfig(epochs=1, steps_per_epoch=1, batch_size=1, freeze_encoder_epochs=1)
    with pytest.raises(ConfigError, match="has no encoder DeepSeg can tell apart") as refused:
        retrain(dataset, "site", config, tmp_path / "ck", base="site", store=ModelStore(store_dir))
    assert "--freeze-encoder-epochs 0" in str(refused.value)
    assert ModelStore(store_dir).versions("site") == [1] and not (tmp_path / "ck").exists()
