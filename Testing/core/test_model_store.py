"""Model folders and the versioned store: schema, checksum, no pickle, immutability, rollback."""

from __future__ import annotations

import json

import pytest
import torch
from model_fixtures import tiny_card, tiny_model_folder

from deepseg_core.model_card import ModelError
from deepseg_core.model_store import ModelStore, load_network, read_model_folder, resolve_model


def test_model_folder_round_trip(tmp_path):
    folder = tiny_model_folder(tmp_path / "m")
    card, net = load_network(folder)
    assert card.name == "tiny" and card.num_classes == 3 and not net.training
    original_card, original_net = tiny_card()
    for key, value in original_net.state_dict().items():
        assert torch.equal(net.state_dict()[key], value)
    # safetensors: 8-byte little-endian header length, then a JSON header; no pickle opcodes
    raw = (folder / "weights.safetensors").read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8 : 8 + header_len])["__metadata__"]["model"] == "tiny"
    assert not raw.startswith(b"\x80") and b"torch._utils" not in raw


def test_checksum_mismatch_is_refused(tmp_path):
    folder = tiny_model_folder(tmp_path / "m")
    data = bytearray((folder / "weights.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (folder / "weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(ModelError, match="checksum mismatch"):
        read_model_folder(folder)


def test_schema_violations_name_the_field(tmp_path):
    folder = tiny_model_folder(tmp_path / "m")
    card = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    del card["labels"]
    (folder / "model.json").write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(ModelError, match="'labels' is a required property"):
        read_model_folder(folder)


def test_bad_field_values_are_refused(tmp_path):
    folder = tiny_model_folder(tmp_path / "m")
    path = folder / "model.json"
    good = json.loads(path.read_text(encoding="utf-8"))
    bad = json.loads(json.dumps(good))
    bad["labels"][0]["color"] = [2, 0, 0]
    path.write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(ModelError, match="labels/0/color/0"):
        read_model_folder(folder)
    bad = json.loads(json.dumps(good))
    bad["labels"][1]["value"] = 1
    path.write_text(json.dumps(bad), encoding="utf-8")
    with pytest.raises(ModelError, match="duplicate label values"):
        read_model_folder(folder)


def test_unknown_architecture_is_a_model_error(tmp_path):
    folder = tiny_model_folder(tmp_path / "m")
    card = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    card["architecture"]["name"] = "transunet"
    (folder / "model.json").write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(ModelError, match="unknown network architecture 'transunet'.*unet"):
        load_network(folder)


def test_weights_that_do_not_fit_the_card(tmp_path):
    folder = tiny_model_folder(tmp_path / "m")
    card = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    card["architecture"]["config"]["features"] = [4, 8, 16]
    (folder / "model.json").write_text(json.dumps(card), encoding="utf-8")
    with pytest.raises(ModelError, match="do not fit the architecture"):
        load_network(folder)


def test_store_versions_are_immutable_and_rollback_works(tmp_path):
    store = ModelStore(tmp_path / "store")
    card, net = tiny_card()
    first = store.add_version(card, net)
    assert first.version == 1 and store.active_version("tiny") is None  # never active unless asked
    with pytest.raises(ModelError, match="has no active version.*tiny:1"):
        store.folder("tiny")
    store.activate("tiny:1")
    assert store.active_version("tiny") == 1
    second = store.add_version(card.__class__(**{**card.__dict__, "parent_version": 1}), net)
    assert second.version == 2 and second.parent_version == 1
    assert store.active_version("tiny") == 1  # a new version is not active until activated
    store.activate("tiny:2")
    assert store.card("tiny").version == 2
    before = (tmp_path / "store" / "tiny" / "1" / "weights.safetensors").read_bytes()
    assert store.rollback("tiny") == 1
    assert store.card("tiny").version == 1
    assert (tmp_path / "store" / "tiny" / "1" / "weights.safetensors").read_bytes() == before
    with pytest.raises(ModelError, match="nothing to roll back"):
        store.rollback("tiny")
    rows = store.list()
    assert [(r["version"], r["active"]) for r in rows] == [(1, True), (2, False)]


def test_import_is_idempotent_and_refuses_conflicts(tmp_path):
    store = ModelStore(tmp_path / "store")
    folder = tiny_model_folder(tmp_path / "m")
    assert store.import_folder(folder).ref == "tiny:1"
    assert store.import_folder(folder).ref == "tiny:1"
    other_card, other_net = tiny_card()
    with torch.no_grad():
        next(other_net.parameters()).add_(1.0)
    from deepseg_core.model_store import write_model_folder

    write_model_folder(tmp_path / "other", other_card, other_net)
    with pytest.raises(ModelError, match="already exists in the store with different weights"):
        store.import_folder(tmp_path / "other")


def test_unknown_names_and_versions(tmp_path, monkeypatch):
    store = ModelStore(tmp_path / "store")
    store.import_folder(tiny_model_folder(tmp_path / "m"))
    with pytest.raises(ModelError, match=r"unknown model 'liver'.*one of \['tiny'\].*never downloads"):
        store.folder("liver")
    with pytest.raises(ModelError, match="has no version 7"):
        store.folder("tiny:7")
    with pytest.raises(ModelError, match="NAME:VERSION"):
        store.folder("tiny:latest")
    assert resolve_model("tiny", store) == tmp_path / "store" / "tiny" / "1"
    assert resolve_model(str(tmp_path / "m"), store) == tmp_path / "m"
    monkeypatch.setenv("DEEPSEG_MODELS", str(tmp_path / "store"))
    assert ModelStore().root == tmp_path / "store"


def test_bundled_model_resolves_by_name(tmp_path):
    folder = resolve_model("phantom-liver", ModelStore(tmp_path / "empty"))
    card = read_model_folder(folder)
    assert card.name == "phantom-liver" and [lab.name for lab in card.labels] == ["liver", "liver lesion"]
    assert card.labels[0].code.value == "10200004"
    assert card.fingerprint["num_cases"] > 0 and "validation" in card.metrics


def test_a_version_stored_while_another_process_stores_one_of_the_same_name_waits_and_takes_the_next_number(tmp_path):
    """Two trainings of one name that end together: the second took the same number and, after all its epochs,
    failed to store. Here the test plays the other process, holding the name's lock while it writes version 1."""
    import threading

    from deepseg_core.fileutil import exclusive_lock
    from deepseg_core.model_store import CHANGE_LOCK_FILE, write_model_folder

    store = ModelStore(tmp_path / "store")
    card, net = tiny_card()
    (store.root / card.name).mkdir(parents=True)
    stored: list = []
    with exclusive_lock(store.root / card.name / CHANGE_LOCK_FILE):
        adding = threading.Thread(target=lambda: stored.append(store.add_version(card, net, activate=True)))
        adding.start()
        adding.join(0.5)
        assert adding.is_alive() and stored == [], "it waits for the other process's change"
        write_model_folder(store.root / card.name / "1", card, net)  # the other process's version 1
    adding.join(10)
    assert [written.version for written in stored] == [2] and store.versions(card.name) == [1, 2]
    assert store.active_version(card.name) == 2
    with pytest.raises(ModelError, match="nothing to roll back"):
        store.rollback("no-such-model")
    assert not (store.root / "no-such-model").exists(), "a change to a name the store lacks makes no folder"
