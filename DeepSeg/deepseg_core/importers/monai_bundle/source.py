"""Reading a MONAI bundle folder: metadata, inference config and weights, as data, each file hashed.

The configs are parsed as plain JSON (duplicate keys refused) or YAML (``safe_load``); nothing in
them is evaluated. The weights are kept as bytes (:mod:`.network` loads them). A bundle with only
``models/model.ts`` (TorchScript, which carries code) is refused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...model_card import ModelError

METADATA = "configs/metadata.json"
INFERENCE_CANDIDATES = ("configs/inference.json", "configs/inference.yaml", "configs/inference.yml")
WEIGHTS = "models/model.pt"
TORCHSCRIPT = "models/model.ts"


@dataclass
class BundleSource:
    """What was read from a bundle folder.

    Attributes:
        folder: the bundle folder.
        files: relative path -> SHA-256 of every file read.
        metadata: ``configs/metadata.json``.
        config: the inference config (JSON or YAML) with the metadata under ``_meta_``.
        config_file: relative path of the inference config.
        weights: the bytes of ``models/model.pt``.
    """

    folder: Path
    files: dict[str, str]
    metadata: dict[str, Any]
    config: dict[str, Any]
    config_file: str
    weights: bytes


def _read(folder: Path, relative: str, files: dict[str, str]) -> bytes:
    data = (folder / relative).read_bytes()
    files[relative] = hashlib.sha256(data).hexdigest()
    return data


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"duplicate keys {duplicates}")
    return dict(pairs)


def _parse_config(data: bytes, relative: str, folder: Path) -> dict[str, Any]:
    subject = folder / relative
    if relative.endswith((".yaml", ".yml")):
        if importlib.util.find_spec("yaml") is None:
            raise ModelError(
                "this bundle's inference config is YAML, and reading YAML needs PyYAML",
                subject=subject,
                expected="the pyyaml package",
                hint="pip install pyyaml, then import again.",
            )
        import yaml

        try:
            parsed = yaml.safe_load(data.decode("utf-8"))  # safe_load builds plain data only, never objects
        except yaml.YAMLError as exc:
            raise ModelError(f"not valid YAML ({exc})", subject=subject) from None
    else:
        try:
            parsed = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
            raise ModelError(f"not valid JSON ({exc})", subject=subject) from None
    if not isinstance(parsed, dict):
        raise ModelError("a bundle config must be a JSON object / YAML mapping", subject=subject, found=type(parsed).__name__)
    return parsed


def read_bundle(folder: str | Path) -> BundleSource:
    """Read a bundle's metadata, inference config and weights (bytes), hashing each file.

    Raises:
        ModelError: a file is missing or unreadable, or the bundle has only a TorchScript export.
    """
    folder = Path(folder)
    files: dict[str, str] = {}
    if not (folder / METADATA).is_file():
        raise ModelError("not a MONAI bundle: configs/metadata.json is missing", subject=folder)
    metadata = _parse_config(_read(folder, METADATA, files), METADATA, folder)
    config_file = next((c for c in INFERENCE_CANDIDATES if (folder / c).is_file()), None)
    if config_file is None:
        raise ModelError(
            "not a MONAI bundle with an inference config",
            subject=folder / "configs",
            expected="configs/inference.json (or .yaml)",
            found=", ".join(sorted(p.name for p in (folder / "configs").iterdir())),
        )
    config = _parse_config(_read(folder, config_file, files), config_file, folder)
    if not (folder / WEIGHTS).is_file():
        if (folder / TORCHSCRIPT).is_file():
            raise ModelError(
                "this bundle has only a TorchScript export (models/model.ts), which DeepSeg does not import",
                subject=folder / TORCHSCRIPT,
                expected="the weights as a state dict in models/model.pt",
                found="models/model.ts only",
                hint="A TorchScript archive carries code as well as weights. Get the bundle's models/model.pt (the "
                "model zoo's large_files.yml lists it), or save the state dict where you trust the archive: "
                "torch.save(torch.jit.load('model.ts').state_dict(), 'models/model.pt').",
            )
        raise ModelError("the bundle's weights are missing", subject=folder / WEIGHTS, expected="models/model.pt")
    weights = _read(folder, WEIGHTS, files)
    return BundleSource(folder, files, metadata, {**config, "_meta_": metadata}, config_file, weights)
