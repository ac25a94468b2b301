"""DeepSegTraining's dataset summary (plain Python, used by the panel)."""

from __future__ import annotations

from DeepSegTrainingLib.dataset_summary import describe_dataset_folder


def test_describes_dataset_folders(tmp_path):
    assert describe_dataset_folder(tmp_path / "none").startswith("Dataset folder not found")
    assert "expected imagesTr/ and labelsTr/" in describe_dataset_folder(tmp_path)
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    for case in ("a", "b"):
        (tmp_path / "labelsTr" / f"{case}.nii.gz").write_bytes(b"")
    assert describe_dataset_folder(tmp_path).startswith("2 training case(s)")
