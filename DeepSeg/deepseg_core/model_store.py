"""Model folders (``model.json`` + ``weights.safetensors``) and the versioned model store.

The store's layout is described (and read as plain JSON) in :mod:`.model_catalog`. A version folder
is written under a temporary name and renamed into place, and never written again: saving over an
existing version is refused. ``history`` in ``state.json`` records activations, so ``rollback``
returns to the version that was active before.

Importing this module does not import torch (the Slicer panels promote and roll back versions in
Slicer's own process); reading and writing weights does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .fileutil import atomic_write_text, default_mode, exclusive_lock
from .model_card import ModelCard, ModelError
from .model_catalog import (
    CARD_FILE,
    STATE_FILE,
    WEIGHTS_FILE,
    bundled_model_folders,
    store_names,
    store_root,
    store_state,
    store_versions,
)

#: beside a name's versions: held while versions are added or the active version changes (:meth:`ModelStore._changing`)
CHANGE_LOCK_FILE = ".changes.lock"

if TYPE_CHECKING:  # torch is imported where weights are read or written, so listing and activating stay light
    import torch
    from torch import nn

    from .inference.backends import DeferredNetwork


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_model_folder(folder: Path, card: ModelCard, net: nn.Module) -> ModelCard:
    """Write ``net``'s weights and ``card`` (with the weights' checksum filled in) into a new folder.

    Returns the card as written. Refuses an existing folder (versions are immutable).
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists():
        raise ModelError("refusing to overwrite an existing model folder", subject=folder, hint="Model versions are immutable.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        from .nets import network_weights

        tensors = network_weights(net)
        state = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(state, str(staging / WEIGHTS_FILE), metadata={"format": "pt", "model": card.name})
        card = dataclasses.replace(card, weights_sha256=sha256_file(staging / WEIGHTS_FILE))
        (staging / CARD_FILE).write_text(json.dumps(card.to_json_dict(), indent=2) + "\n", encoding="utf-8")
        os.chmod(staging, default_mode(is_dir=True))
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return card


def read_model_folder(folder: str | Path) -> ModelCard:
    """Read and validate a model folder's card and check its weights' checksum (no weights loaded)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(
            "model folder not found", subject=folder, hint="Give a model folder, or NAME[:VERSION] from `deepseg models list`."
        )
    card = ModelCard.read(folder / CARD_FILE)
    weights = folder / WEIGHTS_FILE
    if not weights.exists():
        raise ModelError("weights file missing", subject=weights, expected=WEIGHTS_FILE)
    actual = sha256_file(weights)
    if actual != card.weights_sha256:
        raise ModelError(
            "weights checksum mismatch: the file is corrupt or was changed after the card was written",
            subject=weights,
            expected=f"sha256 {card.weights_sha256}",
            found=f"sha256 {actual}",
            hint="Re-import the model from its original folder.",
        )
    return card


def load_network(
    folder: str | Path, card: ModelCard | None = None, device: str | torch.device = "cpu"
) -> tuple[ModelCard, nn.Module]:
    """Card and network (eval mode, on ``device``) of a model folder. Never unpickles.

    An ensemble card (``card.ensemble``) gives a :class:`~deepseg_core.nets.LogitEnsemble` of its members; a
    cascade's card (``card.previous_stage``) a :class:`~deepseg_core.nets.CascadeNetwork` of both stages.
    """
    card, net, previous_stage = deferred_networks(folder, card)
    if previous_stage is None:
        return card, net.network().to(device).eval()
    from .nets import CascadeNetwork

    return card, CascadeNetwork(net.network(), previous_stage.network()).to(device).eval()


def deferred_networks(
    folder: str | Path, card: ModelCard | None = None
) -> tuple[ModelCard, DeferredNetwork, DeferredNetwork | None]:
    """Card and network of a model folder as :func:`load_network` gives them (on the CPU, eval mode), each built
    only when first needed (:class:`~deepseg_core.inference.backends.DeferredNetwork`); a cascade's two stages
    apart, the first stage's last (None for any other model). The weights are read and their file checked now,
    and so is each card's architecture (name and config); whether the weights fit it is checked when a network
    is built."""
    from .errors import ConfigError
    from .inference.backends import DeferredNetwork
    from .nets import LogitEnsemble, architecture_config

    folder = Path(folder)
    card = card or read_model_folder(folder)
    second, first = _stage_weights(card, read_weights(folder))

    def deferred(stage_card: ModelCard, state: dict[str, torch.Tensor], stage: str) -> DeferredNetwork:
        try:
            architecture_config(stage_card.architecture.name, stage_card.architecture.config)
        except ConfigError as exc:
            raise ModelError(f"cannot build the model's network{stage}: {exc}", subject=folder / CARD_FILE) from None

        def build() -> nn.Module:
            return _network_from_state(stage_card, state, folder, stage).eval()

        if not stage_card.ensemble:
            return DeferredNetwork(build, state)
        # the file names a member's tensors "<member>.<name>", the ensemble's state_dict by the submodule it registers
        renamed = {}
        for key, value in state.items():
            member, _, name = key.partition(".")
            renamed[f"{LogitEnsemble.submodule_name(member)}.{name}"] = value
        return DeferredNetwork(build, renamed)

    if card.previous_stage is None:
        return card, deferred(card, second, ""), None
    return card, deferred(card, second, ""), deferred(card.previous_stage, first, " (first stage)")


def read_weights(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder's weights file, by name (safetensors: nothing is unpickled)."""
    from safetensors.torch import load_file

    path = Path(folder) / WEIGHTS_FILE
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own error types for a bad file
        raise ModelError("weights file cannot be read as safetensors", subject=path, found=str(exc)) from None


def _stage_weights(card: ModelCard, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A cascade's weights split into its second stage's and its first stage's (``previous_stage.``); any other
    model's as they are, and no first stage's."""
    if card.previous_stage is None:
        return state, {}
    prefix = "previous_stage."
    first = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    second = {k: v for k, v in state.items() if not k.startswith(prefix)}
    return second, first


def _network_from_state(card: ModelCard, state: dict[str, torch.Tensor], folder: Path, stage: str = "") -> nn.Module:
    """The card's network (an ensemble of its members when ``card.ensemble``) with ``state`` loaded."""
    from .nets import LogitEnsemble

    if not card.ensemble:
        return _built_and_loaded(card, state, folder, stage)
    members = {}
    for member in card.ensemble:
        prefix = f"{member}."
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        members[member] = _built_and_loaded(card, own, folder, f"{stage} (ensemble member {member!r})")
    leftover = sorted(k for k in state if not k.startswith(tuple(f"{m}." for m in card.ensemble)))
    if leftover:
        raise ModelError(f"weights hold tensors of no ensemble member{stage}", subject=folder, found=str(leftover[:3]))
    return LogitEnsemble(members)


def _built_and_loaded(card: ModelCard, state: dict[str, torch.Tensor], folder: Path, what: str) -> nn.Module:
    """The card's network with ``state`` loaded (strict); a mismatch is a clear :class:`ModelError`."""
    from .errors import ConfigError
    from .nets import build_net

    try:
        net = build_net(card.architecture.name, card.architecture.config)
    except ConfigError as exc:
        raise ModelError(f"cannot build the model's network: {exc}", subject=folder / CARD_FILE) from None
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or mismatched:
        raise ModelError(
            f"weights do not fit the architecture in the card{what}",
            subject=folder,
            found=f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {mismatched[:3]}",
            hint="The card and weights.safetensors come from different models.",
        )
    net.load_state_dict(state, strict=True)
    return net


def parse_ref(ref: str) -> tuple[str, int | None]:
    """``"name"`` or ``"name:3"`` -> (name, version or None)."""
    name, _, version = ref.partition(":")
    if version and not version.isdigit():
        raise ModelError(f"invalid model reference {ref!r}", expected="NAME or NAME:VERSION (VERSION a number)", found=ref)
    return name, int(version) if version else None


class ModelStore:
    """Versioned models on disk (see module docstring)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = store_root(root)

    # ---------------------------------------------------------------- queries
    def names(self) -> list[str]:
        """Model names in the store."""
        return store_names(self.root)

    def versions(self, name: str) -> list[int]:
        """Stored versions of ``name``, ascending."""
        return store_versions(self.root, name)

    def _state(self, name: str) -> dict:
        return store_state(self.root, name)

    def active_version(self, name: str) -> int | None:
        """The version ``name`` resolves to without an explicit version."""
        return self._state(name)["active"]

    def folder(self, ref: str) -> Path:
        """Folder of ``NAME[:VERSION]`` (active version when none is given)."""
        name, version = parse_ref(ref)
        if name not in self.names():
            raise ModelError(
                f"unknown model {name!r}",
                subject=self.root,
                expected=f"one of {self.names()}" if self.names() else "a model in the store",
                found=name,
                hint="Import it with `deepseg models import FOLDER`; DeepSeg never downloads models.",
            )
        version = version or self.active_version(name)
        if version is None:
            raise ModelError(
                f"model {name!r} has no active version",
                expected="NAME:VERSION",
                found=name,
                hint=f"Give a version ({', '.join(f'{name}:{v}' for v in self.versions(name))}) or activate one: "
                f"deepseg models activate {name}:N.",
            )
        if version not in self.versions(name):
            raise ModelError(
                f"model {name!r} has no version {version}", expected=f"one of {self.versions(name)}", found=str(version)
            )
        return self.root / name / str(version)

    def card(self, ref: str) -> ModelCard:
        """Validated card (checksum checked) of ``NAME[:VERSION]``."""
        return read_model_folder(self.folder(ref))

    def version_trained_by(self, name: str, run_id: str) -> str | None:
        """``NAME:VERSION`` of the stored version whose card records training run ``run_id``
        (``metrics.training.run_id``), or None. Cards are read without checking the weights' checksum."""
        for version in self.versions(name):
            card = ModelCard.read(self.root / name / str(version) / CARD_FILE)
            training = card.metrics.get("training")
            if isinstance(training, dict) and training.get("run_id") == run_id:
                return card.ref
        return None

    def list(self) -> list[dict]:
        """One row per stored version: name, version, parent, active, created, description."""
        rows = []
        for name in self.names():
            active = self.active_version(name)
            for version in self.versions(name):
                card = ModelCard.read(self.root / name / str(version) / CARD_FILE)
                rows.append(
                    {
                        "name": name,
                        "version": version,
                        "parent_version": card.parent_version,
                        "active": version == active,
                        "created": card.created,
                        "labels": [label.name for label in card.labels],
                        "description": card.description,
                    }
                )
        return rows

    # ---------------------------------------------------------------- changes
    def _write_state(self, name: str, state: dict) -> None:
        atomic_write_text(self.root / name / STATE_FILE, json.dumps(state, indent=2) + "\n")

    @contextlib.contextmanager
    def _changing(self, name: str, create: bool = False) -> Iterator[None]:
        """One process at a time adds versions of ``name`` or changes its active version: two trainings of one
        name ending together both took the next version number, and the second, after all its epochs, failed
        to store; two activations could each write the history it read before the other's."""
        folder = self.root / name
        if create:  # adding the name's first version
            folder.mkdir(parents=True, exist_ok=True)
        if not folder.is_dir():  # a name the store does not hold: the change fails as before, and no folder is made
            yield
            return
        with exclusive_lock(folder / CHANGE_LOCK_FILE):
            yield

    def add_version(self, card: ModelCard, net: nn.Module, activate: bool = False) -> ModelCard:
        """Store ``net`` as the next version of ``card.name`` (parent = ``card.parent_version``).

        The new version becomes active only when ``activate`` is True, also for a name the store
        does not hold yet (``NAME`` then has no active version until ``activate``).
        """
        with self._changing(card.name, create=True):
            existing = self.versions(card.name)
            state = self._state(card.name)
            version = (existing[-1] + 1) if existing else 1
            folder = self.root / card.name / str(version)
            written = write_model_folder(folder, dataclasses.replace(card, version=version), net)
            if activate:
                self._activate(card.name, version)
            elif not (self.root / card.name / STATE_FILE).exists():
                # Record what was active before this version existed, so nothing resolves to it by default.
                self._write_state(card.name, {"active": state["active"], "history": state["history"]})
        return written

    def keep_parent(self, folder: str | Path, check_only: bool = False) -> ModelCard:
        """Make the model a fine-tune starts from a version in the store, so rollback can return to it.

        A bundled model (or any folder outside the store) of a name the store does not hold yet is
        imported under its own version and made active: users keep getting the model they had,
        now as a real store version. A store version is returned as it is. ``check_only``: raise the
        error below, if any, but import nothing (before a long training run).

        Raises:
            ModelError: the store holds a *different* model under the same name and version.
        """
        folder = Path(folder)
        card = read_model_folder(folder)
        target = self.root / card.name / str(card.version)
        if target.exists() and target.resolve() == folder.resolve():
            return card
        if target.exists():
            if sha256_file(target / WEIGHTS_FILE) == card.weights_sha256:
                return card
            raise ModelError(
                f"the base model {card.ref} is not the store's {card.ref}",
                subject=folder,
                expected=f"weights sha256 {sha256_file(target / WEIGHTS_FILE)[:12]}... (the store's version)",
                found=f"weights sha256 {card.weights_sha256[:12]}...",
                hint="Fine-tune the store's version (NAME:VERSION), or give the new model another name.",
            )
        if check_only:
            return card
        return self.import_folder(folder, activate=card.name not in self.names())

    def import_folder(self, folder: str | Path, activate: bool = True) -> ModelCard:
        """Copy a validated model folder into the store under its card's name and version."""
        card = read_model_folder(folder)
        target = self.root / card.name / str(card.version)
        with self._changing(card.name, create=True):
            if target.exists():
                if sha256_file(target / WEIGHTS_FILE) == card.weights_sha256:
                    return card
                raise ModelError(
                    f"{card.ref} already exists in the store with different weights",
                    subject=target,
                    hint="Versions are immutable; give the new model another version number or name.",
                )
            staging = Path(tempfile.mkdtemp(prefix=f".{card.version}.", dir=target.parent))
            try:
                for file in (CARD_FILE, WEIGHTS_FILE):
                    shutil.copy2(Path(folder) / file, staging / file)
                os.chmod(staging, default_mode(is_dir=True))
                os.replace(staging, target)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            read_model_folder(target)
            if activate:
                self._activate(card.name, card.version)
        return card

    def activate(self, ref: str) -> int:
        """Make ``NAME:VERSION`` the active version; returns it."""
        name, version = parse_ref(ref)
        self.folder(ref)
        if version is None:
            raise ModelError("activate needs an explicit version", expected="NAME:VERSION", found=ref)
        with self._changing(name):
            self._activate(name, version)
        return version

    def _activate(self, name: str, version: int) -> None:
        state = self._state(name)
        if state["active"] != version or not (self.root / name / STATE_FILE).exists():
            history = list(state["history"]) if state["history"][-1:] == [version] else [*state["history"], version]
            self._write_state(name, {"active": version, "history": history})

    def rollback(self, name: str) -> int:
        """Return to the version active before the current one; returns it."""
        with self._changing(name):
            state = self._state(name)
            history = list(state["history"])
            if len(history) < 2:
                raise ModelError(f"nothing to roll back for {name!r}", found=f"activation history {history}")
            history.pop()
            self._write_state(name, {"active": history[-1], "history": history})
        return history[-1]


def bundled_models() -> dict[str, Path]:
    """Name -> folder of the models shipped with DeepSeg."""
    return bundled_model_folders()


def resolve_model(ref: str | Path, store: ModelStore | None = None) -> Path:
    """Folder of a model: a path to a folder, ``NAME[:VERSION]`` in the store, or a bundled model's name.

    The store wins over a bundled model of the same name (an imported or retrained version).
    """
    path = Path(ref)
    if path.is_dir() or os.sep in str(ref) or str(ref).startswith("."):
        if not path.is_dir():
            raise ModelError("model folder not found", subject=path)
        return path
    store = store or ModelStore()
    name, version = parse_ref(str(ref))
    bundled = bundled_models()
    if name not in store.names() and name in bundled:
        card = ModelCard.read(bundled[name] / CARD_FILE)
        if version not in (None, card.version):
            raise ModelError(f"bundled model {name!r} has only version {card.version}", found=str(version))
        return bundled[name]
    try:
        return store.folder(str(ref))
    except ModelError as exc:
        if bundled:
            exc.args = (f"{exc.args[0]} Bundled models: {sorted(bundled)}.",)
        raise
