"""Walking a bundle's inference config as data: references followed, arguments checked, problems collected.

Every mapping module (:mod:`.preprocessing`, :mod:`.inferer`, :mod:`.postprocessing`,
:mod:`.network`) reads the config through one :class:`ConfigWalker`, which records each item
DeepSeg does not reproduce exactly instead of stopping at the first, so that the import fails with
ONE error listing them all. ``@`` references are resolved to literals; ``$`` expressions and ``%``
macros are never evaluated, only reported (the ``$`` dtype spellings of :data:`FLOAT_DTYPES` are the
one exception: they are plain names).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...nets.monai_network import lookup_id, resolve_references
from .source import BundleSource

#: dtype spellings accepted as plain values (the ``$`` forms are the only expressions allowed, and only here).
FLOAT_DTYPES = {
    "float32": "float32",
    "np.float32": "float32",
    "numpy.float32": "float32",
    "torch.float32": "float32",
    "float64": "float64",
    "np.float64": "float64",
    "numpy.float64": "float64",
    "torch.float64": "float64",
}
DTYPE_ARGS = ("dtype", "output_dtype")
#: arguments that only name keys, metadata bookkeeping or I/O details; they never change the result.
COMMON_ARGS = frozenset({"keys", "allow_missing_keys", "meta_keys", "meta_key_postfix", "_desc_"})
#: arguments that only say where a computation runs: often ``$torch.device(...)`` expressions, which are not
#: evaluated, and never read, since they cannot change the result.
PLACEMENT_ARGS = frozenset({"device", "sw_device"})


def transform_name(target: Any) -> str | None:
    """``Spacingd`` for ``Spacingd`` / ``monai.transforms.Spacingd`` / ``monai.transforms.spatial.dictionary.Spacingd``."""
    if not isinstance(target, str) or not target or target[0] in "$@%":
        return None
    if "." not in target:
        return target
    module, _, name = target.rpartition(".")
    if (
        module == "monai.transforms"
        or module.startswith("monai.transforms.")
        or module in ("monai.inferers", "monai.inferers.inferer")
    ):
        return name
    return None


def first_entry(section: Any) -> dict[str, Any]:
    """The first value of a metadata section (``network_data_format.inputs``: ``{"image": {...}}``), or ``{}``."""
    if isinstance(section, Mapping) and section:
        first = next(iter(section.values()))
        return dict(first) if isinstance(first, Mapping) else {}
    return {}


class ConfigWalker:
    """Walks one bundle config; records every unsupported item instead of stopping at the first.

    Attributes:
        source: the bundle read from disk.
        config: its inference config (metadata under ``_meta_``).
        problems: ``"where: what"`` for every item that is refused, in the order found.
        image_key: the config's ``image_key`` when it is a plain string, else ``image``.
    """

    def __init__(self, source: BundleSource) -> None:
        self.source = source
        self.config = source.config
        self.problems: list[str] = []
        key = self.config.get("image_key", "image")
        self.image_key = key if isinstance(key, str) and key[:1] not in "$@%" else "image"

    def problem(self, where: str, text: str) -> None:
        """Record one refused item."""
        self.problems.append(f"{where}: {text}")

    def raw(self, ref_id: str) -> Any:
        """The config entry at ``ref_id`` (``a#b#0``) as written, or None when there is none."""
        try:
            return lookup_id(self.config, ref_id)
        except KeyError:
            return None

    def value(self, value: Any, where: str) -> Any:
        """``value`` with references resolved; ``$`` / ``%`` strings become problems."""
        return resolve_references(value, self.config, where, self.problems)

    def component(self, value: Any, where: str) -> dict[str, Any] | None:
        """A component dict (``@`` references followed), or None with a problem."""
        seen = 0
        while isinstance(value, str) and value.startswith("@") and seen < 16:
            value = self.raw(value[1:])
            seen += 1
        if isinstance(value, str) and value.startswith("$"):
            self.problem(where, f"built by a Python expression {value[:60]!r} (DeepSeg evaluates no bundle code)")
            return None
        if not isinstance(value, Mapping) or "_target_" not in value:
            self.problem(where, f"expected a MONAI component with a _target_, found {type(value).__name__}")
            return None
        return dict(value)

    def arguments(self, component: dict[str, Any], name: str, where: str, allowed: dict[str, Any]) -> dict[str, Any] | None:
        """The component's arguments with defaults from ``allowed``; unknown ones are problems."""
        ok = True
        for reserved in ("_requires_", "_disabled_", "_mode_"):
            if reserved in component:
                self.problem(where, f"{name}: {reserved} is not supported")
                ok = False
        unknown = sorted(set(component) - set(allowed) - COMMON_ARGS - {"_target_", "_requires_", "_disabled_", "_mode_"})
        if unknown:
            self.problem(where, f"{name}: argument(s) {unknown} are not supported")
            ok = False
        args: dict[str, Any] = {}
        for key, default in allowed.items():
            raw = component.get(key, default)
            if key in PLACEMENT_ARGS:
                args[key] = None
                continue
            if key in DTYPE_ARGS and isinstance(raw, str) and raw.lstrip("$") in FLOAT_DTYPES:
                args[key] = FLOAT_DTYPES[raw.lstrip("$")]
                continue
            before = len(self.problems)
            args[key] = self.value(raw, f"{where} {name}.{key}")
            ok = ok and len(self.problems) == before
        return args if ok else None

    def for_image(self, component: dict[str, Any], where: str) -> bool:
        """True when the transform touches the image key."""
        return self.touches(component, where, self.image_key)

    def touches(self, component: dict[str, Any], where: str, key: str) -> bool:
        """True when the transform's ``keys`` include ``key``."""
        keys = self.value(component.get("keys", []), f"{where} keys")
        keys = [keys] if isinstance(keys, str) else list(keys or [])
        return key in keys

    def per_key(self, value: Any, component: dict[str, Any], where: str) -> Any:
        """The image key's entry of a per-key argument (``mode=["bilinear", "nearest"]``)."""
        if isinstance(value, list | tuple):
            keys = resolve_references(component.get("keys", []), self.config, where, [])  # reported by for_image
            keys = [keys] if isinstance(keys, str) else list(keys)
            return value[keys.index(self.image_key)] if self.image_key in keys and len(value) == len(keys) else value[0]
        return value

    def float32_dtype(self, name: str, where: str, value: Any, accept_float64: bool = False) -> None:
        """A problem unless ``value`` is float32 (or None; float64 too when ``accept_float64``)."""
        if value is None or value == "float32" or (accept_float64 and value == "float64"):
            return
        self.problem(where, f"{name}: dtype {value!r} changes the values (only float32 is reproduced)")
