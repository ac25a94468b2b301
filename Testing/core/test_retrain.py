"""Retraining on a dataset: fine-tune from the bundled model, fixed split, checkpoints, resume, new version."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deepseg_core.datasets import Dataset
from deepseg_core.demo import DEFAULT_MODEL, SAMPLE_SPACING_XYZ_MM
from deepseg_core.model_card import ModelError
from deepseg_core.model_store import ModelStore, load_network, read_model_folder, resolve_model
from deepseg_core.phantoms import PHANTOM_LABELS, generate_phantom
from deepseg_core.training import AugmentConfig, augment_patch
from deepseg_core.training.engine import RetrainConfig, Stopped, retrain


@pytest.fixture(scope="module")
def site_b_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "siteB"
    dataset = Dataset.create(root, "siteB", PHANTOM_LABELS, ("CT",))
    for seed in range(3):
        p = generate_phantom(seed=500 + seed, profile="ct-B", shape_zyx=(32, 64, 64), spacing_xyz_mm=SAMPLE_SPACING_XYZ_MM)
        dataset.add_case(f"b{seed}", [p.image], p.labels.array_zyx.astype(np.uint8))
    return root


CONFIG = RetrainConfig(epochs=2, steps_per_epoch=2, batch_size=1, learning_rate=1e-3, seed=3)


def _weights(store, ref):
    return load_network(store.folder(ref))[1].state_dict()


def test_finetune_makes_a_new_version_with_parent_metrics(site_b_dataset, tmp_path):
    store = ModelStore(tmp_path / "store")  # the default case: the store does not hold the bundled model's name
    events = []
    outcome = retrain(
        site_b_dataset,
        "phantom-liver",
        CONFIG,
        tmp_path / "ckpt",
        base=DEFAULT_MODEL,
        store=store,
        on_event=events.append,
        activate=False,
    )
    # The bundled model became a real store version (the parent), still the active one; the new one is not.
    assert outcome.card.ref == "phantom-liver:2" and outcome.card.parent_version == 1
    parent_created = read_model_folder(DEFAULT_MODEL).created
    assert store.card("phantom-liver:2").created > parent_created, "dated when it was trained, not as its parent"
    assert store.versions("phantom-liver") == [1, 2] and store.active_version("phantom-liver") == 1
    assert store.card("phantom-liver:1").weights_sha256 == read_model_folder(DEFAULT_MODEL).weights_sha256
    assert resolve_model("phantom-liver", store) == store.folder("phantom-liver:1")
    with pytest.raises(ModelError, match="nothing to roll back"):
        store.rollback("phantom-liver")
    assert [e["epoch"] for e in events if e["event"] == "epoch_end"] == [1, 2]
    assert all("validation" in e and "eta_s" in e for e in events if e["event"] == "epoch_end")
    split = Dataset.open(site_b_dataset).split()
    assert outcome.card.metrics["validation"]["cases"] == split["validation"] and len(split["validation"]) == 1
    assert set(outcome.card.metrics["parent_validation"]["dice"]) == {"liver", "liver lesion"}
    assert (tmp_path / "ckpt" / "last" / "weights.safetensors").exists() and (tmp_path / "ckpt" / "best").exists()
    # The new version's fingerprint describes the site data and still knows the original domain.
    fingerprint = outcome.card.fingerprint
    assert fingerprint["profiles"] == ["siteB"] and fingerprint["num_cases"] == len(split["train"])
    assert [d["profiles"] for d in fingerprint["previous_domains"]] == [["ct-A"]]
    # A second run continues the version line and never overwrites; activated, rollback returns to
    # what users had before it: the bundled original.
    second = retrain(site_b_dataset, "phantom-liver", CONFIG, tmp_path / "ckpt2", base="phantom-liver:2", store=store)
    assert second.card.version == 3 and second.card.parent_version == 2
    assert [d["profiles"] for d in second.card.fingerprint["previous_domains"]] == [["siteB"], ["ct-A"]]
    assert store.active_version("phantom-liver") == 3
    assert store.rollback("phantom-liver") == 1
    assert store.active_version("phantom-liver") == 1


def test_resume_after_a_stop_equals_an_uninterrupted_run(site_b_dataset, tmp_path):
    store_a, store_b = ModelStore(tmp_path / "a"), ModelStore(tmp_path / "b")
    retrain(site_b_dataset, "m", CONFIG, tmp_path / "ck_a", base=DEFAULT_MODEL, store=store_a)
    with pytest.raises(Stopped):
        retrain(site_b_dataset, "m", CONFIG, tmp_path / "ck_b", base=DEFAULT_MODEL, store=store_b, should_stop=lambda: True)
    assert store_b.names() == []  # nothing stored by a stopped run
    retrain(site_b_dataset, "m", CONFIG, tmp_path / "ck_b", base=DEFAULT_MODEL, store=store_b, resume=True)
    a, b = _weights(store_a, "m:1"), _weights(store_b, "m:1")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_resume_with_another_dropout_is_refused_and_the_checkpoint_kept(site_b_dataset, tmp_path):
    """Dropout layers change the network's layer names, and the probability changes what was trained:
    a resume whose settings build another network stops with a clear error before loading anything."""
    import dataclasses

    from deepseg_core.errors import ConfigError

    store, checkpoints = ModelStore(tmp_path / "s"), tmp_path / "ck"
    with_dropout = dataclasses.replace(CONFIG, dropout=0.1)
    with pytest.raises(Stopped):
        retrain(site_b_dataset, "m", with_dropout, checkpoints, base=DEFAULT_MODEL, store=store, should_stop=lambda: True)
    written = {path.name: path.read_bytes() for path in (checkpoints / "last").iterdir() if path.is_file()}
    for other, found in ((CONFIG, "dropout=0.0"), (dataclasses.replace(CONFIG, dropout=0.2), "dropout=0.2")):
        with pytest.raises(ConfigError, match="another network") as refused:
            retrain(site_b_dataset, "m", other, checkpoints, base=DEFAULT_MODEL, store=store, resume=True)
        message = str(refused.value)
        assert "dropout=0.1" in message and found in message and "untick Resume" in message, message
    assert {path.name: path.read_bytes() for path in (checkpoints / "last").iterdir() if path.is_file()} == written
    assert store.names() == []
    outcome = retrain(site_b_dataset, "m", with_dropout, checkpoints, base=DEFAULT_MODEL, store=store, resume=True)
    assert outcome.card.architecture.config["dropout"] == 0.1


def test_a_resume_with_other_settings_or_of_a_run_already_stored_is_refused_and_changes_nothing(site_b_dataset, tmp_path):
    """A resume continues the stopped run: another epoch count (whose cosine schedule the restored one would not
    be) or a run that finished and was stored (whose weights would be stored again as a new version) is refused
    before anything is loaded or written."""
    import dataclasses

    from deepseg_core.errors import ConfigError

    store, checkpoints = ModelStore(tmp_path / "s"), tmp_path / "ck"
    with pytest.raises(Stopped):
        retrain(site_b_dataset, "m", CONFIG, checkpoints, base=DEFAULT_MODEL, store=store, stop_after_epoch=1)
    written = _files(checkpoints)
    longer = dataclasses.replace(CONFIG, epochs=CONFIG.epochs + 2)
    with pytest.raises(ConfigError, match="other settings than this run's") as refused:
        retrain(site_b_dataset, "m", longer, checkpoints, base=DEFAULT_MODEL, store=store, resume=True)
    message = str(refused.value)
    assert f"config.epochs={CONFIG.epochs}" in message and f"config.epochs={CONFIG.epochs + 2}" in message, message
    with pytest.raises(ConfigError, match=r"name='m'.*name='other'"):
        retrain(site_b_dataset, "other", CONFIG, checkpoints, base=DEFAULT_MODEL, store=store, resume=True)
    grown = tmp_path / "grown"
    shutil.copytree(site_b_dataset, grown)  # a case exported since the stop: the stopped run never drew from it
    image, label = Dataset.open(grown).load_case("b0")
    Dataset.open(grown).add_case("b9", image, label.array_zyx)
    with pytest.raises(ConfigError, match=r"stopped run's: training_cases: 2; found training_cases: 3 \(b9 not in the other\)"):
        retrain(grown, "m", CONFIG, checkpoints, base=DEFAULT_MODEL, store=store, resume=True)
    assert _files(checkpoints) == written and store.names() == []

    finished = retrain(site_b_dataset, "m", CONFIG, checkpoints, base=DEFAULT_MODEL, store=store, resume=True)
    assert finished.card.ref == "m:1"
    with pytest.raises(ConfigError, match="finished and was stored as m:1: there is nothing to resume"):
        retrain(site_b_dataset, "m", CONFIG, checkpoints, base=DEFAULT_MODEL, store=store, resume=True)
    assert store.versions("m") == [1]
    again = retrain(site_b_dataset, "m", CONFIG, checkpoints, base=DEFAULT_MODEL, store=store)  # anew: no resume
    assert again.card.ref == "m:2" and again.history[0]["epoch"] == 1


def test_a_resume_after_a_case_was_corrected_again_is_refused_naming_the_case(site_b_dataset, tmp_path):
    """A case replaced under the same id since the stop (a new correction exported with --overwrite) is other data:
    the stopped run's optimiser state, schedule and best checkpoint belong to the old labels, so resuming would
    store a version that neither the old nor the new data describes."""
    from deepseg_core.errors import ConfigError

    dataset_root = tmp_path / "data"
    shutil.copytree(site_b_dataset, dataset_root)
    store, checkpoints = ModelStore(tmp_path / "s"), tmp_path / "ck"
    with pytest.raises(Stopped):
        retrain(dataset_root, "m", CONFIG, checkpoints, base=DEFAULT_MODEL, store=store, stop_after_epoch=1)
    written = _files(checkpoints)
    dataset = Dataset.open(dataset_root)
    corrected = dataset.split()["train"][0]
    image, label = dataset.load_case(corrected)
    relabelled = label.array_zyx.copy()
    relabelled[relabelled == 2] = 1  # the user judged the lesion to be liver
    dataset.add_case(corrected, image, relabelled, overwrite=True)
    with pytest.raises(ConfigError, match="the stopped run's cases changed since it started") as refused:
        retrain(dataset_root, "m", CONFIG, checkpoints, base=DEFAULT_MODEL, store=store, resume=True)
    message = str(refused.value)
    assert f"{corrected} replaced or edited since" in message and "untick Resume" in message, message
    assert _files(checkpoints) == written and store.names() == []
    dataset.add_case(corrected, image, label.array_zyx, overwrite=True)  # the same voxels again: the same case
    assert retrain(dataset_root, "m", CONFIG, checkpoints, base=DEFAULT_MODEL, store=store, resume=True).card.ref == "m:1"


def test_a_resume_is_refused_when_the_validation_cases_or_device_changed(site_b_dataset, tmp_path):
    """The validation cases decide the best checkpoint and draw the curves across epochs: a validation case added
    or replaced since the stop, or another device (float16 AMP and its loss scale are CUDA's), would continue
    another run than the stopped one. A checkpoint written before these were recorded resumes as before."""
    from deepseg_core.errors import ConfigError

    store, checkpoints = ModelStore(tmp_path / "s"), tmp_path / "ck"
    with pytest.raises(Stopped):
        retrain(site_b_dataset, "m", CONFIG, checkpoints, base=DEFAULT_MODEL, store=store, stop_after_epoch=1)
    written = _files(checkpoints)
    validation = Dataset.open(site_b_dataset).split()["validation"]
    image, label = Dataset.open(site_b_dataset).load_case(validation[0])

    def variant(name: str) -> tuple[Path, Dataset]:
        root = tmp_path / name
        shutil.copytree(site_b_dataset, root)
        return root, Dataset.open(root)

    added, dataset = variant("added")
    dataset.add_case("v9", image, label.array_zyx, split="validation")
    replaced, dataset = variant("replaced")
    dataset.add_case(validation[0], image, np.where(label.array_zyx == 2, 1, label.array_zyx), overwrite=True)
    for root, message in (
        (added, r"validation_cases: 1; found validation_cases: 2 \(v9 not in the other\)"),
        (replaced, f"{validation[0]} replaced or edited since"),
    ):
        with pytest.raises(ConfigError, match=message):
            retrain(root, "m", CONFIG, checkpoints, base=DEFAULT_MODEL, store=store, resume=True)
    assert _files(checkpoints) == written and store.names() == []

    state_path = checkpoints / "last" / "state.json"
    state = json.loads(state_path.read_text())
    assert state["run"]["device"] == "cpu"
    state_path.write_text(json.dumps({**state, "run": {**state["run"], "device": "cuda"}}))  # as a CUDA run writes it
    with pytest.raises(ConfigError, match=r"device='cuda'; found device='cpu'"):
        retrain(site_b_dataset, "m", CONFIG, checkpoints, base=DEFAULT_MODEL, store=store, resume=True)
    recorded_since = ("validation_cases", "validation_case_digests", "device")
    older = {key: value for key, value in state["run"].items() if key not in recorded_since}
    state_path.write_text(json.dumps({**state, "run": older}))  # a checkpoint written before they were recorded
    assert retrain(added, "m", CONFIG, checkpoints, base=DEFAULT_MODEL, store=store, resume=True).card.ref == "m:1"


def test_a_new_run_forgets_the_best_checkpoint_of_the_run_before_and_a_resume_recovers_a_half_swapped_one(
    site_b_dataset, tmp_path
):
    """``best/`` is what users and the correction-loop benchmark read. A new run in the same checkpoint folder that
    had not validated yet kept the previous run's ``best/`` beside its own ``last/``; a kill between the two renames
    of ``best/``'s swap left only ``best.old``, which the next save deleted."""
    from deepseg_core.training.checkpoints import check_resumable

    store, checkpoints = ModelStore(tmp_path / "s"), tmp_path / "ck"
    with pytest.raises(Stopped):
        retrain(site_b_dataset, "m", CONFIG, checkpoints, base=DEFAULT_MODEL, store=store, stop_after_epoch=1)
    best = checkpoints / "best"
    first_run = json.loads((best / "state.json").read_text())
    last_run = json.loads((checkpoints / "last" / "state.json").read_text())
    assert first_run["epoch"] == 1 and first_run["run_id"] == last_run["run_id"]
    os.replace(best, checkpoints / "best.old")  # killed between the two renames of a swap
    check_resumable(checkpoints / "last", 0, 1)
    assert json.loads((best / "state.json").read_text()) == first_run
    rarely = dataclasses.replace(CONFIG, epochs=4, validate_every=4)  # no validation before the stop below
    with pytest.raises(Stopped):
        retrain(site_b_dataset, "m", rarely, checkpoints, base=DEFAULT_MODEL, store=store, stop_after_epoch=1)
    assert not best.exists() and (checkpoints / "last" / "state.json").exists()


def test_best_is_swapped_in_only_after_last_holds_its_epoch_and_a_resume_finishes_or_drops_a_staged_one(
    site_b_dataset, tmp_path, monkeypatch
):
    """``best/`` was swapped in before ``last/`` was saved: a kill between them made the resume replay that epoch
    (``last/`` lacked it) while ``best/`` already held the killed run's weights of it, which a replay on CUDA
    need not reproduce. Now ``best/`` is staged, ``last/`` saved, then ``best/`` swapped in; a resume swaps in a
    staged ``best/`` of an epoch ``last/`` holds and drops one of a later epoch or one written in part."""
    from deepseg_core.training import engine
    from deepseg_core.training.checkpoints import check_resumable

    scores = iter(range(1, 100))
    monkeypatch.setattr(engine, "validation_score", lambda result: float(next(scores)))  # every validation a new best
    store, checkpoints = ModelStore(tmp_path / "s"), tmp_path / "ck"
    best, staged, last = checkpoints / "best", checkpoints / "best.tmp", checkpoints / "last"
    three = dataclasses.replace(CONFIG, epochs=3)
    with pytest.raises(Stopped):
        retrain(site_b_dataset, "m", three, checkpoints, base=DEFAULT_MODEL, store=store, stop_after_epoch=1)
    epoch_1 = (best / "weights.safetensors").read_bytes()

    saving = engine.save_checkpoint

    def killed_before_last_of_epoch_2(folder: Path, net, optimiser, state, rank_states=None) -> None:
        if folder.name == "last" and state["epoch"] == 2:
            raise SystemExit(-9)
        saving(folder, net, optimiser, state, rank_states)

    with monkeypatch.context() as patched:
        patched.setattr(engine, "save_checkpoint", killed_before_last_of_epoch_2)
        with pytest.raises(SystemExit):
            retrain(site_b_dataset, "m", three, checkpoints, base=DEFAULT_MODEL, store=store, resume=True)
    assert json.loads((staged / "state.json").read_text())["epoch"] == 2
    assert json.loads((best / "state.json").read_text())["epoch"] == 1, "best/ waits for last/"
    check_resumable(last, 0, 1)
    assert not staged.exists() and (best / "weights.safetensors").read_bytes() == epoch_1

    def killed_after_last(folder: Path) -> None:
        raise SystemExit(-9)

    with monkeypatch.context() as patched:
        patched.setattr(engine, "swap_in_checkpoint", killed_after_last)
        with pytest.raises(SystemExit):
            retrain(site_b_dataset, "m", three, checkpoints, base=DEFAULT_MODEL, store=store, resume=True)
    assert json.loads((last / "state.json").read_text())["epoch"] == 2
    staged_epoch_2 = (staged / "weights.safetensors").read_bytes()
    assert json.loads((best / "state.json").read_text())["epoch"] == 1
    check_resumable(last, 0, 1)
    assert not staged.exists() and json.loads((best / "state.json").read_text())["epoch"] == 2
    assert (best / "weights.safetensors").read_bytes() == staged_epoch_2

    staged.mkdir()  # a kill while staging: state.json, written last, is missing
    (staged / "weights.safetensors").write_bytes(b"partial")
    check_resumable(last, 0, 1)
    assert not staged.exists() and (best / "weights.safetensors").read_bytes() == staged_epoch_2
    outcome = retrain(site_b_dataset, "m", three, checkpoints, base=DEFAULT_MODEL, store=store, resume=True)
    assert outcome.card.ref == "m:1" and not staged.exists()
    assert json.loads((best / "state.json").read_text())["epoch"] == 3


def test_a_staged_best_of_another_run_or_beside_a_failed_last_is_never_swapped_in(site_b_dataset, tmp_path, monkeypatch):
    """A new run in a checkpoint folder stages its first best/ before its first last/; killed there, the folder's
    last/ is still the previous run's, of the same epoch number: a resume of that run must not take the new
    run's weights as its best. A last/ that cannot be written (a full disk) takes its staged best/ with it."""
    from deepseg_core.errors import DeepSegError
    from deepseg_core.training import engine
    from deepseg_core.training.checkpoints import check_resumable

    scores = iter(range(1, 100))
    monkeypatch.setattr(engine, "validation_score", lambda result: float(next(scores)))
    store, checkpoints = ModelStore(tmp_path / "s"), tmp_path / "ck"
    staged, last = checkpoints / "best.tmp", checkpoints / "last"
    three = dataclasses.replace(CONFIG, epochs=3)
    with pytest.raises(Stopped):
        retrain(site_b_dataset, "m", three, checkpoints, base=DEFAULT_MODEL, store=store, stop_after_epoch=1)
    first_run = json.loads((last / "state.json").read_text())["run_id"]
    saving = engine.save_checkpoint

    def killed_before_last(folder: Path, net, optimiser, state, rank_states=None) -> None:
        if folder.name == "last":
            raise SystemExit(-9)
        saving(folder, net, optimiser, state, rank_states)

    with monkeypatch.context() as patched:
        patched.setattr(engine, "save_checkpoint", killed_before_last)
        with pytest.raises(SystemExit):  # a new run (no --resume), killed in its first epoch
            retrain(site_b_dataset, "m", three, checkpoints, base=DEFAULT_MODEL, store=store)
    new_run = json.loads((staged / "state.json").read_text())
    assert new_run["epoch"] == 1 and new_run["run_id"] != first_run
    check_resumable(last, 0, 1)
    assert not staged.exists() and not (checkpoints / "best").exists()

    def disk_full(folder: Path, net, optimiser, state, rank_states=None) -> None:
        if folder.name == "last":
            raise DeepSegError("could not write the checkpoint (No space left on device)", subject=folder)
        saving(folder, net, optimiser, state, rank_states)

    with monkeypatch.context() as patched:
        patched.setattr(engine, "save_checkpoint", disk_full)
        with pytest.raises(DeepSegError, match="No space left"):
            retrain(site_b_dataset, "m", three, checkpoints, base=DEFAULT_MODEL, store=store, resume=True)
    assert not staged.exists() and not (checkpoints / "best").exists()
    assert json.loads((last / "state.json").read_text())["epoch"] == 1


def test_a_kill_between_storing_the_version_and_marking_the_checkpoint_does_not_store_it_twice(
    site_b_dataset, tmp_path, monkeypatch
):
    """The panel's Stop kills the process tree 5 s after asking it to stop; landing after the version was stored and
    before the checkpoint says so, it left a run that the panel offers to resume, and the resume stored the same
    weights again as the next version. The stored card's run id lets the resume find it."""
    from deepseg_core.errors import ConfigError
    from deepseg_core.training import engine

    store, checkpoints = ModelStore(tmp_path / "s"), tmp_path / "ck"

    def killed(folder: Path, ref: str) -> None:
        raise SystemExit(-9)  # the process ends here; nothing after the store runs

    with monkeypatch.context() as patched:
        patched.setattr(engine, "mark_stored", killed)
        with pytest.raises(SystemExit):
            retrain(site_b_dataset, "m", CONFIG, checkpoints, base=DEFAULT_MODEL, store=store)
    assert store.versions("m") == [1]
    assert "stored_as" not in json.loads((checkpoints / "last" / "state.json").read_text())
    with pytest.raises(ConfigError, match="finished and was stored as m:1: there is nothing to resume"):
        retrain(site_b_dataset, "m", CONFIG, checkpoints, base=DEFAULT_MODEL, store=store, resume=True)
    assert store.versions("m") == [1]
    again = retrain(site_b_dataset, "m", CONFIG, checkpoints, base=DEFAULT_MODEL, store=store)  # anew: a new run id
    assert again.card.ref == "m:2"
    assert again.card.metrics["training"]["run_id"] != store.card("m:1").metrics["training"]["run_id"]


def test_a_resume_continues_the_float16_loss_scale(site_b_dataset, tmp_path, monkeypatch):
    """On CUDA the gradient scaler's scale and growth count are part of the run: a resume that restarts them at
    65536 skips steps until the scale has fallen again. CPU training has no scaler, so this runs torch's CPU
    GradScaler in its place (growing every step, so that the scale tells how many steps it has seen)."""
    from deepseg_core.training import engine

    monkeypatch.setattr(engine, "_grad_scaler", lambda device: torch.amp.GradScaler("cpu", init_scale=16.0, growth_interval=1))

    def final_scale(checkpoints: Path) -> float:
        return json.loads((checkpoints / "last" / "state.json").read_text())["grad_scaler"]["scale"]

    retrain(site_b_dataset, "m", CONFIG, tmp_path / "whole", base=DEFAULT_MODEL, store=ModelStore(tmp_path / "a"))
    store = ModelStore(tmp_path / "b")
    with pytest.raises(Stopped):
        retrain(site_b_dataset, "m", CONFIG, tmp_path / "cut", base=DEFAULT_MODEL, store=store, stop_after_epoch=1)
    assert final_scale(tmp_path / "cut") == 16.0 * 2**CONFIG.steps_per_epoch
    retrain(site_b_dataset, "m", CONFIG, tmp_path / "cut", base=DEFAULT_MODEL, store=store, resume=True)
    every_step = 16.0 * 2 ** (CONFIG.epochs * CONFIG.steps_per_epoch)
    assert final_scale(tmp_path / "cut") == final_scale(tmp_path / "whole") == every_step


def test_an_unversioned_base_is_the_version_active_when_training_started_even_if_another_is_activated_meanwhile(
    site_b_dataset, tmp_path
):
    """`--base NAME` names the active version; a Promote in the panel (or `models activate`) during the run must not
    make the stored card, its parent's validation or rollback refer to another version than the one trained."""
    from deepseg_core.training.engine import evaluate_model

    store = ModelStore(tmp_path / "store")
    retrain(site_b_dataset, "phantom-liver", CONFIG, tmp_path / "ck1", base=DEFAULT_MODEL, store=store, activate=False)
    assert store.versions("phantom-liver") == [1, 2] and store.active_version("phantom-liver") == 1

    def promote_2_meanwhile(event: dict) -> None:
        if event.get("event") == "epoch_end" and store.active_version("phantom-liver") == 1:
            store.activate("phantom-liver:2")

    events: list[dict] = []
    outcome = retrain(
        site_b_dataset,
        "phantom-liver",
        CONFIG,
        tmp_path / "ck2",
        base="phantom-liver",
        store=store,
        activate=False,
        on_event=lambda event: (events.append(event), promote_2_meanwhile(event)),
    )
    assert store.active_version("phantom-liver") == 2, "the activation happened during the run"
    assert outcome.card.parent_version == 1 and outcome.card.metrics["training"]["base"] == "phantom-liver"
    assert [e["parent"] for e in events if e["event"] == "done"] == ["phantom-liver:1"]
    dataset = Dataset.open(site_b_dataset)
    from deepseg_core.inference import Segmenter

    parent_scores = evaluate_model(
        Segmenter.load(store.folder("phantom-liver:1"), device="cpu"), dataset, dataset.ensure_split()["validation"]
    )
    assert outcome.parent_validation["mean"] == parent_scores["mean"]


def test_frozen_encoder_epochs_keep_the_encoders_weights_and_train_the_decoders(site_b_dataset, tmp_path):
    import dataclasses

    store = ModelStore(tmp_path / "s")
    events: list[dict] = []
    frozen = dataclasses.replace(CONFIG, epochs=1, freeze_encoder_epochs=1)
    outcome = retrain(site_b_dataset, "m", frozen, tmp_path / "ck", base=DEFAULT_MODEL, store=store, on_event=events.append)
    assert [e["encoder_frozen"] for e in events if e["event"] == "epoch_end"] == [True]
    base, tuned = load_network(DEFAULT_MODEL)[1].state_dict(), _weights(store, outcome.card.ref)
    encoder = [key for key in base if key.startswith("encoder.")]
    others = [key for key in base if not key.startswith("encoder.") and base[key].is_floating_point()]
    assert encoder and others
    assert all(torch.equal(base[key], tuned[key]) for key in encoder), "a frozen encoder's weights did not move"
    assert any(not torch.equal(base[key], tuned[key]) for key in others), "the decoder trained"


def test_augmentation_keeps_shapes_labels_and_is_seeded():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 8, 32, 32)).astype(np.float32)
    labels = np.zeros((8, 32, 32), np.int64)
    labels[2:6, 10:20, 10:20] = 2
    always = AugmentConfig(p_rotate_scale=1, p_contrast=1, p_gamma=1, p_noise=1, p_blur=1, p_bias=1)
    out1 = augment_patch(np.random.default_rng(5), image, labels, always)
    out2 = augment_patch(np.random.default_rng(5), image, labels, always)
    assert out1[0].shape == image.shape and out1[1].shape == labels.shape
    np.testing.assert_array_equal(out1[0], out2[0])
    assert set(np.unique(out1[1])) <= {0, 2}  # nearest-neighbour labels: no invented values
    assert 0.6 < (out1[1] == 2).sum() / (labels == 2).sum() < 1.6  # rotation/scaling keeps the object
    assert not np.allclose(out1[0], image)
    same = augment_patch(np.random.default_rng(5), image, labels, AugmentConfig.none())
    np.testing.assert_array_equal(same[0], image)


def test_a_rotation_extends_labels_beyond_the_patch_as_it_extends_the_image():
    """A patch inside the liver, rotated: its corners come from beyond the patch, where the image repeats its edge
    (liver texture). The labels there were background, teaching the network that liver texture is background."""
    rng = np.random.default_rng(0)
    image = (100.0 + rng.normal(size=(1, 4, 32, 32))).astype(np.float32)  # all liver
    labels = np.ones((4, 32, 32), np.uint8)
    rotate_only = dataclasses.replace(AugmentConfig.none(), p_rotate_scale=1.0, rotation_deg=30.0, scale_range=(1.0, 1.0))
    for seed in range(5):
        out_image, out_labels = augment_patch(np.random.default_rng(seed), image, labels, rotate_only)
        assert out_image.min() > 90 and np.all(out_labels == 1), f"seed {seed}"
    # an organ edge stays where the image's edge is: labels follow the image
    half = np.zeros((4, 32, 32), np.uint8)
    half[:, :, :16] = 1
    out_image, out_labels = augment_patch(np.random.default_rng(1), 100.0 * half[None].astype(np.float32), half, rotate_only)
    assert np.array_equal(out_labels == 1, out_image[0] > 50)


def test_train_and_evaluate_cli(site_b_dataset, tmp_path, capsys, engine_prepares_for):
    from deepseg_core.cli import main

    store = str(tmp_path / "store")
    args = ["train", "--dataset", str(site_b_dataset), "--name", "liver-b", "--base", str(DEFAULT_MODEL), "--epochs", "1"]
    args += ["--steps", "1", "--batch-size", "1", "--models-dir", store, "--checkpoints", str(tmp_path / "ck"), "--json"]
    assert main([*args, "--dropout", "0.2"]) == 0  # the bundled base has no dropout: the layers are added
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    # on the CPU the new version's network is then prepared for this computer's runtime, as an import's is
    prepared = [] if engine_prepares_for == "torch" else ["status", "prepared"]
    assert [e["event"] for e in events] == ["start", "epoch_end", "done", *prepared]
    done = next(e for e in events if e["event"] == "done")
    assert done["model"] == "liver-b:1" and done["parent"] == "phantom-liver:1"
    card = ModelStore(store).card("liver-b:1")
    assert card.architecture.config["dropout"] == 0.2 and card.metrics["training"]["dropout"] == 0.2
    if prepared:
        from deepseg_core.inference import Segmenter, SegmentOptions

        assert events[-1]["model"] == "liver-b:1" and events[-1]["stages"][0]["exported"] is True
        segmenter = Segmenter.load("liver-b:1", device="cpu", store=ModelStore(store))
        assert not segmenter.needs_preparing(SegmentOptions(device="cpu")), "its first run would export it again"
    assert (
        main(["evaluate", "--model", "liver-b", "--dataset", str(site_b_dataset), "--models-dir", store, "--device", "cpu"]) == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == "liver-b:1" and list(report["cases"]) == report["case_ids"]
    # evaluate reproduces what training reported for the same model on the same fixed validation split
    assert report["case_ids"] == card.metrics["validation"]["cases"]
    for name, dice in card.metrics["validation"]["dice"].items():
        assert report["mean"][name]["dice"] == pytest.approx(dice, abs=1e-6), name
    assert main(["train", "--dataset", str(tmp_path / "missing"), "--name", "x", "--models-dir", store]) == 2
    assert "dataset folder not found" in capsys.readouterr().err


def test_a_stop_as_the_version_is_stored_keeps_it_and_still_says_done(site_b_dataset, tmp_path, capsys, monkeypatch):
    """A Stop (a real SIGTERM) that lands once the new version is in the store, before the engine says ``done``:
    the panel would take the run for a stopped one (Resume ticked, no comparison) though the version is stored."""
    import signal

    from deepseg_core.cli import main

    real_add_version = ModelStore.add_version

    def stopped_once_stored(self, *args, **kwargs):
        card = real_add_version(self, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # the CLI's handler raises KeyboardInterrupt at once unless deferred
        return card

    monkeypatch.setattr(ModelStore, "add_version", stopped_once_stored)
    store = tmp_path / "store"
    args = ["train", "--dataset", str(site_b_dataset), "--name", "liver-b", "--base", str(DEFAULT_MODEL), "--epochs", "1"]
    args += ["--steps", "1", "--batch-size", "1", "--models-dir", str(store), "--checkpoints", str(tmp_path / "ck"), "--json"]
    assert main(args) == 130
    out, err = capsys.readouterr()
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [e["event"] for e in events] == ["start", "epoch_end", "done"] and events[-1]["model"] == "liver-b:1"
    assert "cancelled: liver-b:1 is stored; its network was not prepared (its first run will)" in err, err
    assert ModelStore(store).versions("liver-b") == [1]


def test_first_finetune_of_the_bundled_model_from_the_cli_keeps_it_active_and_rollback_returns_to_it(
    site_b_dataset, tmp_path, capsys
):
    """The default path: `deepseg train --base phantom-liver --no-activate` on a store without that name."""
    from deepseg_core.cli import main

    store = str(tmp_path / "store")
    args = ["train", "--dataset", str(site_b_dataset), "--name", "phantom-liver", "--base", "phantom-liver", "--epochs", "1"]
    args += ["--steps", "1", "--batch-size", "1", "--models-dir", store, "--checkpoints", str(tmp_path / "ck"), "--json"]
    assert main([*args, "--no-activate", "--no-prepare"]) == 0
    done = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")][-1]
    assert (done["model"], done["parent"]) == ("phantom-liver:2", "phantom-liver:1")
    assert not (tmp_path / "store" / ".cache").exists(), "--no-prepare exports nothing"
    assert main(["models", "list", "--models-dir", store, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["version"], r["parent_version"], r["active"], r.get("bundled", False)) for r in rows] == [
        ("phantom-liver", 1, None, True, False),
        ("phantom-liver", 2, 1, False, False),
    ]
    assert main(["models", "activate", "phantom-liver:2", "--models-dir", store]) == 0
    assert main(["models", "rollback", "phantom-liver", "--models-dir", store]) == 0
    assert "rolled back to version 1" in capsys.readouterr().out
    assert ModelStore(store).card("phantom-liver").weights_sha256 == read_model_folder(DEFAULT_MODEL).weights_sha256


@pytest.mark.parametrize("arch", ["2.5d", "3d"])
def test_from_scratch_builds_a_working_model(site_b_dataset, tmp_path, arch):
    from deepseg_core.inference import Segmenter

    store = ModelStore(tmp_path / "store")
    config = RetrainConfig(epochs=1, steps_per_epoch=1, batch_size=1, arch=arch, dropout=0.3)
    outcome = retrain(site_b_dataset, f"scratch-{arch}", config, tmp_path / "ck", store=store)
    assert outcome.card.parent_version is None and outcome.parent_validation is None
    assert outcome.card.architecture.config["spatial_dims"] == (2 if arch == "2.5d" else 3)
    assert outcome.card.architecture.config["dropout"] == 0.3
    images, _ = Dataset.open(site_b_dataset).load_case("b0")
    labels = Segmenter.load(store.folder(outcome.card.ref), device="cpu", store=store).segment(images).labels
    assert labels.same_grid(images[0])


def _torchrun(dataset, folder, *extra: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """`torchrun --nproc_per_node 2 -m deepseg_core train ...` with gloo on CPU: the run and its JSON events.

    Store ``folder/store``, checkpoints ``folder/ck``; the same settings every time, so runs compare.
    """
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "DeepSeg"), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "deepseg_core"]
    command += ["train", "--dataset", str(dataset), "--name", "ddp", "--base", str(DEFAULT_MODEL), "--epochs", "2"]
    command += ["--steps", "2", "--batch-size", "1", "--device", "cpu", "--json", "--models-dir", str(folder / "store")]
    command += ["--checkpoints", str(folder / "ck"), *extra]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    return done, [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def ddp_uninterrupted(site_b_dataset, tmp_path_factory):
    """An uninterrupted 2-process run: its events (the reference of the resume test)."""
    done, events = _torchrun(site_b_dataset, tmp_path_factory.mktemp("ddp"))
    assert done.returncode == 0, done.stderr[-3000:]
    return events


def test_two_process_training_without_json_reports_once_and_succeeds(site_b_dataset, tmp_path, engine_prepares_for):
    """Without ``--json`` every rank reached the printed summary, and rank 1, which stores nothing, failed on it:
    torchrun then exited 1 although the version was stored."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "DeepSeg"), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "deepseg_core"]
    command += ["train", "--dataset", str(site_b_dataset), "--name", "ddp", "--base", str(DEFAULT_MODEL), "--epochs", "1"]
    command += ["--steps", "1", "--batch-size", "1", "--device", "cpu", "--models-dir", str(tmp_path / "store")]
    command += ["--checkpoints", str(tmp_path / "ck")]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("stored ddp:1 (parent None)") == 1, done.stdout
    assert done.stdout.count("prepared ddp:1 for") == (0 if engine_prepares_for == "torch" else 1), done.stdout
    assert ModelStore(tmp_path / "store").versions("ddp") == [1]


def _rank_done(events: list[dict], key: str) -> dict[int, str]:
    return {e["rank"]: e[key] for e in events if e["event"] == "rank_done"}


def test_two_process_ddp_on_cpu_finishes_with_ranks_in_agreement(ddp_uninterrupted, tmp_path):
    """`torchrun --nproc_per_node 2 -m deepseg_core train ...` with gloo: same code path as one process."""
    events = ddp_uninterrupted
    digests = _rank_done(events, "weights_sha256")
    assert sorted(digests) == [0, 1] and digests[0] == digests[1]  # DDP kept the replicas identical
    assert [e["epoch"] for e in events if e["event"] == "epoch_end"] == [1, 2]  # one event stream (rank 0)
    assert [e["model"] for e in events if e["event"] == "done"] == ["ddp:1"]
    random_states = _rank_done(events, "random_state_sha256")
    assert random_states[0] != random_states[1]  # each rank draws its own patches


def test_two_process_ddp_resume_equals_an_uninterrupted_run(site_b_dataset, ddp_uninterrupted, tmp_path):
    """Stopped after epoch 1 and resumed under torchrun: bit for bit the uninterrupted run.

    Each rank must get its own random state back. Restoring rank 0's into both ranks (the old
    behaviour) makes both draw the same patches after the resume: their random states end equal,
    and the weights differ from the uninterrupted run's.
    """
    from deepseg_core.errors import ConfigError

    stopped, first = _torchrun(site_b_dataset, tmp_path, "--stop-after-epoch", "1")
    assert stopped.returncode != 0, stopped.stderr[-3000:]  # the ranks exit 130, as a Stop does
    assert [e["epoch"] for e in first if e["event"] == "epoch_end"] == [1]
    assert ModelStore(tmp_path / "store").names() == []
    last = tmp_path / "ck" / "last"
    assert json.loads((last / "state.json").read_text())["world_size"] == 2
    rank_states = [json.loads((last / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert rank_states[0]["numpy"] != rank_states[1]["numpy"]  # rank 1's own patch stream was saved

    resumed, second = _torchrun(site_b_dataset, tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [e["epoch"] for e in second if e["event"] == "resumed"] == [1]
    reference = [e["loss"] for e in ddp_uninterrupted if e["event"] == "epoch_end"]
    losses = [e["loss"] for e in first + second if e["event"] == "epoch_end"]
    assert losses == reference  # exactly: the same patches, augmentations and steps
    assert _rank_done(second, "weights_sha256") == _rank_done(ddp_uninterrupted, "weights_sha256")
    random_states = _rank_done(second, "random_state_sha256")
    assert random_states == _rank_done(ddp_uninterrupted, "random_state_sha256")
    assert random_states[0] != random_states[1]  # the ranks drew different patches after the resume

    # Another world size cannot hand out the per-rank states: refused (here: one process).
    with pytest.raises(ConfigError, match=r"Expected 2 process\(es\).*found 1 process\(es\).*Resume with 2 process"):
        retrain(site_b_dataset, "ddp", CONFIG, tmp_path / "ck", base=DEFAULT_MODEL, store=ModelStore(tmp_path / "s"), resume=True)


def _files(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative POSIX path -> content)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_full_disk_during_a_checkpoint_keeps_the_previous_one_and_resume_continues(site_b_dataset, tmp_path, monkeypatch):
    import errno

    import safetensors.torch

    from deepseg_core.errors import DeepSegError

    ckpt = tmp_path / "ckpt"
    real_save = safetensors.torch.save_file
    before: dict[str, bytes] = {}

    def disk_full_after_first_checkpoint(tensors, filename, *args, **kwargs):
        if Path(filename).parent.name == "last.tmp" and (ckpt / "last").exists():
            before.update(_files(ckpt / "last"))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full_after_first_checkpoint)
    store = ModelStore(tmp_path / "store")
    with pytest.raises(DeepSegError, match="No space left on device") as failure:
        retrain(site_b_dataset, "site", CONFIG, ckpt, base=DEFAULT_MODEL, store=store)
    assert "previous checkpoint there is intact" in str(failure.value) and "--resume" in str(failure.value)
    assert before and _files(ckpt / "last") == before and "ranks/rank-0.json" in before
    assert not (ckpt / "last.tmp").exists()
    assert store.names() == []  # no half-made model version
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    events = []
    outcome = retrain(site_b_dataset, "site", CONFIG, ckpt, base=DEFAULT_MODEL, store=store, resume=True, on_event=events.append)
    assert [e["epoch"] for e in events if e["event"] == "resumed"] == [1]
    assert outcome.card.ref == "site:1"


def test_a_kill_between_the_checkpoint_renames_is_recovered_on_resume(site_b_dataset, tmp_path):
    ckpt = tmp_path / "ckpt"
    store = ModelStore(tmp_path / "store")
    with pytest.raises(Stopped):
        retrain(site_b_dataset, "site", CONFIG, ckpt, base=DEFAULT_MODEL, store=store, should_stop=lambda: True)
    (ckpt / "last").rename(ckpt / "last.old")  # the state a kill after the first rename leaves
    events = []
    retrain(site_b_dataset, "site", CONFIG, ckpt, base=DEFAULT_MODEL, store=store, resume=True, on_event=events.append)
    assert [e["epoch"] for e in events if e["event"] == "resumed"] == [1]


def test_dropout_added_to_a_base_without_it_keeps_every_weight(tmp_path):
    """Fine-tuning with --dropout on a base without dropout: the layers exist with p > 0, every weight loads."""
    from torch import nn

    from deepseg_core.errors import ConfigError
    from deepseg_core.model_store import write_model_folder
    from deepseg_core.training.engine import copy_weights_by_layer, with_dropout

    card, base = load_network(DEFAULT_MODEL)
    assert not any(isinstance(m, nn.Dropout3d) for m in base.modules())
    new_card, net = with_dropout(card, base, 0.2)
    dropouts = [m for m in net.modules() if isinstance(m, nn.Dropout3d)]
    assert new_card.architecture.config["dropout"] == 0.2 and dropouts and all(m.p == 0.2 for m in dropouts)
    x = torch.randn(1, 1, 32, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), base(x), rtol=0, atol=0)  # eval: the base's function exactly
    # the new card rebuilds it: the version loads with its dropout layers and the same weights
    write_model_folder(tmp_path / "m", new_card, net)
    _, loaded = load_network(tmp_path / "m")
    assert [k for k in loaded.state_dict()] == [k for k in net.state_dict()]
    assert sum(isinstance(m, nn.Dropout3d) for m in loaded.modules()) == len(dropouts)
    assert with_dropout(card, base, 0.0)[1] is base  # unchanged dropout: the same network
    with pytest.raises(ConfigError, match="layers with weights differ"):
        copy_weights_by_layer(base, nn.Sequential(nn.Conv3d(1, 2, 3)))


def _renamed_dataset(root, labels):
    dataset = Dataset.create(root, "renamed", labels, ("CT",))
    for seed in range(2):
        p = generate_phantom(seed=520 + seed, profile="ct-A", shape_zyx=(32, 96, 96), spacing_xyz_mm=SAMPLE_SPACING_XYZ_MM)
        truth = p.labels.array_zyx
        # write the phantom's organ / lesion with this dataset's own values
        values = {label.name.lower(): label.value for label in labels}
        organ = values.get("liver", values.get("organ", 0))
        lesion = values.get("tumor", values.get("liver lesion", 0))
        array = np.where(truth == 1, organ, np.where(truth == 2, lesion, 0)).astype(np.uint8)
        dataset.add_case(f"r{seed}", [p.image], array)
    return root


def test_base_labels_that_differ_are_explained_and_mapped(tmp_path):
    import dataclasses

    from deepseg_core.errors import ConfigError
    from deepseg_core.model_card import ModelCard
    from deepseg_core.training.engine import match_labels

    liver, lesion = PHANTOM_LABELS
    # the site calls the lesion "tumor" and stores it as value 1, the liver as value 2
    labels = (dataclasses.replace(lesion, name="tumor", value=1), dataclasses.replace(liver, name="Liver", value=2))
    root = _renamed_dataset(tmp_path / "renamed", labels)
    dataset = Dataset.open(root)
    card = ModelCard.read(DEFAULT_MODEL / "model.json")
    with pytest.raises(ConfigError) as refused:
        match_labels(dataset, card)
    message = str(refused.value)
    assert "['tumor'] are not labels of the base model" in message and "--map-label 'tumor=liver lesion'" in message
    assert match_labels(dataset, card, {"tumor": "liver lesion"}) == {1: 2, 2: 1}
    with pytest.raises(ConfigError, match="does not have"):
        match_labels(dataset, card, {"tumour": "liver lesion"})
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ConfigError, match="tumor"):
        retrain(root, "site", CONFIG, tmp_path / "ckpt0", base=DEFAULT_MODEL, store=store)
    assert store.names() == []
    mapped = dataclasses.replace(CONFIG, label_mapping={"tumor": "liver lesion"}, epochs=1)
    outcome = retrain(root, "site", mapped, tmp_path / "ckpt", base=DEFAULT_MODEL, store=store)
    # the parent scores well on the swapped-value dataset only because values were mapped, not compared raw
    assert outcome.parent_validation["mean"]["Liver"]["dice"] > 0.9
    assert set(outcome.validation["mean"]) == {"tumor", "Liver"}


def test_a_step_the_grad_scaler_skips_does_not_advance_the_learning_rate_schedule():
    """On CUDA, AMP's first steps often overflow: GradScaler skips them, and the schedule must wait.
    (A CPU GradScaler stands in for CUDA's: same skip-and-back-off logic.)"""
    from deepseg_core.training.loop import optimisation_step

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    optimiser = torch.optim.AdamW(net.parameters(), lr=1.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    overflow = iter([True, False])

    def loss_fn(prediction, target):
        loss = ((prediction - target) ** 2).mean()
        return loss * float("inf") if next(overflow) else loss

    x, y = torch.randn(4, 3), torch.randn(4, 1)
    before = [p.detach().clone() for p in net.parameters()]
    optimisation_step(net, net, x, y, loss_fn, optimiser, schedule, scaler)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True)), "the overflowed step was taken"
    assert scaler.get_scale() == 512.0 and schedule.last_epoch == 0
    optimisation_step(net, net, x, y, loss_fn, optimiser, schedule, scaler)
    assert not all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert schedule.last_epoch == 1


def test_evaluation_leaves_out_the_voxels_nobody_reviewed_as_deepseg_compare_does(tmp_path):
    """A case whose unreviewed region (the ignore label) holds liver that the model finds: those voxels count
    neither for nor against the model, in the validation that decides between versions as in `deepseg compare`."""
    from deepseg_core import metrics
    from deepseg_core.inference import Segmenter, SegmentOptions
    from deepseg_core.training.engine import evaluate_model

    phantom = generate_phantom(seed=501, profile="ct-B", shape_zyx=(32, 64, 64), spacing_xyz_mm=SAMPLE_SPACING_XYZ_MM)
    segmenter = Segmenter.load(DEFAULT_MODEL, device="cpu")
    predicted = segmenter.segment([phantom.image], SegmentOptions(check_modality=False)).labels.array_zyx
    label = phantom.labels.array_zyx.astype(np.uint8)
    unreviewed = np.zeros(label.shape, bool)
    unreviewed[:, :, 32:] = True  # half the image nobody looked at; the model's liver there must not count
    assert np.count_nonzero(unreviewed & (predicted == 1)) > 1000
    label[unreviewed] = 255
    dataset = Dataset.create(tmp_path / "ds", "site", PHANTOM_LABELS, ("CT",), ignore_value=255)
    dataset.add_case("c0", [phantom.image], label)
    scores = evaluate_model(segmenter, dataset, ["c0"], hd95=False)
    reviewed = ~unreviewed
    expected = metrics.dice((predicted == 1) & reviewed, (label == 1) & reviewed)
    assert scores["cases"]["c0"]["liver"]["dice"] == pytest.approx(expected, abs=1e-9)
    assert expected > metrics.dice(predicted == 1, label == 1) + 0.1, "the ignored half would have counted as false positives"

    # HD95 is undefined where a reference is empty and the prediction not: the mean says over how many cases
    label[label == 2] = 0
    assert np.count_nonzero((predicted == 2) & reviewed) > 0
    dataset.add_case("c1", [phantom.image], label)
    scores = evaluate_model(segmenter, dataset, ["c0", "c1"])
    assert scores["cases"]["c1"]["liver lesion"]["hd95_mm"] == float("inf")
    assert scores["mean"]["liver lesion"]["hd95_cases"] == 1 and scores["mean"]["liver"]["hd95_cases"] == 2
    assert scores["mean"]["liver lesion"]["hd95_mm"] == scores["cases"]["c0"]["liver lesion"]["hd95_mm"]


def test_training_cases_are_prepared_with_the_datasets_ignore_label_out_of_the_foreground_classes():
    from deepseg_core.training.engine import _prepare_cases

    phantom = generate_phantom(seed=502, profile="ct-B", shape_zyx=(16, 32, 32), spacing_xyz_mm=SAMPLE_SPACING_XYZ_MM)
    label = phantom.labels.array_zyx.astype(np.uint8)
    label[:, :, 16:] = 255
    card = read_model_folder(DEFAULT_MODEL)
    (case,) = _prepare_cases({"c0": ([phantom.image], phantom.labels.with_array(label))}, card, 255)
    assert 255 in case.labels_zyx and case.foreground_classes == sorted({1, 2} & set(np.unique(case.labels_zyx)))


@pytest.mark.parametrize("loss", ["wce", "dice_wce"])
def test_the_weighted_cross_entropy_trains_with_class_weights_from_the_training_labels(site_b_dataset, tmp_path, loss):
    """README offers every loss of the registry; `--loss wce` ended the run with a TypeError. Its weights are now
    the training labels' median-frequency weights: the rare lesion weighs far more than the background."""
    import dataclasses

    from deepseg_core.training.engine import class_weights_from_labels

    dataset = Dataset.open(site_b_dataset)
    labels = [dataset.load_case(case)[1].array_zyx for case in dataset.ensure_split()["train"]]
    weights = class_weights_from_labels(labels, 3)
    counts = np.bincount(np.concatenate([label.ravel() for label in labels]), minlength=3)[:3]
    np.testing.assert_allclose(weights, np.median(counts / counts.sum()) / (counts / counts.sum()))
    assert weights[2] > weights[1] > weights[0]
    outcome = retrain(
        site_b_dataset,
        "m",
        dataclasses.replace(CONFIG, epochs=1, loss=loss),
        tmp_path / "ck",
        base=DEFAULT_MODEL,
        store=ModelStore(tmp_path / "s"),
    )
    assert outcome.card.ref == "m:1" and np.isfinite(outcome.history[-1]["loss"])


def test_class_weights_leave_out_the_ignore_value_and_weigh_an_absent_class_as_the_rarest():
    from deepseg_core.training.engine import class_weights_from_labels

    label = np.zeros((4, 10, 10), np.uint8)
    label[0, :2] = 1  # 20 voxels of class 1, 80 of background; class 3 absent
    label[1:] = 2  # 300 voxels nobody reviewed (a schema 1, 3 whose ignore value is 2)
    weights = class_weights_from_labels([label], 4, ignore_value=2)
    # frequencies 0.8 and 0.2, median 0.5: 0.625 and 2.5; the ignored and the absent value get the largest, 2.5
    np.testing.assert_allclose(weights, [0.625, 2.5, 2.5, 2.5])
    assert class_weights_from_labels([np.where(label == 2, 255, label)], 4, ignore_value=255) == weights
    speck = np.zeros((40, 100, 100), np.uint8)
    speck[0, 0, 0] = 1  # one voxel in 400,000: 2e5 uncapped
    assert class_weights_from_labels([speck], 2) == [pytest.approx(0.5 / (1 - 2.5e-6)), 100.0]


def test_a_training_whose_checkpoint_folder_another_training_writes_is_refused_at_once(site_b_dataset, tmp_path):
    """Two trainings of one name (two Slicer sessions: the default folder is named after the model) deleted each
    other's half-written checkpoints. The test holds the folder's lock as the running training does."""
    from deepseg_core.errors import ConfigError
    from deepseg_core.fileutil import exclusive_lock

    checkpoints = tmp_path / "ck"
    with exclusive_lock(tmp_path / "ck.lock"):
        with pytest.raises(ConfigError, match="another training is writing its checkpoints to this folder"):
            retrain(site_b_dataset, "m", CONFIG, checkpoints, base=DEFAULT_MODEL, store=ModelStore(tmp_path / "s"))
    assert not checkpoints.exists()
    outcome = retrain(site_b_dataset, "m", CONFIG, checkpoints, base=DEFAULT_MODEL, store=ModelStore(tmp_path / "s"))
    assert outcome.card.ref == "m:1"
