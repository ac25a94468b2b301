"""DeepSegTraining's panel logic on a real MRML scene: a real `deepseg train` process tree, events ->
table and plot nodes, Stop and Resume, the comparison table, Promote / Keep old / Roll back."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from deepseg_core.datasets import Dataset
from deepseg_core.demo import DEFAULT_MODEL, SAMPLE_SPACING_XYZ_MM
from deepseg_core.model_store import ModelStore
from deepseg_core.phantoms import PHANTOM_LABELS, generate_phantom
from DeepSegTrainingLib.training_panel_logic import FROM_SCRATCH_REF, TrainingPanelError, TrainingPanelLogic, TrainingSettings
from DeepSegTrainingLib.training_run import (
    TrainingCurves,
    TrainingRequest,
    comparison_table,
    parse_label_mapping_text,
    preparation_outcome,
    start_training,
    version_stored_by_run,
)

LABELS = [label.name for label in PHANTOM_LABELS]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("train") / "siteB"
    dataset = Dataset.create(root, "siteB", PHANTOM_LABELS, ("CT",))
    for seed in range(3):
        p = generate_phantom(seed=700 + seed, profile="ct-B", shape_zyx=(32, 64, 64), spacing_xyz_mm=SAMPLE_SPACING_XYZ_MM)
        dataset.add_case(f"c{seed}", [p.image], p.labels.array_zyx.astype(np.uint8))
    return str(root)


@pytest.fixture()
def store_dir(tmp_path):
    return str(tmp_path / "store")  # the default case: users have only the bundled phantom-liver v1


def run_panel(panel: TrainingPanelLogic, settings: TrainingSettings, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while panel.poll(settings):
        assert time.monotonic() < deadline, "training did not finish"
        time.sleep(0.05)


def poll_until_the_engine_says(panel: TrainingPanelLogic, settings: TrainingSettings, event_name: str, waiting_for: str):
    """Poll the running training until it has sent an ``event_name`` event (Stop is pressed then)."""
    deadline = time.monotonic() + 300
    while not any(e.get("event") == event_name for e in panel.job.events):
        assert panel.poll(settings), f"training finished before {waiting_for}: {panel.view.status}"
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_base_models_and_the_saved_choice(mrml_scene, store_dir):
    panel = TrainingPanelLogic(mrml_scene, models_dir=store_dir)
    settings = TrainingSettings()
    panel.refresh_models(settings)
    assert panel.view.base_models == [("(from scratch)", FROM_SCRATCH_REF), ("phantom-liver v1 (bundled)", str(DEFAULT_MODEL))]
    assert settings.baseModel == str(DEFAULT_MODEL) and panel.view.base_index == 1
    assert not panel.view.rollback_enabled  # a bundled model has no activation history
    panel.choose_base(settings, 0)
    assert settings.baseModel == FROM_SCRATCH_REF
    panel.refresh_models(settings)
    assert settings.baseModel == FROM_SCRATCH_REF, "a deliberate 'from scratch' stays chosen"
    with pytest.raises(TrainingPanelError, match="Choose a dataset folder"):
        panel.training_request(settings)


def test_train_compare_keep_old_promote_and_roll_back_through_the_panel(
    mrml_scene, dataset_dir, store_dir, engine_python, engine_prepares_for, tmp_path
):
    panel = TrainingPanelLogic(mrml_scene, models_dir=store_dir, python=engine_python, checkpoints_root=str(tmp_path))
    settings = TrainingSettings(datasetFolder=dataset_dir, epochs=2, stepsPerEpoch=1, device="cpu")
    panel.refresh_models(settings)
    panel.dataset_changed(settings)
    assert panel.view.dataset_info.startswith("3 case(s)")
    request = panel.training_request(settings)
    assert (request.name, request.base, request.epochs) == ("phantom-liver", str(DEFAULT_MODEL), 2)
    panel.start(settings)
    assert not panel.view.start_enabled and panel.view.stop_enabled
    run_panel(panel, settings)
    assert panel.view.start_enabled and not panel.view.stop_enabled and panel.view.progress_percent == 100
    table = panel.curves.table.GetTable()
    assert table.GetNumberOfRows() == 2 and table.GetValue(1, 0).ToDouble() == 2.0
    assert panel.curves.chart.GetNumberOfPlotSeriesNodes() == 1 + len(LABELS)
    done = panel.done_event
    assert done["model"] == "phantom-liver:2" and done["parent"] == "phantom-liver:1"
    assert "not active yet" in panel.view.status and panel.view.promote_enabled and panel.view.keep_old_enabled
    if engine_prepares_for != "torch":  # the engine prepared the new version's network while the user compared
        assert panel.view.status.startswith("Done: phantom-liver:2 stored (not active yet). Compare, then Promote or Keep old.")
        assert f" Prepared phantom-liver:2 for {engine_prepares_for} on this computer in " in panel.view.status, panel.view.status
        assert not settings.resume
    compare = panel.view.comparison_table.GetTable()
    assert compare.GetNumberOfRows() == len(LABELS) + 1 and compare.GetValue(0, 0).ToString() == "liver"
    validation_cases = str(len(Dataset.open(dataset_dir).ensure_split()["validation"]))
    last = [compare.GetValue(len(LABELS), column).ToString() for column in range(4)]
    assert last == ["validation cases", validation_cases, validation_cases, ""] and done["validation_cases"] >= 1
    assert float(compare.GetValue(0, 2).ToString()) == pytest.approx(done["validation"]["liver"]["dice"], abs=5e-4)
    store = ModelStore(store_dir)
    assert store.versions("phantom-liver") == [1, 2]  # the bundled parent is now a real store version
    assert store.active_version("phantom-liver") == 1  # nothing changed for users before Promote
    panel.keep_old()
    assert store.active_version("phantom-liver") == 1 and not panel.view.promote_enabled
    panel.done_event = done
    panel.promote(settings)
    assert store.active_version("phantom-liver") == 2
    assert panel.view.status == "phantom-liver:2 is now active (was phantom-liver:1). Roll back returns to it."
    settings.baseModel = "phantom-liver:2"
    panel.refresh_models(settings)
    assert panel.view.rollback_enabled
    panel.rollback(settings)
    assert store.active_version("phantom-liver") == 1 and settings.baseModel == "phantom-liver:1"
    assert panel.view.status == "phantom-liver: active version is 1 again (was 2)."


def test_the_comparison_of_a_model_trained_from_scratch_has_no_parent_column(mrml_scene):
    done = {"model": "new:1", "parent": None, "validation": {"liver": {"dice": 0.8}}, "parent_validation": None}
    table = comparison_table(mrml_scene, {**done, "validation_cases": 2}).GetTable()
    rows = [[table.GetValue(row, column).ToString() for column in range(4)] for row in range(table.GetNumberOfRows())]
    assert rows == [["liver", "-", "0.800", "-"], ["validation cases", "-", "2", ""]]


def test_the_comparison_shows_a_region_models_regions_beside_its_values(mrml_scene):
    # a region-based nnU-Net model's done event (deepseg train --json) scores its multi-value region as a row of its own
    done = {
        "model": "brats:2",
        "parent": "brats:1",
        "validation": {
            "whole tumor excluding tumor core": {"dice": 0.71, "hd95_mm": 4.0},
            "whole tumor": {"dice": 0.9, "hd95_mm": 3.0, "region": True, "values": [1, 2, 3]},
        },
        "parent_validation": {
            "whole tumor excluding tumor core": {"dice": 0.61, "hd95_mm": 5.0},
            "whole tumor": {"dice": 0.85, "hd95_mm": 3.5, "region": True, "values": [1, 2, 3]},
        },
    }
    table = comparison_table(mrml_scene, done).GetTable()
    rows = [[table.GetValue(row, column).ToString() for column in range(4)] for row in range(table.GetNumberOfRows())]
    assert rows == [
        ["whole tumor excluding tumor core", "0.610", "0.710", "+0.100"],
        ["whole tumor (values 1, 2, 3)", "0.850", "0.900", "+0.050"],
    ]


def test_the_live_curves_add_a_region_models_regions_when_they_are_first_scored(mrml_scene):
    # epoch_end events of a region-based nnU-Net model (deepseg train --json): validation on epoch 2 only
    curves = TrainingCurves(mrml_scene, ["edema", "tumor core"], name="brats")
    curves.add_event({"event": "epoch_end", "epoch": 1, "loss": 0.9})
    region = {"dice": 0.8, "region": True, "values": [1, 2]}
    validation = {"edema": {"dice": 0.5}, "tumor core": {"dice": 0.6}, "whole tumor": region}
    curves.add_event({"event": "epoch_end", "epoch": 2, "loss": 0.7, "validation": validation})
    table = curves.table.GetTable()
    columns = [table.GetColumnName(column) for column in range(table.GetNumberOfColumns())]
    assert columns == ["epoch", "loss", "Dice edema", "Dice tumor core", "Dice whole tumor (values 1, 2)"]
    rows = [[table.GetValue(row, column).ToDouble() for column in range(5)] for row in range(2)]
    assert rows[1] == [2.0, 0.7, 0.5, 0.6, 0.8]
    assert rows[0][:2] == [1.0, 0.9] and all(np.isnan(value) for value in rows[0][2:])
    chart = curves.chart
    plotted = [chart.GetNthPlotSeriesNode(index).GetYColumnName() for index in range(chart.GetNumberOfPlotSeriesNodes())]
    assert plotted == columns[1:]


def test_stop_keeps_the_checkpoint_ticks_resume_and_resume_finishes(mrml_scene, dataset_dir, store_dir, engine_python, tmp_path):
    panel = TrainingPanelLogic(mrml_scene, models_dir=store_dir, python=engine_python, checkpoints_root=str(tmp_path))
    settings = TrainingSettings(datasetFolder=dataset_dir, epochs=6, stepsPerEpoch=2, device="cpu")
    panel.refresh_models(settings)
    job = panel.start(settings)
    poll_until_the_engine_says(panel, settings, "epoch_end", "Stop could be pressed")
    panel.stop()
    run_panel(panel, settings, timeout_s=60)
    assert job.outcome == "cancelled" and settings.resume
    assert panel.view.status.startswith("Stopped; the last finished epoch is checkpointed.")
    assert ModelStore(store_dir).names() == []  # a stopped run stores nothing
    resumed = panel.start(settings)
    run_panel(panel, settings)
    first = next(e for e in resumed.events if e["event"] == "resumed")["epoch"]
    epochs = [e["epoch"] for e in resumed.events if e["event"] == "epoch_end"]
    assert first >= 1 and epochs == list(range(first + 1, 7))
    assert ModelStore(store_dir).versions("phantom-liver") == [1, 2]
    assert not settings.resume, "the next Start trains anew: resuming the stored run would store its weights again"


def test_a_stop_killing_the_run_after_it_stored_the_version_offers_that_version_not_resume(
    mrml_scene, dataset_dir, store_dir, engine_python, tmp_path
):
    """Stop waits 5 s for the engine, then kills it. Landing after the new version was stored but before the
    checkpoint recorded it, the kill left the panel saying "Tick Resume", and the resume stored the same weights
    again as the next version. The panel now finds the version by the run id its card keeps, shows its comparison
    from the card and offers Promote; a resume is refused by the engine (Testing/core/test_retrain.py)."""
    launcher = [engine_python, str(Path(__file__).with_name("engine_killed_after_storing.py"))]
    panel = TrainingPanelLogic(mrml_scene, models_dir=store_dir, python=launcher, checkpoints_root=str(tmp_path))
    settings = TrainingSettings(datasetFolder=dataset_dir, epochs=1, stepsPerEpoch=1, device="cpu")
    panel.refresh_models(settings)
    job = panel.start(settings)
    checkpoints = tmp_path / "phantom-liver"
    deadline = time.monotonic() + 300
    while version_stored_by_run(checkpoints, store_dir) is None:
        assert panel.poll(settings), f"training ended before it stored the version: {panel.view.status}"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    panel.stop()
    run_panel(panel, settings, timeout_s=60)
    assert job.outcome == "cancelled" and not any(e.get("event") == "done" for e in job.events)
    assert "stored_as" not in json.loads((checkpoints / "last" / "state.json").read_text()), "the kill came before it"
    assert not settings.resume
    assert panel.view.status == "Stopped after phantom-liver:2 was stored (not active yet). Compare, then Promote or Keep old."
    card = ModelStore(store_dir).card("phantom-liver:2")
    compare = panel.view.comparison_table.GetTable()
    rows = [[compare.GetValue(row, column).ToString() for column in range(3)] for row in range(compare.GetNumberOfRows())]
    assert rows[: len(LABELS)] == [
        [label, f"{card.metrics['parent_validation']['dice'][label]:.3f}", f"{card.metrics['validation']['dice'][label]:.3f}"]
        for label in LABELS
    ]
    assert compare.GetColumnName(1) == "Dice phantom-liver:1" and rows[-1][0] == "validation cases"
    assert panel.view.promote_enabled and panel.view.keep_old_enabled
    assert ModelStore(store_dir).versions("phantom-liver") == [1, 2]
    panel.promote(settings)
    assert ModelStore(store_dir).active_version("phantom-liver") == 2


def training_that_prepares(mrml_scene, dataset_dir, store_dir, engine_python, engine_prepares_for, tmp_path):
    """A one-step training through the panel, polled until the engine has stored the new version and says it
    prepares its network: ``(panel, settings, job)``. Skips where nothing is prepared."""
    if engine_prepares_for == "torch":
        pytest.skip("PyTorch runs it (CUDA, or no CPU runtime): nothing is prepared")
    panel = TrainingPanelLogic(mrml_scene, models_dir=store_dir, python=engine_python, checkpoints_root=str(tmp_path))
    settings = TrainingSettings(datasetFolder=dataset_dir, epochs=1, stepsPerEpoch=1, device="cpu")
    panel.refresh_models(settings)
    job = panel.start(settings)
    poll_until_the_engine_says(panel, settings, "status", "it prepared the new version")
    return panel, settings, job


def test_stop_while_the_new_version_is_prepared_keeps_it_and_does_not_offer_resume(
    mrml_scene, dataset_dir, store_dir, engine_python, engine_prepares_for, tmp_path
):
    """Stop after the engine stored the new version, while it prepares its network: the version, the comparison
    and Promote stay, Resume is not ticked (there is nothing left to train), and the status says what was skipped."""
    panel, settings, job = training_that_prepares(
        mrml_scene, dataset_dir, store_dir, engine_python, engine_prepares_for, tmp_path
    )
    assert panel.view.status.startswith("Done: phantom-liver:2 stored (not active yet). Compare, then Promote or Keep old.")
    assert f"Preparing the network for {engine_prepares_for}" in panel.view.status, panel.view.status
    panel.stop()
    assert panel.view.status.endswith(" Stopping: its network is not prepared now; the new version stays.")
    run_panel(panel, settings, timeout_s=60)
    assert job.outcome == "cancelled" and not settings.resume
    assert panel.view.start_enabled and panel.view.promote_enabled and panel.view.keep_old_enabled
    assert ModelStore(store_dir).versions("phantom-liver") == [1, 2]
    if any(e.get("event") == "prepared" for e in job.events):  # Stop landed after the work: it is reported as done
        assert f" Prepared phantom-liver:2 for {engine_prepares_for}" in panel.view.status, panel.view.status
    else:
        assert panel.view.status == (
            "Done: phantom-liver:2 stored (not active yet). Compare, then Promote or Keep old. "
            "Stopped before its network was prepared for this computer: its first Segment will prepare it."
        )
        compiled = Path(store_dir) / ".cache" / "compiled"
        # a complete graph may be there (Stop landed while it compiled); a temporary one may not
        assert not list(compiled.glob(".*")), "no graph half-written by the stopped preparation"
    panel.promote(settings)
    assert ModelStore(store_dir).active_version("phantom-liver") == 2
    assert panel.view.status == "phantom-liver:2 is now active (was phantom-liver:1). Roll back returns to it."


def test_promote_and_roll_back_while_the_new_version_is_prepared(
    mrml_scene, dataset_dir, store_dir, engine_python, engine_prepares_for, tmp_path
):
    """Promote, then Roll back, while the engine still prepares the new version's network: each says what it did
    with the preparation still shown, the store ends on the old version, and the preparation's own ending follows
    the last decision (the new version stays prepared for a later Promote)."""
    panel, settings, job = training_that_prepares(
        mrml_scene, dataset_dir, store_dir, engine_python, engine_prepares_for, tmp_path
    )
    preparing = f"Preparing the network for {engine_prepares_for}"
    panel.promote(settings)
    assert ModelStore(store_dir).active_version("phantom-liver") == 2
    assert panel.view.status.startswith("phantom-liver:2 is now active (was phantom-liver:1). Roll back returns to it.")
    if panel.job is not None:  # still preparing: its line stays
        assert preparing in panel.view.status, panel.view.status
    panel.rollback(settings)
    assert ModelStore(store_dir).active_version("phantom-liver") == 1
    rolled_back = "phantom-liver: active version is 1 again (was 2)."
    assert panel.view.status.startswith(rolled_back), panel.view.status
    if panel.job is not None:
        assert preparing in panel.view.status, panel.view.status
    run_panel(panel, settings, timeout_s=120)
    assert job.outcome == "succeeded" and not settings.resume
    assert panel.view.status == f"{rolled_back} {preparation_outcome(job.events, job.returncode, False)}"
    assert panel.view.status.startswith(f"{rolled_back} Prepared phantom-liver:2 for {engine_prepares_for} on this computer")
    assert ModelStore(store_dir).versions("phantom-liver") == [1, 2]
    assert ModelStore(store_dir).active_version("phantom-liver") == 1


PREPARED = {"event": "prepared", "message": "prepared m:2 for openvino on this computer in 1.9 s"}
FIRST_SEGMENT, WILL_TRY = "its first Segment will prepare it.", "its first Segment will try again."
FELL_BACK = {"event": "prepared", "message": "m:2 is stored, but openvino could not run its network; it runs on PyTorch (x)"}


@pytest.mark.parametrize(
    "after_done, returncode, stopped, said",
    [
        ([{"event": "status"}, PREPARED], 0, False, "Prepared m:2 for openvino on this computer in 1.9 s."),
        ([{"event": "status"}, PREPARED], -15, True, "Prepared m:2 for openvino on this computer in 1.9 s."),
        ([FELL_BACK], 0, False, FELL_BACK["message"] + "."),
        ([], 0, False, ""),  # nothing to prepare: CUDA, or no CPU runtime
        ([], 130, True, ""),  # Stop before the engine said anything: it may have had nothing to prepare
        (
            [{"event": "status"}],
            130,
            True,
            "Stopped before its network was prepared for this computer: its first Segment will prepare it.",
        ),
        ([{"event": "status"}], 0, True, "Its network is prepared for this computer."),  # Stop after the work
        (
            [{"event": "status"}],
            0,
            False,
            "Its network could not be prepared for this computer; its first Segment will try again.",
        ),
        ([{"event": "status"}], 1, False, "Preparing its network for this computer failed; " + WILL_TRY),
    ],
)
def test_what_the_status_line_says_about_preparing_the_new_version(after_done, returncode, stopped, said):
    before = [{"event": "epoch_end"}, {"event": "status", "message": "an earlier status"}, {"event": "done", "model": "m:2"}]
    assert preparation_outcome([*before, *after_done], returncode, stopped) == said


def test_dropout_set_in_the_panel_is_trained_into_the_new_version(mrml_scene, dataset_dir, store_dir, engine_python, tmp_path):
    """Ticking Dropout gives the new version dropout layers (what Monte-Carlo dropout uncertainty
    needs), with every weight of the base (which has none) carried over; unticked passes nothing."""
    panel = TrainingPanelLogic(mrml_scene, models_dir=store_dir, python=engine_python, checkpoints_root=str(tmp_path))
    settings = TrainingSettings(datasetFolder=dataset_dir, epochs=1, stepsPerEpoch=1, device="cpu")
    panel.refresh_models(settings)
    assert panel.training_request(settings).dropout is None, "unticked: the base's own dropout"
    settings.setDropout, settings.dropout = True, 1.0
    with pytest.raises(TrainingPanelError, match="Dropout must be a probability from 0 to below 1, not 1"):
        panel.training_request(settings)
    settings.dropout = 0.2
    job = panel.start(settings)
    assert job.command[job.command.index("--dropout") + 1] == "0.2"
    run_panel(panel, settings)
    assert panel.done_event is not None and panel.done_event["model"] == "phantom-liver:2", panel.view.status
    store = ModelStore(store_dir)
    card = store.card("phantom-liver:2")
    assert card.architecture.config["dropout"] == pytest.approx(0.2)
    assert store.card("phantom-liver:1").architecture.config.get("dropout", 0.0) == 0.0


def test_the_panels_label_mapping_reaches_the_trainer_and_its_error_reaches_the_panel(
    dataset_dir, store_dir, tmp_path, engine_python
):
    assert parse_label_mapping_text(" tumor=liver lesion; ;Leber=liver ") == ("tumor=liver lesion", "Leber=liver")
    request = TrainingRequest(
        dataset_dir,
        "phantom-liver",
        base="phantom-liver",
        epochs=1,
        steps_per_epoch=1,
        label_mapping=parse_label_mapping_text("tumour=liver lesion"),
        checkpoints=str(tmp_path / "ck"),
        device="cpu",
        models_dir=store_dir,
    )
    job = start_training(request, engine_python)
    try:
        assert job.command[job.command.index("--map-label") + 1] == "tumour=liver lesion"
        assert job.wait(120) == 2
        assert "label mapping names labels the dataset does not have" in job.error and "tumour" in job.error
    finally:
        job.cleanup()
    assert ModelStore(store_dir).names() == []
