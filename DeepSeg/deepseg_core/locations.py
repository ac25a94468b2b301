"""Default folders DeepSeg writes to on its own (standard library only, for the Slicer panels too)."""

from __future__ import annotations

import tempfile
from pathlib import Path


def default_checkpoint_dir(name: str) -> Path:
    """Where ``deepseg train --name NAME`` keeps checkpoints unless told otherwise."""
    return Path(tempfile.gettempdir()) / f"deepseg-train-{name}"
