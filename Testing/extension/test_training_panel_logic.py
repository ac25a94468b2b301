"""DeepSegTraining's dataset summary (plain Python, used by the panel)."""

from __future__ import annotations

import json

from deepseg_core.datasets import Dataset
from deepseg_core.phantoms import PHANTOM_LABELS
from DeepSegTrainingLib.dataset_summary import describe_dataset_folder


def test_describes_dataset_folders(tmp_path):
    assert describe_dataset_folder(tmp_path / "none").startswith("Dataset folder not found")
    assert "expected imagesTr/ and labelsTr/" in describe_dataset_folder(tmp_path)
    Dataset.create(tmp_path / "ds", "ds", PHANTOM_LABELS, ("CT",))
    text = describe_dataset_folder(tmp_path / "ds")
    assert text.startswith("0 case(s) (0 training, 0 validation, split drawn on first training)")
    assert "labels 1=liver, 2=liver lesion; channels CT" in text
    (tmp_path / "ds" / "dataset.json").write_text(json.dumps({"labels": {}}))
    assert "lacks a field" in describe_dataset_folder(tmp_path / "ds")
