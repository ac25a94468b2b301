"""The nnU-Net model folder: its JSON files, the fold folders to ensemble and the configuration they hold.

A trained model folder is ``<results>/DatasetXXX_Name/<Trainer>__<Plans>__<configuration>/`` holding
``dataset.json``, ``plans.json`` (``dataset_fingerprint.json``) and ``fold_*/checkpoint_final.pth``
(or ``checkpoint_best.pth``). The folds are chosen as nnU-Net chooses them; every file read is hashed
into the card's ``source``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...model_card import ModelError
from ...model_store import sha256_file

# the package's name, not this module's: log lines keep the name they had before the package was split
log = logging.getLogger(__package__)

CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_best.pth")


class NnUNetImportError(ModelError):
    """An nnU-Net folder that cannot be imported (missing file, unsupported feature, unsafe checkpoint)."""


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file of the model folder; a missing or malformed one is an :class:`NnUNetImportError`."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NnUNetImportError(
            "file missing from the nnU-Net model folder",
            subject=path,
            hint="Give the trained model folder <Trainer>__<Plans>__<configuration> itself.",
        ) from None
    except json.JSONDecodeError as exc:
        raise NnUNetImportError(f"not valid JSON ({exc.msg}, line {exc.lineno})", subject=path) from None


def checkpoint_name(checkpoint: str | None) -> str:
    """The checkpoint file name asked for (default ``checkpoint_final.pth``), checked to be a plain ``.pth`` name."""
    checkpoint = checkpoint or CHECKPOINTS[0]
    if Path(checkpoint).name != checkpoint or not checkpoint.endswith(".pth"):
        raise NnUNetImportError("invalid checkpoint name", expected=" or ".join(CHECKPOINTS), found=checkpoint)
    return checkpoint


def fold_folders(folder: Path, folds: Sequence[int | str] | None, checkpoint: str) -> list[Path]:
    """The fold folders to ensemble: ``folds`` (each must hold ``checkpoint``), else nnU-Net's choice."""
    if folds:
        chosen = [folder / f"fold_{f}" for f in folds]
        missing = [p.name for p in chosen if not (p / checkpoint).is_file()]
        if missing:
            raise NnUNetImportError(
                f"fold(s) without {checkpoint}: {', '.join(missing)}",
                subject=folder,
                expected=f"fold_N/{checkpoint} for every fold asked for",
                found=", ".join(sorted(p.name for p in folder.glob("fold_*/*.pth"))) or "no checkpoints",
            )
        return chosen
    # nnU-Net's auto-detection: every fold_N with the checkpoint, fold_all left out
    numbered = sorted(
        (p for p in folder.glob("fold_*") if p.name[5:].isdigit() and (p / checkpoint).is_file()), key=lambda p: int(p.name[5:])
    )
    if numbered:
        return numbered
    if (folder / "fold_all" / checkpoint).is_file():
        log.info("%s: no fold_N, using fold_all", folder)
        return [folder / "fold_all"]
    raise NnUNetImportError(
        f"no fold_*/{checkpoint} in the nnU-Net model folder",
        subject=folder,
        expected=f"fold_0/{checkpoint} (and more folds)",
        found=", ".join(sorted(str(p.relative_to(folder)) for p in folder.glob("fold_*/*.pth"))) or "no checkpoints",
        hint="Training writes checkpoint_final.pth at its end; use --checkpoint checkpoint_best.pth for an unfinished run.",
    )


def configuration_name(folder: Path, checkpoints: dict[str, dict[str, Any]], asked: str | None) -> str:
    """The configuration the folds were trained with (their ``init_args``, else the folder's name); ``asked`` must agree."""
    from_checkpoints = {str((c.get("init_args") or {}).get("configuration")) for c in checkpoints.values()} - {"None"}
    if len(from_checkpoints) > 1:
        raise NnUNetImportError(
            "the folds were trained with different configurations", subject=folder, found=str(sorted(from_checkpoints))
        )
    parts = name_parts(folder)
    from_folder = parts[2] if parts else None
    found = next(iter(from_checkpoints), None) or from_folder
    if asked is not None and found is not None and asked != found:
        raise NnUNetImportError(
            f"--configuration {asked} does not match the checkpoints",
            subject=folder,
            expected=found,
            found=asked,
            hint="The configuration comes from the checkpoint's init_args; leave --configuration out.",
        )
    configuration = asked or found
    if configuration is None:
        raise NnUNetImportError(
            "cannot tell which configuration this folder holds",
            subject=folder,
            expected="checkpoints with init_args, or a folder named <Trainer>__<Plans>__<configuration>",
            hint="Give it with --configuration 2d, 3d_fullres or 3d_lowres.",
        )
    return configuration


def source_files(folder: Path, fold_dirs: Sequence[Path], checkpoint: str) -> dict[str, str]:
    """SHA-256 of every file the import reads, by its path in ``folder``."""
    files_read = [folder / "dataset.json", folder / "plans.json", *(p / checkpoint for p in fold_dirs)]
    if (folder / "dataset_fingerprint.json").is_file():
        files_read.append(folder / "dataset_fingerprint.json")
    return {str(p.relative_to(folder)): sha256_file(p) for p in files_read}


def name_parts(folder: Path) -> tuple[str, str, str] | None:
    """``(trainer, plans, configuration)`` from a folder named ``<Trainer>__<Plans>__<configuration>``, else None."""
    parts = folder.name.split("__")
    return (parts[0], parts[1], parts[2]) if len(parts) == 3 else None
