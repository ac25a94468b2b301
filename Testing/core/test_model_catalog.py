"""The model list read as plain JSON (what the Slicer panels show before anything is installed)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from deepseg_core.demo import DEFAULT_MODEL
from deepseg_core.model_catalog import list_models, read_card_json, store_state
from deepseg_core.model_store import ModelStore

REPO = Path(__file__).resolve().parents[2]


def test_store_versions_active_first_then_bundled_models_the_store_does_not_shadow(tmp_path):
    entries, problems = list_models(tmp_path / "store")
    assert [(e.ref, e.bundled, e.active) for e in entries] == [(str(DEFAULT_MODEL), True, True)]
    assert entries[0].labels[1].name == "liver lesion" and entries[0].validation_dice["liver"] > 0.99 and problems == []
    store = ModelStore(tmp_path / "store")
    store.import_folder(DEFAULT_MODEL)
    for version in (2, 3):
        target = tmp_path / "store" / "phantom-liver" / str(version)
        shutil.copytree(DEFAULT_MODEL, target)
        card = json.loads((target / "model.json").read_text())
        (target / "model.json").write_text(json.dumps({**card, "version": version}))
    store.activate("phantom-liver:2")
    entries, _ = list_models(tmp_path / "store")
    assert [(e.ref, e.active) for e in entries] == [
        ("phantom-liver:2", True),
        ("phantom-liver:3", False),
        ("phantom-liver:1", False),
    ]
    assert store_state(tmp_path / "store", "phantom-liver") == {"active": 2, "history": [1, 2]}


def test_unreadable_cards_are_reported_one_by_one(tmp_path):
    root = tmp_path / "store"
    (root / "a" / "1").mkdir(parents=True)
    (root / "a" / "1" / "model.json").write_text("[1, 2")
    (root / "b" / "1").mkdir(parents=True)
    (root / "b" / "1" / "model.json").write_text(json.dumps({"name": "b"}))
    entries, problems = list_models(root)
    assert [e.bundled for e in entries] == [True]
    assert "a/1/model.json: model card cannot be read as JSON" in problems[0]
    assert "b/1/model.json: model card lacks the field(s) ['version', 'inputs', 'labels']" in problems[1]
    assert read_card_json(DEFAULT_MODEL)["name"] == "phantom-liver"


def test_listing_and_activating_models_imports_neither_torch_nor_jsonschema():
    code = (
        f"import sys; sys.path.insert(0, {str(REPO / 'DeepSeg')!r})\n"
        "from deepseg_core import model_catalog, model_store\n"
        "model_catalog.list_models('/nonexistent')\n"
        "print(sorted(m for m in ('torch', 'jsonschema', 'safetensors') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
