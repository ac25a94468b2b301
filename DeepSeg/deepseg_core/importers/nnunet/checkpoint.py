"""nnU-Net checkpoints, unpickled safely: ``torch.load(weights_only=True)`` with a numpy allow-list only.

Checkpoints are pickles: they are loaded only with ``torch.load(weights_only=True)``, which refuses
every global outside an allow-list (here the numpy scalar and dtype types nnU-Net's training log
holds) without executing anything; anything else is refused with the name of what it needed. Of a
loaded checkpoint the import keeps what nnU-Net's predictor uses (:func:`essentials`).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from .source import NnUNetImportError


def _safe_globals() -> list[Any]:
    """What nnU-Net checkpoints need beyond torch's own allow-list: numpy scalars and dtypes (training log values).

    Older checkpoints were pickled under numpy < 2, whose scalar constructor is named
    ``numpy.core.multiarray.scalar``; it is allowed under that name too.
    """
    scalar = np.dtype(np.float32).type(0).__reduce__()[0]  # numpy._core.multiarray.scalar
    allowed: list[Any] = [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype]
    for name in dir(np.dtypes):
        value = getattr(np.dtypes, name)
        if isinstance(value, type) and issubclass(value, np.dtype):
            allowed.append(value)
    return allowed


def load_checkpoint(path: Path) -> dict[str, Any]:
    """An nnU-Net checkpoint, unpickled with ``torch.load(weights_only=True)`` and the numpy allow-list only.

    Raises:
        NnUNetImportError: the file is missing, is no torch checkpoint, or needs a global outside the
            allow-list (named in the message; nothing of it was executed).
    """
    import pickle

    import torch

    if not path.is_file():
        raise NnUNetImportError("checkpoint missing", subject=path)
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        needed = re.search(r"(?:Unsupported global|GLOBAL)[: ]+(?:GLOBAL )?([\w.]+)", str(exc))
        raise NnUNetImportError(
            "the checkpoint needs more than plain tensors and numpy scalars to unpickle, so it is refused"
            " (DeepSeg loads checkpoints with torch.load(weights_only=True) only; nothing in it was run)",
            subject=path,
            expected="an nnU-Net checkpoint: tensors, numbers, strings, numpy scalars",
            found=f"a reference to {needed.group(1)}" if needed else str(exc).splitlines()[0][:200],
            hint="Only import checkpoints from a source you trust; re-save it from nnU-Net if it is yours.",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise NnUNetImportError("cannot read the checkpoint", subject=path, found=str(exc).splitlines()[0][:200]) from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise NnUNetImportError(
            "not an nnU-Net checkpoint", subject=path, expected="a dict with 'network_weights'", found=type(checkpoint).__name__
        )
    return checkpoint


def essentials(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What the import uses of a checkpoint (nnU-Net's predictor uses the same): the network weights, the
    configuration, the trainer's name and the allowed mirroring axes. The optimiser state is let go at once."""
    init_args = checkpoint.get("init_args") or {}
    return {
        "network_weights": checkpoint["network_weights"],
        "init_args": {"configuration": init_args.get("configuration")},
        "trainer_name": checkpoint.get("trainer_name"),
        "inference_allowed_mirroring_axes": checkpoint.get("inference_allowed_mirroring_axes"),
    }


def network_weights(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``network_weights`` with DDP / compile wrappers' prefixes removed (nnU-Net saves without them)."""
    weights = checkpoint["network_weights"]
    for prefix in ("module.", "_orig_mod."):
        if weights and all(k.startswith(prefix) for k in weights):
            weights = {k[len(prefix) :]: v for k, v in weights.items()}
    return weights
