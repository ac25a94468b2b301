"""The DeepSeg panel's decisions on a real MRML scene: the model list and the saved choice, a fresh
Slicer (no torch, no jsonschema) that still lists models and offers the install, Segment through
the panel with a real engine process, Cancel, Undo, scene close and export."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from deepseg_core import io
from deepseg_core.datasets import Dataset
from deepseg_core.demo import DEFAULT_MODEL, SAMPLE_VOLUME
from deepseg_core.phantoms import PHANTOM_LABELS
from DeepSegLib.mrml_bridge import node_from_volume, segment_mask, segments_by_name
from DeepSegLib.panel_logic import DeepSegPanelLogic, FoldChoice, PanelError, PanelSettings, fold_choices, progress_text
from DeepSegLib.scene_logic import PREDICTION_ATTRIBUTE

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def store_dir(tmp_path) -> str:
    return str(tmp_path / "store")


@pytest.fixture(autouse=True)
def _prediction_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


def copy_model(store: Path, name: str, version: int, active: int | None = None) -> None:
    """A store entry made of the bundled model's files (the catalog reads only model.json)."""
    folder = store / name / str(version)
    folder.mkdir(parents=True)
    card = json.loads((DEFAULT_MODEL / "model.json").read_text())
    card.update(name=name, version=version)
    (folder / "model.json").write_text(json.dumps(card))
    (folder / "weights.safetensors").write_bytes((DEFAULT_MODEL / "weights.safetensors").read_bytes())
    if active is not None:
        (store / name / "state.json").write_text(json.dumps({"active": active, "history": [active]}))


def run_panel(panel: DeepSegPanelLogic, settings: PanelSettings, timeout_s: float = 300) -> list[int]:
    """Poll as the panel's timer does; returns the progress values seen."""
    seen = []
    deadline = time.monotonic() + timeout_s
    while panel.poll(settings):
        seen.append(panel.view.progress_percent)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return seen


def test_the_model_shown_is_the_model_saved_on_first_open_and_after_a_scene_close(mrml_scene, store_dir):
    copy_model(Path(store_dir), "liver-site", 1)
    copy_model(Path(store_dir), "liver-site", 2, active=1)
    panel = DeepSegPanelLogic(mrml_scene, models_dir=store_dir)
    settings = PanelSettings()  # a new parameter node: model ""
    panel.refresh_models(settings)
    labels = [entry.label for entry in panel.view.models]
    assert labels == ["liver-site v1 (active)", "liver-site v2", "phantom-liver v1 (bundled)"]
    assert settings.model == "liver-site:1" and panel.view.model_index == 0
    panel.choose_model(settings, 2)
    assert settings.model == panel.view.models[2].ref and "Validation Dice: liver 0.998" in panel.view.model_description
    after_close = PanelSettings()  # the scene was closed: a fresh parameter node
    panel.sync_model(after_close)
    assert after_close.model == "liver-site:1"
    kept = PanelSettings(model="liver-site:2")  # a saved scene's choice is kept when still listed
    panel.sync_model(kept)
    assert kept.model == "liver-site:2" and panel.view.model_index == 1


def test_an_unreadable_model_folder_is_reported_and_hides_nothing(mrml_scene, store_dir):
    copy_model(Path(store_dir), "good", 1)
    broken = Path(store_dir) / "broken" / "1"
    broken.mkdir(parents=True)
    (broken / "model.json").write_text("{not json")
    panel = DeepSegPanelLogic(mrml_scene, models_dir=store_dir)
    panel.refresh_models(PanelSettings())
    assert [entry.ref for entry in panel.view.models][:1] == ["good:1"]
    assert "broken/1/model.json: model card cannot be read as JSON" in panel.view.status


def test_a_fresh_slicer_without_torch_or_jsonschema_lists_models_and_offers_the_install(tmp_path):
    """Run as a separate interpreter in which torch, jsonschema, safetensors and slicerio cannot be imported."""
    copy_model(tmp_path / "store", "liver-site", 3)
    probe = REPO / "Testing" / "probes" / "fresh_slicer_panels.py"
    result = subprocess.run(
        [sys.executable, str(probe), str(REPO), str(tmp_path / "store")], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["loaded"] == [], "a Slicer-side module imported an engine-only package"
    assert {"DeepSegLib.panel_logic", "DeepSegLib.effect_logic", "DeepSegTrainingLib.training_panel_logic"} <= set(
        seen["imported"]
    )
    assert seen["models"] == ["liver-site v3 (active)", "phantom-liver v1 (bundled)"]
    assert seen["model_saved"] == "liver-site:3" and "labels: 1=liver, 2=liver lesion" in seen["description"]
    assert {"torch", "jsonschema", "safetensors", "slicerio"} <= set(seen["offer_missing"])
    assert "Install them now?" in seen["offer_message"] and "torch>=2.2" in seen["offer_message"]
    assert "not installed yet" in seen["refusal"] and not seen["job_started"]
    assert seen["training_base_models"][1:] == seen["models"] and seen["training_base_saved"] == "liver-site:3"
    assert seen["effect_labels"] == ["liver", "liver lesion"]
    assert seen["device_info"]


def test_segment_requests_name_what_is_missing(mrml_scene, store_dir):
    panel = DeepSegPanelLogic(mrml_scene, models_dir=store_dir)
    settings = PanelSettings()
    with pytest.raises(PanelError, match="Choose a model first"):
        panel.segment_request(settings)
    panel.refresh_models(settings)
    with pytest.raises(PanelError, match="Choose an input volume first"):
        panel.segment_request(settings)
    settings.inputVolume = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    settings.device = "gpu"
    with pytest.raises(PanelError, match="Unknown device 'gpu'; choose one of auto, cuda, cpu"):
        panel.segment_request(settings)
    settings.device = "cpu"
    request = panel.segment_request(settings)
    assert (request.model, request.device, request.instances, request.measurements) == (str(DEFAULT_MODEL), "cpu", True, True)
    assert (request.backend, request.precision) == ("auto", "float32")
    settings.backend, settings.precision = "onnxruntime", "bfloat16"
    with pytest.raises(PanelError, match="ONNX Runtime has no bfloat16: choose precision float32"):
        panel.segment_request(settings)
    settings.backend = "openvino"
    assert panel.segment_request(settings).precision == "bfloat16"


def test_progress_text():
    assert progress_text({"event": "progress", "done": 9, "total": 18, "eta_s": 3.2}) == (50, "Tile 9/18, about 3 s left")
    assert progress_text({"event": "case_failed", "error": "bad"})[1] == "Failed: bad"
    # the engine exporting the network before the first tile: a line instead of a bar standing at 0
    assert progress_text({"event": "status", "message": "Preparing the network..."}) == (None, "Preparing the network...")


def test_segment_through_the_panel_then_undo_then_export(mrml_scene, store_dir, engine_python, tmp_path):
    volume = io.read_image(SAMPLE_VOLUME)
    volume_node = node_from_volume(mrml_scene, volume, "sample")
    panel = DeepSegPanelLogic(mrml_scene, models_dir=store_dir, python=engine_python)
    settings = PanelSettings(inputVolume=volume_node, device="cpu", uncertainty=True)
    panel.refresh_models(settings)
    panel.start_segment(settings)
    assert not panel.view.segment_enabled and panel.view.cancel_enabled
    with pytest.raises(PanelError, match="already running"):
        panel.start_segment(settings)
    progress = run_panel(panel, settings)
    assert progress and max(progress) == 100 and panel.view.segment_enabled and not panel.view.cancel_enabled
    assert panel.view.status.startswith("Done in ") and "Segments written to sample DeepSeg" in panel.view.status
    assert panel.view.domain_text == "Input looks like the model's training data." and panel.view.domain_colour == "green"
    output = settings.outputSegmentation
    names = sorted(segments_by_name(output))
    assert names[0] == "liver" and all(n.startswith("liver lesion ") for n in names[1:])
    assert panel.view.undo_enabled and panel.view.show_measurements_enabled and panel.measurement_table is not None
    assert panel.view.uncertain_regions_text.endswith("uncertain region(s).")
    liver = segment_mask(output, segments_by_name(output)["liver"], volume)

    dataset = tmp_path / "ds"
    Dataset.create(dataset, "site", PHANTOM_LABELS, ("CT",))
    with pytest.raises(PanelError, match="Enter a case id"):
        panel.export(settings)
    settings.datasetFolder, settings.caseId = dataset, "case01"
    panel.export(settings)
    assert panel.view.export_status.startswith("Case case01 added to ") and "(0 voxels changed)" in panel.view.export_status
    np.testing.assert_array_equal(Dataset.open(dataset).load_case("case01")[1].array_zyx == 1, liver)

    cached_prediction = Path(output.GetAttribute(PREDICTION_ATTRIBUTE))
    assert cached_prediction.is_file()
    panel.undo()
    assert output.GetSegmentation().GetNumberOfSegments() == 0 and panel.measurement_table is None
    assert panel.view.status == "Last Segment undone." and not panel.view.undo_enabled
    # the undone run's prediction went with it: no node refers to it any more
    assert output.GetAttribute(PREDICTION_ATTRIBUTE) is None and not cached_prediction.exists()


def test_cancel_through_the_panel_says_cancelled_and_leaves_the_scene_as_it_was(mrml_scene, store_dir, engine_python):
    volume_node = node_from_volume(mrml_scene, io.read_image(SAMPLE_VOLUME), "sample")
    nodes_before = mrml_scene.GetNumberOfNodes()
    panel = DeepSegPanelLogic(mrml_scene, models_dir=store_dir, python=engine_python)
    settings = PanelSettings(inputVolume=volume_node, device="cpu", uncertainty=True)
    panel.refresh_models(settings)
    job = panel.start_segment(settings)
    deadline = time.monotonic() + 120
    while not any(e.get("event") == "progress" for e in job.events):
        assert panel.poll(settings) and time.monotonic() < deadline
        time.sleep(0.05)
    panel.cancel()
    assert panel.view.status == "Cancelling..." and not panel.view.cancel_enabled
    run_panel(panel, settings, timeout_s=60)
    assert panel.view.status == "Cancelled; the scene is unchanged." and panel.view.segment_enabled
    assert job.outcome == "cancelled" and not job.workdir.exists()
    assert mrml_scene.GetNumberOfNodes() == nodes_before and settings.outputSegmentation is None


def test_a_scene_close_during_a_run_never_applies_its_result(mrml_scene, store_dir, engine_python):
    volume_node = node_from_volume(mrml_scene, io.read_image(SAMPLE_VOLUME), "sample")
    panel = DeepSegPanelLogic(mrml_scene, models_dir=store_dir, python=engine_python)
    settings = PanelSettings(inputVolume=volume_node, device="cpu")
    panel.refresh_models(settings)
    panel.start_segment(settings)
    panel.abandon()
    run_panel(panel, None, timeout_s=60)
    assert panel.view.status == "Cancelled; the scene is unchanged." and panel.job is None


def test_a_run_puts_its_result_on_the_volume_it_read_even_when_the_selectors_changed_meanwhile(
    mrml_scene, store_dir, engine_python, tmp_path
):
    """The user picks another volume of the same grid (a second series) and another output while Segment runs:
    the labels still go onto the volume the run read, into the output chosen at the click, and the export
    refuses to pair them with the other volume."""
    volume = io.read_image(SAMPLE_VOLUME)
    segmented = node_from_volume(mrml_scene, volume, "series 1")
    other = node_from_volume(mrml_scene, dataclasses.replace(volume, array_zyx=-volume.array_zyx), "series 2")
    chosen_output = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "chosen at the click")
    other_output = mrml_scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "chosen during the run")
    panel = DeepSegPanelLogic(mrml_scene, models_dir=store_dir, python=engine_python)
    settings = PanelSettings(inputVolume=segmented, outputSegmentation=chosen_output, device="cpu")
    panel.refresh_models(settings)
    panel.start_segment(settings)
    settings.inputVolume, settings.outputSegmentation = other, other_output
    run_panel(panel, settings)
    assert panel.view.status.startswith("Done in ") and "Segments written to chosen at the click" in panel.view.status
    assert other_output.GetSegmentation().GetNumberOfSegments() == 0
    assert "liver" in segments_by_name(chosen_output)
    assert chosen_output.GetNodeReference("DeepSeg.InputVolume") is segmented

    dataset = tmp_path / "ds"
    Dataset.create(dataset, "site", PHANTOM_LABELS, ("CT",))
    settings.outputSegmentation, settings.datasetFolder, settings.caseId = chosen_output, dataset, "case01"
    with pytest.raises(io.ImageError, match=r"not made on the input volume.*'series 1'.*found 'series 2'"):
        panel.export(settings)
    assert Dataset.open(dataset).cases == {}
    settings.inputVolume = segmented
    panel.export(settings)
    assert panel.view.export_status.startswith("Case case01 added to ")


def test_a_volume_removed_during_the_run_gets_no_result(mrml_scene, store_dir, engine_python):
    volume_node = node_from_volume(mrml_scene, io.read_image(SAMPLE_VOLUME), "sample")
    panel = DeepSegPanelLogic(mrml_scene, models_dir=store_dir, python=engine_python)
    settings = PanelSettings(inputVolume=volume_node, device="cpu")
    panel.refresh_models(settings)
    panel.start_segment(settings)
    created = settings.outputSegmentation
    mrml_scene.RemoveNode(volume_node)
    settings.inputVolume = None
    run_panel(panel, settings)
    assert panel.view.status.endswith("was removed from the scene while it ran: its result was not applied.")
    assert not mrml_scene.IsNodePresent(created) and settings.outputSegmentation is None
    assert not panel.view.undo_enabled


def test_import_model_through_the_panel_selects_the_new_version(
    mrml_scene, store_dir, engine_python, engine_prepares_for, tmp_path
):
    panel = DeepSegPanelLogic(mrml_scene, models_dir=store_dir, python=engine_python)
    settings = PanelSettings()
    panel.refresh_models(settings)
    with pytest.raises(PanelError, match="Choose the folder of a trained model"):
        panel.start_import(str(tmp_path / "missing"))
    panel.start_import(str(tmp_path))  # a folder that holds no model
    run_panel(panel, settings, timeout_s=120)
    assert panel.view.status.startswith("Import failed: ") and "not a model folder DeepSeg can import" in panel.view.status
    copy_model(tmp_path / "elsewhere", "site-model", 1)  # a DeepSeg model folder outside the store
    job = panel.start_import(str(tmp_path / "elsewhere" / "site-model" / "1"))
    assert not panel.view.segment_enabled
    run_panel(panel, settings, timeout_s=120)
    assert panel.view.status == "Imported site-model:1; it is selected."
    # the engine prepared the network for this computer's CPU runtime as part of the import (on CUDA: nothing to do)
    expected = ["imported"] if engine_prepares_for == "torch" else ["imported", "status", "prepared"]
    assert [e["event"] for e in job.events] == expected
    assert settings.model == "site-model:1" and panel.view.models[panel.view.model_index].ref == "site-model:1"


def test_cancel_while_an_import_prepares_the_network_keeps_the_imported_model(
    mrml_scene, engine_python, engine_prepares_for, tmp_path
):
    """Cancel lands after the model was stored, while its network is exported for this computer: the
    panel selects the imported model and says the first run will prepare it (not "Import failed")."""
    if engine_prepares_for == "torch":
        pytest.skip("PyTorch runs it on CUDA: nothing is prepared")
    store = tmp_path / "store"  # its own store: nothing exported yet, so the preparation takes seconds
    panel = DeepSegPanelLogic(mrml_scene, models_dir=str(store), python=engine_python)
    settings = PanelSettings()
    copy_model(tmp_path / "elsewhere", "site-model", 1)
    job = panel.start_import(str(tmp_path / "elsewhere" / "site-model" / "1"))
    try:
        deadline = time.monotonic() + 120
        while not any(event.get("event") == "status" for event in job.events):
            assert panel.poll(settings), f"the import ended before it said it was preparing: {job.events}"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert panel.view.status.startswith("Preparing")
        panel.cancel()
        run_panel(panel, settings, timeout_s=120)
    finally:
        panel.close()  # a failed assertion above must not leave the engine running
    assert [event["event"] for event in job.events] == ["imported", "status"] and job.outcome == "cancelled"
    # The engine's own words and code, not only the panel's view of a cancel. (Once it ended with -2, SIGINT,
    # after this message: a KeyboardInterrupt out of main, which the program now ends as 130, cli.run.)
    engine_said = "\n".join(job._stderr[-20:])
    assert job.returncode == 130 and "cancelled: site-model:1 is imported" in job.error, f"exit {job.returncode}: {engine_said}"
    assert panel.view.status == "Imported site-model:1; preparing it for this computer was cancelled (its first run will)."
    assert settings.model == "site-model:1" and panel.view.models[panel.view.model_index].ref == "site-model:1"
    assert panel.view.segment_enabled and not panel.view.cancel_enabled


def test_a_cancel_after_the_engine_said_prepared_is_a_finished_import(mrml_scene, engine_python, engine_prepares_for, tmp_path):
    """Cancel clicked after the engine's "prepared" event, while its process is still ending: the import
    and the preparation are complete, so the panel says so (not "preparing ... was cancelled")."""
    if engine_prepares_for == "torch":
        pytest.skip("PyTorch runs it on CUDA: nothing is prepared")
    copy_model(tmp_path / "elsewhere", "site-model", 1)
    tries = []
    for attempt in range(5):  # the engine ends about 0.1 s after its last event: Cancel must land before that
        store = tmp_path / f"store{attempt}"  # a store of its own: the network is prepared anew each time
        panel = DeepSegPanelLogic(mrml_scene, models_dir=str(store), python=engine_python)
        settings = PanelSettings()
        job = panel.start_import(str(tmp_path / "elsewhere" / "site-model" / "1"))
        try:
            deadline = time.monotonic() + 120
            while panel.poll(settings) and not any(event.get("event") == "prepared" for event in job.events):
                assert time.monotonic() < deadline
                time.sleep(0.02)
            panel.cancel()
            run_panel(panel, settings, timeout_s=120)
        finally:
            panel.close()
        tries.append((job.cancel_requested, job.returncode))
        if job.cancel_requested:
            break
    assert job.cancel_requested, f"the engine had always exited before Cancel (cancel landed, exit code): {tries}"
    assert [event["event"] for event in job.events] == ["imported", "status", "prepared"] and job.outcome == "cancelled"
    assert panel.view.status == "Imported site-model:1; it is selected."
    assert settings.model == "site-model:1" and panel.view.models[panel.view.model_index].ref == "site-model:1"


def nnunet_layout(folder: Path, folds: list[str], checkpoint: str = "checkpoint_final.pth") -> Path:
    """The file names of an nnU-Net results folder (the panel reads names only, never the files)."""
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text("{}")
    (folder / "dataset.json").write_text("{}")
    for fold in folds:
        (folder / f"fold_{fold}").mkdir()
        (folder / f"fold_{fold}" / checkpoint).write_bytes(b"")
    return folder


def test_import_asks_for_folds_only_for_nnunet_folders_with_several(tmp_path):
    five = nnunet_layout(tmp_path / "five", ["0", "1", "2", "3", "4", "all"])
    (five / "fold_5").mkdir()  # a fold still training: no final checkpoint yet
    choices = fold_choices(five)
    assert choices[0] == FoldChoice("All 5 folds (nnU-Net's ensemble: about 5x the time of one)", None)
    assert [c.folds for c in choices[1:]] == [("0",), ("1",), ("2",), ("3",), ("4",)]
    assert choices[3].label == "Fold 2 only"
    assert fold_choices(nnunet_layout(tmp_path / "one", ["0"])) == [], "one fold: nothing to choose"
    assert fold_choices(nnunet_layout(tmp_path / "best", ["0", "1"], "checkpoint_best.pth")) == []
    copy_model(tmp_path / "store", "site-model", 1)
    assert fold_choices(tmp_path / "store" / "site-model" / "1") == [], "a DeepSeg model has no folds"
    assert fold_choices(tmp_path / "missing") == []


def test_an_nnunet_import_through_the_panel_runs_only_the_fold_chosen(mrml_scene, store_dir, engine_python):
    """nnU-Net's own tiny results folder (folds 0 and 1, built by scripts/make_tiny_nnunet_model.py in
    the engine's Python, cached), imported with fold 1 only: the new version's ensemble is that fold."""
    built = subprocess.run(
        [engine_python, str(REPO / "scripts" / "make_tiny_nnunet_model.py"), "--print-path"],
        capture_output=True,
        text=True,
        timeout=900,
        check=True,
    )
    folder = Path(built.stdout.strip().splitlines()[-1]) / "Dataset501_DeepSegTiny" / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    choices = fold_choices(folder)
    assert [c.folds for c in choices] == [None, ("0",), ("1",)]
    panel = DeepSegPanelLogic(mrml_scene, models_dir=store_dir, python=engine_python)
    settings = PanelSettings()
    panel.start_import(str(folder), folds=choices[2].folds)
    assert panel.view.status.endswith("(fold 1)...")
    run_panel(panel, settings, timeout_s=300)
    assert panel.view.status == "Imported Dataset501_DeepSegTiny:1 from nnunetv2; it is selected."
    card = json.loads((Path(store_dir) / "Dataset501_DeepSegTiny" / "1" / "model.json").read_text())
    assert card["ensemble"] == ["fold_1"] and card["source"]["folds"] == ["fold_1"]
