"""The importer: a bundle folder -> a new model version in the store.

Read (:mod:`.source`), map (:mod:`.mapping`), load the weights (:mod:`.network`), then store a card
with the labels, inputs, closest DeepSeg normalisation, sliding-window defaults, the pipeline config,
and ``source`` with the SHA-256 of every file read. Importing the same files again returns the
version already stored.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from ...config import to_dict
from ...model_card import Architecture, ModelCard, ModelError, Preprocessing
from ...nets.monai_network import require_monai
from .mapping import BundleMapping, map_bundle
from .network import load_state_dict, loaded_network
from .source import WEIGHTS, BundleSource, read_bundle

# the package's name, not this module's: log lines keep the name they had before the package was split
log = logging.getLogger(__package__)

FORMAT = "monai_bundle"


def sanitize_name(text: str) -> str:
    """A store name (``^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$``) from free text: lower case, runs of other characters -> ``-``."""
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", text.strip().lower()).strip("-._")
    return cleaned[:64].rstrip("-._")


def bundle_name(source: BundleSource) -> str:
    """The store name: metadata ``name``, else the folder's name, sanitised."""
    for candidate in (source.metadata.get("name"), source.folder.resolve().name):
        if isinstance(candidate, str) and sanitize_name(candidate):
            return sanitize_name(candidate)
    return "monai-bundle"


def import_bundle(folder: str | Path, store: Any, name: str | None = None, activate: bool = True, **options: Any) -> ModelCard:
    """Import the MONAI bundle in ``folder`` into ``store`` as a new model version; returns its card.

    Args:
        folder: the bundle folder (``configs/``, ``models/``).
        store: a :class:`~deepseg_core.model_store.ModelStore`.
        name: the model's name (default: the bundle metadata's ``name``, sanitised).
        activate: make the new version active.
        options: none are accepted (nnU-Net's folds / configuration do not apply).

    Raises:
        ModelError: unreadable or incomplete bundle, unsupported or unsafe content (all listed at
            once), weights that need more than ``torch.load(weights_only=True)``.
        ConfigError: MONAI is not installed.
    """
    folder = Path(folder)
    if options:
        raise ModelError("a MONAI bundle takes no import options", subject=folder, found=f"{sorted(options)}")
    require_monai("Importing a MONAI bundle")
    source = read_bundle(folder)
    mapping = map_bundle(source)
    state = load_state_dict(source.weights, folder / WEIGHTS)
    net = loaded_network(mapping.network, state, folder / WEIGHTS)
    model_name = name or bundle_name(source)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", model_name):
        raise ModelError("invalid model name", expected="letters, digits, '.', '_', '-' (64 at most)", found=model_name)
    for version in reversed(store.versions(model_name)) if model_name in store.names() else []:
        card = store.card(f"{model_name}:{version}")
        if card.source.get("format") == FORMAT and card.source.get("files") == source.files:
            log.info("bundle %s is already stored as %s", folder, card.ref)
            return card
    stored = store.add_version(_new_card(folder, source, mapping, model_name), net, activate=activate)
    log.info("imported MONAI bundle %s as %s", folder, stored.ref)
    return stored


def _new_card(folder: Path, source: BundleSource, mapping: BundleMapping, model_name: str) -> ModelCard:
    """The card of the imported version (the store sets the version and the weights' checksum)."""
    import monai

    metadata = source.metadata
    description = str(metadata.get("description") or metadata.get("task") or "").strip()
    return ModelCard(
        name=model_name,
        version=1,
        architecture=Architecture("monai_network", to_dict(mapping.network)),
        inputs=mapping.inputs,
        labels=mapping.labels,
        preprocessing=Preprocessing(target_spacing_xyz_mm=mapping.target_spacing_xyz_mm, normalization=mapping.normalization),
        inference=mapping.inference,
        weights_sha256="0" * 64,
        description=(description + " " if description else "") + f"(imported from MONAI bundle {folder.resolve().name})",
        source={
            "format": FORMAT,
            "path": str(folder.resolve()),
            "files": dict(sorted(source.files.items())),
            "bundle_name": str(metadata.get("name", "")),
            "bundle_version": str(metadata.get("version", "")),
            "bundle_monai_version": str(metadata.get("monai_version", "")),
            "imported_with_monai": monai.__version__,
            "inference_config": source.config_file,
            "eval_metrics": metadata.get("eval_metrics", {}) if isinstance(metadata.get("eval_metrics"), dict) else {},
        },
        pipeline={"name": FORMAT, "config": mapping.pipeline_config},
    )
