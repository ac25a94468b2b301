"""Short human descriptions of dataset folders for the training panel (no Slicer imports needed)."""

from __future__ import annotations

from pathlib import Path


def describe_dataset_folder(path: str | Path) -> str:
    """``"12 training cases (imagesTr/labelsTr)"`` or what is wrong with the folder."""
    folder = Path(path)
    if not str(path) or not folder.is_dir():
        return f"Dataset folder not found: {folder}"
    images, labels = folder / "imagesTr", folder / "labelsTr"
    if not images.is_dir() or not labels.is_dir():
        return f"{folder} is not a dataset: expected imagesTr/ and labelsTr/ folders (nnU-Net v2 layout)."
    cases = sorted(p.name for p in labels.iterdir() if not p.name.startswith("."))
    return f"{len(cases)} training case(s) in {folder.name} (imagesTr/labelsTr)"
