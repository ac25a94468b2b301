"""Short human descriptions of dataset folders for the training panel (no Slicer imports needed)."""

from __future__ import annotations

from pathlib import Path


def describe_dataset_folder(path: str | Path) -> str:
    """``"12 cases (10 training, 2 validation, split fixed); labels 1=liver, 2=lesion; channels CT"``
    or what is wrong with the folder."""
    from deepseg_core.datasets import Dataset
    from deepseg_core.errors import DeepSegError

    folder = Path(path)
    if not str(path) or not folder.is_dir():
        return f"Dataset folder not found: {folder}"
    images, labels = folder / "imagesTr", folder / "labelsTr"
    if not images.is_dir() or not labels.is_dir():
        return f"{folder} is not a dataset: expected imagesTr/ and labelsTr/ folders (nnU-Net v2 layout)."
    try:
        summary = Dataset.open(folder).summary()
    except DeepSegError as exc:
        return str(exc)
    split = "split fixed" if summary["split_fixed"] else "split drawn on first training"
    label_text = ", ".join(f"{v}={n}" for v, n in summary["labels"].items())
    return (
        f"{summary['cases']} case(s) ({summary['train']} training, {summary['validation']} validation, {split}); "
        f"labels {label_text}; channels {', '.join(summary['channels'])}"
    )
