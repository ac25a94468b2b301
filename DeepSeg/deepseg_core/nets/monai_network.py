"""A network from a MONAI bundle: the bundle's ``network_def``, rebuilt by MONAI's own ConfigParser.

A MONAI bundle describes its network as a config component, e.g.
``{"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2, ...}``. MONAI is the
field's library for rebuilding these, so DeepSeg hands the component to
``monai.bundle.ConfigParser`` (MONAI is an optional dependency of imported bundles only).

Bundle configs can run arbitrary Python: ``$`` values are ``eval``-ed, ``_target_`` may name any
importable callable, ``%`` macros read other files, ``_requires_`` evaluates other ids. So the
``network_def`` a card stores is a *checked, plain* copy: every ``@`` reference resolved to the
literal value it names (by :func:`resolve_references`, which evaluates nothing), every
``_target_`` a class of ``monai.networks.nets`` (or :data:`EXTRA_ALLOWED_TARGETS`) spelt as its full
dotted path, no ``$`` expression, no ``%`` macro, no ``_requires_``/``_mode_``, and no argument that
would make the constructor fetch weights from elsewhere (:data:`REFUSED_NETWORK_ARGS`). The check
runs at import and again every time the network is built, so an edited card cannot smuggle code in.

Axis order: MONAI networks see ``(B, C, X, Y, Z)`` tensors (nibabel's voxel order i, j, k), DeepSeg
tiles are ``(B, C, Z, Y, X)``. :class:`MonaiNetwork` transposes on the way in and out, so the
network sees exactly what it saw under MONAI and DeepSeg's sliding window, training loop and
exporters see DeepSeg's order.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ShapeError

#: where every ``_target_`` of a network_def must live.
ALLOWED_TARGET_MODULE = "monai.networks.nets"
#: full dotted paths accepted outside :data:`ALLOWED_TARGET_MODULE` (none yet; add only plain layer classes).
EXTRA_ALLOWED_TARGETS: frozenset[str] = frozenset()
#: constructor arguments that fetch or read weights at build time (network access, other files).
REFUSED_NETWORK_ARGS = frozenset({"pretrained", "pretrained_url", "pretrained_path", "checkpoint", "weights"})
#: ConfigParser's reserved keys; ``_desc_`` is a comment, the others change what gets evaluated.
RESERVED_KEYS = frozenset({"_target_", "_desc_", "_disabled_", "_requires_", "_mode_"})
ID_SEPARATOR = "::"
_MAX_REFERENCE_DEPTH = 32
MONAI_HINT = "Install MONAI to import or run models from MONAI bundles: pip install 'deepseg[monai]' (or pip install monai)."


def monai_available() -> bool:
    """True when the ``monai`` package can be imported."""
    return importlib.util.find_spec("monai") is not None


def require_monai(what: str) -> None:
    """Raise a clear :class:`ConfigError` when MONAI is missing (``what`` says who needs it)."""
    if not monai_available():
        raise ConfigError(f"{what} needs MONAI, which is not installed", expected="the monai package", hint=MONAI_HINT)


# ------------------------------------------------------------------------------------------------
# reading a bundle config as data


def normalize_id(ref_id: str) -> str:
    """A config id with MONAI's legacy ``#`` separator written as ``::``."""
    return ref_id.replace("#", ID_SEPARATOR)


def lookup_id(root: Mapping[str, Any], ref_id: str) -> Any:
    """The raw value at config id ``a::b::0`` (dict keys and list indices); KeyError when absent."""
    node: Any = root
    for part in normalize_id(ref_id).split(ID_SEPARATOR):
        if isinstance(node, Mapping) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise KeyError(ref_id)
    return node


def resolve_references(value: Any, root: Mapping[str, Any], where: str, problems: list[str], _depth: int = 0) -> Any:
    """``value`` with every whole-string ``@id`` reference replaced by the (resolved) value it names.

    Nothing is evaluated: a ``$`` expression or a ``%`` macro anywhere in the result is recorded in
    ``problems`` (``"<where>: ..."``) and left in place, so the caller can list every problem at once.
    ``root`` is the whole config (the metadata under ``_meta_``).
    """
    if _depth > _MAX_REFERENCE_DEPTH:
        problems.append(f"{where}: references nest deeper than {_MAX_REFERENCE_DEPTH} levels (a cycle?)")
        return value
    if isinstance(value, str):
        if value.startswith("@"):
            ref_id = value[1:]
            if not ref_id or ref_id.startswith(ID_SEPARATOR) or ref_id.startswith("#"):
                problems.append(f"{where}: relative reference {value!r} is not supported")
                return value
            try:
                target = lookup_id(root, ref_id)
            except KeyError:
                problems.append(f"{where}: reference {value!r} names no id in the config")
                return value
            return resolve_references(target, root, f"{where} -> {value}", problems, _depth + 1)
        if value.startswith("$"):
            problems.append(f"{where}: Python expression {_short(value)} (DeepSeg evaluates no bundle code)")
        elif value.startswith("%"):
            problems.append(f"{where}: macro {_short(value)} (DeepSeg reads no further config files)")
        return value
    if isinstance(value, Mapping):
        return {str(k): resolve_references(v, root, f"{where}::{k}", problems, _depth) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [resolve_references(v, root, f"{where}::{i}", problems, _depth) for i, v in enumerate(value)]
    return value


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


# ------------------------------------------------------------------------------------------------
# the network_def check


def network_target(name: Any) -> tuple[str | None, str | None]:
    """``(full dotted path, None)`` of an allowed ``_target_``, or ``(None, why not)``.

    Short names (``"UNet"``) are looked up in ``monai.networks.nets`` only (MONAI's own locator
    would search every MONAI module); dotted names must lie inside it or be in
    :data:`EXTRA_ALLOWED_TARGETS`. The class must be a ``torch.nn.Module``.
    """
    if not isinstance(name, str) or not name:
        return None, f"_target_ {name!r} is not a class name"
    if name[0] in "$@%":
        return None, f"_target_ {_short(name)} is an expression or reference, not a class name"
    if name in EXTRA_ALLOWED_TARGETS:
        return name, None
    import importlib

    nets = importlib.import_module(ALLOWED_TARGET_MODULE)
    if "." not in name:
        module_name, attr = ALLOWED_TARGET_MODULE, name
    else:
        module_name, _, attr = name.rpartition(".")
        if module_name != ALLOWED_TARGET_MODULE and not module_name.startswith(ALLOWED_TARGET_MODULE + "."):
            return None, f"_target_ {name!r} is not a network class of {ALLOWED_TARGET_MODULE}"
    try:
        obj = getattr(importlib.import_module(module_name), attr) if module_name != ALLOWED_TARGET_MODULE else getattr(nets, attr)
    except (ImportError, AttributeError):
        return None, f"_target_ {name!r} is not a class of {ALLOWED_TARGET_MODULE}"
    if not (inspect.isclass(obj) and issubclass(obj, nn.Module)) or not obj.__module__.startswith(ALLOWED_TARGET_MODULE):
        return None, f"_target_ {name!r} is not a network class of {ALLOWED_TARGET_MODULE}"
    if getattr(nets, obj.__name__, None) is obj:
        return f"{ALLOWED_TARGET_MODULE}.{obj.__name__}", None
    return f"{obj.__module__}.{obj.__qualname__}", None


def check_network_def(
    network_def: Any, where: str = "network_def", *, report_strings: bool = True
) -> tuple[dict[str, Any], list[str]]:
    """A safe, plain copy of a (reference-resolved) ``network_def`` and every problem found.

    The copy spells each ``_target_`` as its full dotted path and drops ``_desc_``. Problems:
    a ``_target_`` outside the allow-list, ``$`` / ``%`` / ``@`` strings (unless
    ``report_strings`` is False because :func:`resolve_references` already reported them; the copy
    is still unsafe then), ``_requires_``, ``_disabled_``, a ``_mode_`` other than ``default``, a
    weight-fetching argument, a top level that is not a component.
    """
    problems: list[str] = []
    if not isinstance(network_def, Mapping) or "_target_" not in network_def:
        problems.append(f"{where}: expected a component with a _target_, found {type(network_def).__name__}")
        return {}, problems
    string_problems: list[str] = []
    checked = _check_value(network_def, where, problems, string_problems)
    return checked, (string_problems if report_strings else []) + problems


def _check_value(value: Any, where: str, problems: list[str], string_problems: list[str]) -> Any:
    if isinstance(value, str):
        if value[:1] in ("$", "@", "%"):
            kind = {"$": "Python expression", "@": "unresolved reference", "%": "macro"}[value[0]]
            string_problems.append(f"{where}: {kind} {_short(value)}")
        return value
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, list | tuple):
        return [_check_value(v, f"{where}::{i}", problems, string_problems) for i, v in enumerate(value)]
    if not isinstance(value, Mapping):
        problems.append(f"{where}: value of type {type(value).__name__} is not plain JSON")
        return None
    out: dict[str, Any] = {}
    if "_target_" in value:
        target, why = network_target(value["_target_"])
        if why:
            problems.append(f"{where}: {why}")
        out["_target_"] = target or value["_target_"]
    for key, item in value.items():
        key = str(key)
        if key == "_target_" or key == "_desc_":
            continue
        if key in ("_requires_", "_disabled_"):
            problems.append(f"{where}: {key} is not supported in a network definition")
            continue
        if key == "_mode_":
            if item != "default":
                problems.append(f"{where}: _mode_ {item!r} (only 'default' builds a plain network)")
            continue
        if key in REFUSED_NETWORK_ARGS and item:
            problems.append(f"{where}::{key}: {item!r} would fetch or read weights while building the network")
        out[key] = _check_value(item, f"{where}::{key}", problems, string_problems)
    return out


# ------------------------------------------------------------------------------------------------
# the network


@dataclass(frozen=True)
class MonaiNetConfig:
    """What a model card stores to rebuild a bundle's network.

    Attributes:
        network_def: the checked, plain ``network_def`` (see :func:`check_network_def`).
        spatial_dims: 3 (bundles of 2D networks are not imported).
        in_channels: network input channels.
        out_channels: network output channels.
        single_logit: the network has one sigmoid output; :class:`MonaiNetwork` then returns
            ``[0, logit]`` so that softmax over the pair is the sigmoid (DeepSeg's label maps need
            a background channel).
    """

    network_def: dict[str, Any] = field(default_factory=dict)
    spatial_dims: int = 3
    in_channels: int = 1
    out_channels: int = 2
    single_logit: bool = False


class MonaiNetwork(nn.Module):
    """A bundle's network built by MONAI's ConfigParser, in DeepSeg's axis order.

    ``forward``: ``(B, in_channels, Z, Y, X)`` float32 -> logits ``(B, K, Z, Y, X)`` with
    ``K = out_channels`` (2 for a single sigmoid logit, see :class:`MonaiNetConfig`). The MONAI
    network is ``self.net`` (state-dict keys ``net.*``).

    Raises:
        ConfigError: MONAI is missing, or ``network_def`` fails :func:`check_network_def`.
    """

    def __init__(self, config: MonaiNetConfig) -> None:
        super().__init__()
        require_monai("This model (imported from a MONAI bundle)")
        if config.spatial_dims != 3:
            raise ConfigError("only 3D MONAI networks are supported", found=f"spatial_dims {config.spatial_dims}")
        checked, problems = check_network_def(config.network_def)
        if problems:
            raise ConfigError(
                "the stored MONAI network definition is not a plain, allowed network",
                found="; ".join(problems),
                hint="Re-import the bundle; model cards must not be edited by hand.",
            )
        from monai.bundle import ConfigParser

        # The checked copy holds only literals and allowed _target_ paths, so parsing it evaluates
        # no bundle code: ConfigParser just instantiates the class with those arguments.
        parser = ConfigParser({"network_def": copy.deepcopy(checked)})
        self.net = parser.get_parsed_content("network_def")
        self.config = config
        self.single_logit = config.single_logit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5:
            raise ShapeError("a MONAI bundle network needs (B, C, Z, Y, X) tiles", found=str(tuple(x.shape)))
        out = self.net(x.permute(0, 1, 4, 3, 2).contiguous())
        if isinstance(out, list | tuple):  # deep-supervision heads: the first is full resolution
            out = out[0]
        if out.ndim == 6:  # DynUNet stacks its deep-supervision outputs in training mode
            out = out[:, 0]
        out = out.permute(0, 1, 4, 3, 2)
        if self.single_logit:
            out = torch.cat([torch.zeros_like(out), out], dim=1)
        return out


__all__ = [
    "ALLOWED_TARGET_MODULE",
    "EXTRA_ALLOWED_TARGETS",
    "MonaiNetConfig",
    "MonaiNetwork",
    "check_network_def",
    "lookup_id",
    "monai_available",
    "network_target",
    "require_monai",
    "resolve_references",
]
