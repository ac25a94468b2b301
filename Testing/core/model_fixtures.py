"""Small real model folders for tests (random weights, real safetensors files, real cards)."""

from __future__ import annotations

from pathlib import Path

from deepseg_core.config import to_dict
from deepseg_core.model_card import Architecture, InferenceDefaults, Inputs, ModelCard, Normalization, Preprocessing
from deepseg_core.model_store import write_model_folder
from deepseg_core.nets import UNetConfig, build_net
from deepseg_core.phantoms import PHANTOM_LABELS


def tiny_card(
    name: str = "tiny", arch: str = "3d", spacing=(1.5, 1.5, 2.5), channels=("CT",), modality: str = "CT"
) -> tuple[ModelCard, object]:
    if arch == "3d":
        cfg = UNetConfig(spatial_dims=3, in_channels=len(channels), num_classes=3, features=(4, 8))
        patch = (8, 16, 16)
    else:
        cfg = UNetConfig(
            spatial_dims=2, in_channels=len(channels), num_classes=3, features=(4, 8), context_slices=3 if arch == "2.5d" else 1
        )
        patch = (1, 16, 16)
    norm = Normalization("ct", window=(-200.0, 300.0), mean=80.0, std=60.0) if modality == "CT" else Normalization("zscore")
    card = ModelCard(
        name=name,
        version=1,
        architecture=Architecture("unet", to_dict(cfg)),
        inputs=Inputs(modality, tuple(channels)),
        labels=PHANTOM_LABELS,
        preprocessing=Preprocessing(target_spacing_xyz_mm=tuple(spacing), normalization=norm),
        inference=InferenceDefaults(patch_size_zyx=patch, overlap=0.25, batch_size=2),
        weights_sha256="0" * 64,
        description="test model",
    )
    return card, build_net("unet", cfg, seed=0)


def tiny_model_folder(folder: Path, **kwargs) -> Path:
    card, net = tiny_card(**kwargs)
    write_model_folder(folder, card, net)
    return folder
