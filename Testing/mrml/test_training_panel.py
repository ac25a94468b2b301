"""DeepSegTraining's logic on a real MRML scene: a real `deepseg train` subprocess, events -> table and
plot nodes, stop and resume, the comparison table, promote / keep old."""

from __future__ import annotations

import time

import numpy as np
import pytest

slicer = pytest.importorskip("slicer")

from deepseg_core.datasets import Dataset  # noqa: E402
from deepseg_core.demo import DEFAULT_MODEL, SAMPLE_SPACING_XYZ_MM  # noqa: E402
from deepseg_core.model_store import ModelStore  # noqa: E402
from deepseg_core.phantoms import PHANTOM_LABELS, generate_phantom  # noqa: E402
from DeepSegTrainingLib.training_run import (  # noqa: E402
    TrainingCurves,
    TrainingRequest,
    comparison_table,
    parse_label_mapping_text,
    promote,
    start_training,
    status_text,
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
    store = ModelStore(tmp_path / "store")
    store.import_folder(DEFAULT_MODEL)  # phantom-liver:1 is the active version users have today
    return str(tmp_path / "store")


def _drain(job, curves, timeout_s=300):
    deadline = time.monotonic() + timeout_s
    while not job.finished and time.monotonic() < deadline:
        for event in job.poll():
            curves.add_event(event)
        time.sleep(0.05)
    job.wait(30)
    for event in job.poll():
        curves.add_event(event)
    return job.returncode


def test_training_run_fills_curves_and_comparison_then_promote(mrml_scene, dataset_dir, store_dir, tmp_path):
    request = TrainingRequest(
        dataset_dir,
        "phantom-liver",
        base="phantom-liver:1",
        epochs=2,
        steps_per_epoch=1,
        checkpoints=str(tmp_path / "ck"),
        device="cpu",
        models_dir=store_dir,
    )
    job = start_training(request)
    curves = TrainingCurves(mrml_scene, LABELS)
    try:
        assert _drain(job, curves) == 0, job.error
    finally:
        job.cleanup()
    table = curves.table.GetTable()
    assert table.GetNumberOfRows() == 2 and table.GetValue(1, 0).ToDouble() == 2.0
    assert 0.0 <= table.GetValue(1, 2).ToDouble() <= 1.0  # validation Dice of the liver
    assert curves.chart.GetNumberOfPlotSeriesNodes() == 1 + len(LABELS)
    assert curves.series[0].GetTableNodeID() == curves.table.GetID()
    done = next(e for e in job.events if e["event"] == "done")
    assert done["model"] == "phantom-liver:2" and done["parent"] == "phantom-liver:1"
    assert "not active yet" in status_text(done)
    compare = comparison_table(mrml_scene, done).GetTable()
    assert compare.GetNumberOfRows() == len(LABELS) and compare.GetValue(0, 0).ToString() == "liver"
    assert float(compare.GetValue(0, 2).ToString()) == pytest.approx(done["validation"]["liver"]["dice"], abs=5e-4)
    store = ModelStore(store_dir)
    assert store.active_version("phantom-liver") == 1  # Keep old: nothing changed for users
    assert promote("phantom-liver:2", store_dir) == "phantom-liver:1"
    assert store.active_version("phantom-liver") == 2
    store.rollback("phantom-liver")
    assert store.active_version("phantom-liver") == 1


def test_stop_keeps_the_checkpoint_and_resume_finishes(mrml_scene, dataset_dir, store_dir, tmp_path):
    checkpoints = str(tmp_path / "ck")
    request = TrainingRequest(
        dataset_dir,
        "phantom-liver",
        base="phantom-liver:1",
        epochs=6,
        steps_per_epoch=2,
        checkpoints=checkpoints,
        device="cpu",
        models_dir=store_dir,
    )
    job = start_training(request)
    curves = TrainingCurves(mrml_scene, LABELS)
    try:
        deadline = time.monotonic() + 300
        while not any(curves.add_event(e) for e in job.poll()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not job.finished, "training finished before Stop could be pressed"
        job.cancel()
        assert job.wait(60) == 130
    finally:
        job.cleanup()
    assert ModelStore(store_dir).versions("phantom-liver") == [1]  # a stopped run stores nothing
    resumed = start_training(TrainingRequest(**{**request.__dict__, "resume": True}))
    try:
        assert _drain(resumed, curves) == 0, resumed.error
    finally:
        resumed.cleanup()
    first = next(e for e in resumed.events if e["event"] == "resumed")["epoch"]
    epochs = [e["epoch"] for e in resumed.events if e["event"] == "epoch_end"]
    assert first >= 1 and epochs == list(range(first + 1, 7))
    assert ModelStore(store_dir).versions("phantom-liver") == [1, 2]


def test_the_panels_label_mapping_reaches_the_trainer_and_its_error_reaches_the_panel(dataset_dir, store_dir, tmp_path):
    assert parse_label_mapping_text(" tumor=liver lesion; ;Leber=liver ") == ("tumor=liver lesion", "Leber=liver")
    request = TrainingRequest(
        dataset_dir,
        "phantom-liver",
        base="phantom-liver:1",
        epochs=1,
        steps_per_epoch=1,
        label_mapping=parse_label_mapping_text("tumour=liver lesion"),
        checkpoints=str(tmp_path / "ck"),
        device="cpu",
        models_dir=store_dir,
    )
    job = start_training(request)
    try:
        assert job.command[job.command.index("--map-label") + 1] == "tumour=liver lesion"
        assert job.wait(120) == 2
        assert "label mapping names labels the dataset does not have" in job.error and "tumour" in job.error
    finally:
        job.cleanup()
    assert ModelStore(store_dir).versions("phantom-liver") == [1]
