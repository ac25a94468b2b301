"""A bundle's network: ``network_def`` mapped onto :class:`MonaiNetConfig`, and ``models/model.pt`` loaded into it.

- the network: ``network_def`` with its ``@`` references resolved to literals, checked (only
  classes of ``monai.networks.nets``, no ``$`` expressions, macros or weight-fetching arguments;
  :mod:`deepseg_core.nets.monai_network`) and rebuilt by MONAI's ConfigParser;
- the weights: ``models/model.pt`` loaded with ``torch.load(weights_only=True)`` only (a state dict,
  or a checkpoint holding one under ``"model"``, as MONAI's CheckpointLoader reads it) and stored as
  safetensors; the pickle is never kept.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ...model_card import ModelError
from ...nets.monai_network import MonaiNetConfig, MonaiNetwork, check_network_def
from .walker import ConfigWalker, first_entry


def map_network(walker: ConfigWalker, post: dict[str, Any] | None) -> MonaiNetConfig | None:
    """The network config, with channels from ``network_def`` or the metadata; None with problems recorded.

    ``post`` (the mapped postprocessing) decides whether the output channels fit its activation.
    """
    raw = walker.config.get("network_def")
    if raw is None:
        walker.problem("network_def", "missing (the bundle must define its network as a config component)")
        return None
    before = len(walker.problems)
    resolved = walker.value(raw, "network_def")
    # resolve_references already named every $ / % string and every unresolved reference
    checked, problems = check_network_def(resolved, report_strings=False)
    walker.problems.extend(problems)
    if len(walker.problems) > before:
        return None
    spatial = checked.get("spatial_dims", 3)
    metadata = walker.source.metadata
    fmt = metadata.get("network_data_format", {}) if isinstance(metadata, Mapping) else {}
    inputs, outputs = first_entry(fmt.get("inputs")), first_entry(fmt.get("outputs"))
    in_channels = checked.get("in_channels", inputs.get("num_channels"))
    out_channels = checked.get("out_channels", outputs.get("num_channels"))
    if spatial != 3:
        walker.problem("network_def", f"spatial_dims {spatial!r} (only 3D networks)")
    if not isinstance(in_channels, int) or not isinstance(out_channels, int) or in_channels < 1 or out_channels < 1:
        walker.problem("network_def", f"in_channels / out_channels not known as integers ({in_channels!r} / {out_channels!r})")
        return None
    activation = (post or {}).get("activation", "softmax")
    if out_channels == 1 and activation != "sigmoid":
        walker.problem("postprocessing", "one output channel needs a sigmoid and a 0.5 threshold")
    if out_channels > 1 and activation == "sigmoid":
        walker.problem("postprocessing", f"sigmoid over {out_channels} channels (overlapping labels are not reproduced)")
    return MonaiNetConfig(
        network_def=checked,
        spatial_dims=3,
        in_channels=in_channels,
        out_channels=out_channels,
        single_logit=out_channels == 1,
    )


def load_state_dict(data: bytes, subject: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a ``model.pt``, read with ``torch.load(weights_only=True)`` only.

    A plain state dict, or a checkpoint dict holding it under ``"model"`` (what MONAI's
    CheckpointLoader accepts). ``weights_only=True`` unpickles tensors and plain containers only and
    never runs code from the file.

    Raises:
        ModelError: the file needs more than that (custom classes, code, a TorchScript archive), or
            holds no state dict.
    """
    try:
        checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ... for what weights_only refuses
        raise ModelError(
            "the checkpoint cannot be read as plain tensors (torch.load(weights_only=True) refused it)",
            subject=subject,
            expected="a state dict saved with torch.save(net.state_dict(), ...)",
            found=_why_refused(exc),
            hint="DeepSeg never unpickles code or custom classes from a checkpoint. If you trust the file, load it in "
            "MONAI and save net.state_dict() again.",
        ) from None
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(
            "the checkpoint holds no state dict",
            subject=subject,
            expected="a mapping of parameter names to tensors (or one under 'model')",
            found=type(state).__name__ if not isinstance(state, Mapping) else f"keys {sorted(map(str, state))[:5]}",
        )
    return {str(k): v for k, v in state.items()}


def _why_refused(exc: Exception) -> str:
    """The line of torch's long weights_only message that names what the file needs."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    found = re.search(r"Unsupported global: GLOBAL [\w.]+", text)
    if found:
        return f"{found.group(0)} (code or a class, not a tensor or a plain container)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:300]


def loaded_network(config: MonaiNetConfig, state: dict[str, torch.Tensor], subject: Path) -> MonaiNetwork:
    """The network of ``config`` with ``state`` loaded strictly, in eval mode.

    Raises:
        ModelError: parameters are missing, unexpected or of another shape (weights of another model).
    """
    import monai

    try:
        net = MonaiNetwork(config)
    except (RuntimeError, TypeError, ValueError) as exc:
        # a network_def written for another MONAI version (a renamed or removed argument, e.g. SwinUNETR's
        # img_size since MONAI 1.5): MONAI's own message names the class and the arguments it could not take
        cause = f" ({_message_lines(exc.__cause__)[-1][:200]})" if exc.__cause__ else ""
        raise ModelError(
            f"MONAI {monai.__version__} cannot build the bundle's network_def",
            subject=subject.parent.parent / "configs",
            found=_message_lines(exc)[0][:300] + cause,
            hint="The bundle was written for another MONAI version (its metadata's monai_version): install that "
            "version in DeepSeg's environment, or correct the network_def's arguments for this one.",
        ) from exc
    expected = net.net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if expected[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ModelError(
            "the weights do not fit the bundle's network_def",
            subject=subject,
            found=f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}",
            hint="models/model.pt and configs/inference.json come from different models.",
        )
    net.net.load_state_dict(state, strict=True)
    return net.eval()


def _message_lines(exc: BaseException) -> list[str]:
    """An exception's non-empty message lines, or its type's name when it has none."""
    return [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
